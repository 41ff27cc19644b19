"""``kdsearch finetune``: fine-tune an exported student's head on a user's data; write a new export.

The data is pooled (:mod:`kdsearch.finetune.pool`) and a seeded stratified share of every class is
held out (its indices' sha256 goes in the card); accuracy is measured on it before and after the
head is trained (:func:`kdsearch.distill.head.train_head`). The new folder holds
``model.safetensors`` + ``card.json`` + ``README.md`` (:mod:`kdsearch.modelcard`), and its card
records the source checkpoint, the data, the split and the training settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdsearch._version import __version__
from kdsearch.checkpoint import MODEL_FILE, load_student_with_card, save_student, sha256_file
from kdsearch.constants import FINETUNE_CARD_KIND
from kdsearch.distill.head import WEIGHT_DECAY, BatchHook, Progress, heldout_accuracy, train_head
from kdsearch.errors import ConfigError, DataError
from kdsearch.finetune.pool import indices_sha256, load_finetune_pool
from kdsearch.modelcard import check_out_dir, staged_out_dir, write_card

__all__ = ["FinetuneResult", "finetune_checkpoint"]


@dataclass
class FinetuneResult:
    """What :func:`finetune_checkpoint` wrote and measured (accuracies are fractions)."""

    out_dir: Path
    pre_accuracy: float
    post_accuracy: float
    epochs: int
    lr: float
    n_train: int
    n_holdout: int
    source_sha256: str
    holdout_indices_sha256: str
    files: dict[str, str]
    card: dict[str, Any]
    train_indices: torch.Tensor = field(repr=False)  # positions in the pooled data
    holdout_indices: torch.Tensor = field(repr=False)


def _check_args(epochs: int, lr: float, batch_size: int, holdout_fraction: float,
                device: str | torch.device) -> torch.device:
    if epochs < 1:
        raise ConfigError("--epochs", "must be >= 1", epochs)
    if not (isinstance(lr, (int, float)) and 0 < lr < 10):
        raise ConfigError("--lr", "must be in (0, 10)", lr)
    if batch_size < 1:
        raise ConfigError("--batch-size", "must be >= 1", batch_size)
    if not 0.0 < holdout_fraction < 0.9:
        raise ConfigError("--holdout-fraction", "must be in (0, 0.9)", holdout_fraction)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError("--device", "must be a torch device such as cpu or cuda", device) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", "CUDA is not available on this machine", str(device), "use --device cpu")
    return dev


def finetune_checkpoint(
    checkpoint_dir: str | Path,
    data_spec: str,
    out_dir: str | Path,
    epochs: int = 15,
    lr: float = 1e-3,
    batch_size: int = 128,
    holdout_fraction: float = 0.2,
    unfreeze_last_block: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    batch_hook: BatchHook | None = None,
) -> FinetuneResult:
    """Fine-tune an exported student (folder with ``model.safetensors``, or the file) on
    ``data_spec`` (``imagefolder:PATH`` | ``digits`` | ``synthetic``) and write a new export
    folder ``out_dir`` (``model.safetensors`` + ``card.json`` + ``README.md``).

    ``holdout_fraction`` of every class is held out (seeded, stratified). Normalisation: the
    source card's ``input.normalization`` when recorded, else the data's own channel statistics.
    ``batch_hook`` receives (pool positions, images) of every training batch.
    """
    from kdsearch.data.splits import ImageSplit, content_digest, stratified_split

    dev = _check_args(epochs, lr, batch_size, holdout_fraction, device)
    out = Path(out_dir)
    check_out_dir(out)
    src = Path(checkpoint_dir)
    model, spec, src_card = load_student_with_card(src)
    src_file = src / MODEL_FILE if src.is_dir() else src
    source_sha = sha256_file(src_file)

    pool = load_finetune_pool(data_spec, spec.resolution, spec.num_classes)
    n_classes = len(pool.class_names)
    if n_classes != spec.num_classes:
        raise DataError(
            f"--data: {pool.description} has {n_classes} classes but the student has {spec.num_classes} outputs; "
            "fine-tune on data with the same classes"
        )
    (holdout_idx,), train_idx = stratified_split(pool.labels, [holdout_fraction], seed, n_classes)
    if len(holdout_idx) == 0 or len(train_idx) < 2:
        raise DataError(
            f"--data: {pool.description} has {len(pool.labels)} images, too few to hold out "
            f"{holdout_fraction:.0%} of every class and train on the rest; add images"
        )
    full = ImageSplit(pool.images, pool.labels)
    train, holdout = full.subset(train_idx), full.subset(holdout_idx)

    norm = (src_card.get("input") or {}).get("normalization") if src_card else None
    if isinstance(norm, dict) and "mean" in norm and "std" in norm:
        mean, std, norm_src = tuple(norm["mean"]), tuple(norm["std"]), "the source student's card"
    else:
        mean, std, norm_src = pool.mean, pool.std, "channel statistics of this data (the source card records none)"

    model = model.to(dev)
    pre = heldout_accuracy(model, holdout, spec.resolution, mean, std, dev)

    def hook(pos: torch.Tensor, imgs: torch.Tensor) -> None:
        if batch_hook is not None:
            batch_hook(train_idx[pos], imgs)

    stats = train_head(
        model, train, spec.resolution, mean, std, epochs=epochs, lr=lr, batch_size=batch_size,
        unfreeze_last_block=unfreeze_last_block, device=dev, seed=seed, progress=progress, batch_hook=hook,
    )
    post = heldout_accuracy(model, holdout, spec.resolution, mean, std, dev)
    model = model.cpu().eval()

    holdout_sha = indices_sha256(holdout_idx)
    card: dict[str, Any] = {
        "kind": FINETUNE_CARD_KIND,
        "kdsearch_version": __version__,
        "student": spec.label,
        "spec": spec.to_dict(),
        "input": {
            "shape": ["batch", spec.in_chans, spec.resolution, spec.resolution],
            "resolution_px": spec.resolution,
            "normalization": {"mean": list(mean), "std": list(std)},
        },
        "source": {
            "path": str(src.resolve()),
            "sha256": source_sha,
            "study": src_card.get("study"),
            "trial_number": src_card.get("trial_number"),
            "teacher": src_card.get("teacher"),
            "dataset": src_card.get("dataset"),
            "card_kind": src_card.get("kind"),
        },
        "data": {
            "spec": data_spec,
            "source": pool.description,
            "class_names": pool.class_names,
            "n_pool": int(len(pool.labels)),
            "n_train": int(len(train_idx)),
            "n_holdout": int(len(holdout_idx)),
            "holdout_fraction": holdout_fraction,
            "seed": seed,
            "split": "seeded stratified (kdsearch.data.stratified_split) over the pooled data",
            "holdout_indices_sha256": holdout_sha,
            "pool_content_sha256": content_digest(pool.images, pool.labels),
            "holdout_content_sha256": content_digest(holdout.images, holdout.labels),
            "normalization": {"mean": list(mean), "std": list(std), "source": norm_src},
        },
        "training": {
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "optimizer": f"AdamW(weight_decay={WEIGHT_DECAY:g}), cosine decay to 0, cross-entropy",
            "trainable": "head + last_block" if unfreeze_last_block else "head",
            "unfreeze_last_block": unfreeze_last_block,
            "device": str(dev),
            **stats,
        },
        "results": {"pre_accuracy": pre, "post_accuracy": post, "gain": post - pre, "metric": "top-1 on the holdout"},
    }
    with staged_out_dir(out) as stage:
        sha = save_student(model, spec, stage / MODEL_FILE, {"finetuned_from": source_sha})
        all_files = write_card(stage, card, {MODEL_FILE: sha})
    return FinetuneResult(
        out_dir=out, pre_accuracy=pre, post_accuracy=post, epochs=epochs, lr=lr, n_train=len(train_idx),
        n_holdout=len(holdout_idx), source_sha256=source_sha, holdout_indices_sha256=holdout_sha, files=all_files,
        card=card, train_indices=train_idx, holdout_indices=holdout_idx,
    )
