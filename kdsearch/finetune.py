"""Facet 4: fine-tune a distilled student's head on new data, features frozen.

The paper (Violos et al., Table III) freezes the feature extractor and trains the classifier at a
low learning rate for 15 epochs. Here:

* **Frozen:** every parameter outside ``model.head`` (and outside ``model.last_block`` with
  ``unfreeze_last_block``) has ``requires_grad=False`` and its modules stay in eval mode, so the
  BatchNorm running statistics of the frozen part do not move either: the frozen tensors are
  bitwise unchanged afterwards.
* **Optimiser:** AdamW (``weight_decay`` :data:`WEIGHT_DECAY`) at ``lr`` with a cosine decay to 0
  over all steps, cross-entropy loss, batches of ``batch_size`` reshuffled every epoch with a
  seeded generator, light augmentation (pad-and-crop by 1/8 of the side + horizontal flip, the
  same :func:`kdsearch.data.apply_views` the KD loop uses).
* **Held-out accuracy** before and after, on images that are never trained on.

One implementation, :func:`finetune_model`, serves both the per-trial ``finetune:`` stage of the
search (train on ``bundle.finetune``, score on a held-out split) and :func:`finetune_checkpoint`
(``kdsearch finetune``: pool a user's data, carve a seeded stratified holdout, fine-tune an
exported student, and write a new checkpoint + model card that records where it came from).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdsearch._version import __version__
from kdsearch.checkpoint import atomic_write_text, save_student, sha256_file
from kdsearch.errors import ConfigError, DataError

__all__ = [
    "FinetuneResult",
    "WEIGHT_DECAY",
    "finetune_model",
    "train_head",
    "trainable_parameters",
    "finetune_checkpoint",
    "load_finetune_pool",
    "indices_sha256",
]

WEIGHT_DECAY = 1e-4
EVAL_BATCH = 512

Progress = Callable[[float, str], None]
BatchHook = Callable[[torch.Tensor, torch.Tensor], None]  # (positions in the train split, uint8 images)


# ----------------------------------------------------------------------------------------------
# Freezing and training


def trainable_parameters(model: nn.Module, unfreeze_last_block: bool = False) -> list[nn.Parameter]:
    """The parameters fine-tuning trains: ``model.head`` (+ ``model.last_block``)."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        raise ValueError(f"fine-tuning needs a student with a .head module; {type(model).__name__} has none")
    params = list(head.parameters())
    if unfreeze_last_block:
        block = getattr(model, "last_block", None)
        if not isinstance(block, nn.Module):
            raise ValueError(f"unfreeze_last_block: {type(model).__name__} has no .last_block module")
        params += [p for p in block.parameters() if all(p is not q for q in params)]
    return params


def _set_modes(model: nn.Module, unfreeze_last_block: bool) -> None:
    # Frozen modules in eval mode: BatchNorm statistics and dropout of the frozen part stay put.
    model.eval()
    model.head.train()
    if unfreeze_last_block:
        model.last_block.train()


def _images_labels(split: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = getattr(split, "images", None), getattr(split, "labels", None)
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise ValueError(
            f"finetune: the {what} split must be held in memory (uint8 images + labels); "
            f"got {type(split).__name__} (streamed data sets such as imagenet are not supported for fine-tuning)"
        )
    if len(labels) == 0:
        raise ValueError(f"finetune: the {what} split is empty")
    return images, labels


def train_head(
    model: nn.Module,
    train_split: Any,
    resolution: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    epochs: int = 15,
    lr: float = 1e-3,
    batch_size: int = 128,
    unfreeze_last_block: bool = False,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: Progress | None = None,
    batch_hook: BatchHook | None = None,
) -> dict[str, Any]:
    """Train ``model``'s head in place on ``train_split`` (see the module docstring).

    ``model`` must already be on ``device``. ``batch_hook(positions, images_u8)`` sees every
    training batch before it is used (tests prove held-out images never appear). Returns
    statistics (steps, final loss, trainable/frozen parameter counts). Restores the parameters'
    ``requires_grad`` flags and leaves the model in eval mode.
    """
    from kdsearch.data.augment import ViewSpec, apply_views, sample_views

    if epochs < 1:
        raise ValueError(f"finetune.epochs: must be >= 1 (got {epochs})")
    if not 0 < lr < 10:
        raise ValueError(f"finetune.lr: must be in (0, 10) (got {lr})")
    if batch_size < 1:
        raise ValueError(f"finetune.batch_size: must be >= 1 (got {batch_size})")
    images, labels = _images_labels(train_split, "training")
    dev = torch.device(device)
    train_params = trainable_parameters(model, unfreeze_last_block)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in train_params:
        p.requires_grad_(True)
    n_train_params = sum(p.numel() for p in train_params)
    n_frozen = sum(p.numel() for p in model.parameters()) - n_train_params

    n = int(labels.shape[0])
    side = int(images.shape[-1])
    view_spec = ViewSpec(image_size=side, padding=max(1, side // 8), flip=True)
    gen = torch.Generator().manual_seed(int(seed))
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(train_params, lr=lr, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total)))
    step = 0
    last_loss = float("nan")
    try:
        for epoch in range(epochs):
            _set_modes(model, unfreeze_last_block)
            perm = torch.randperm(n, generator=gen)
            views = sample_views(n, 1, view_spec, gen)[0]
            for i in range(0, n, batch_size):
                pos = perm[i : i + batch_size]
                if len(pos) < 2 and n >= 2:
                    continue  # a 1-image batch breaks BatchNorm in train mode and adds nothing
                batch_u8 = images[pos.to(images.device)]
                if batch_hook is not None:
                    batch_hook(pos, batch_u8)
                x = apply_views(batch_u8.to(dev), views[pos].to(dev), view_spec, resolution, mean, std)
                y = labels[pos.to(labels.device)].to(dev)
                loss = F.cross_entropy(model(x), y)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"fine-tuning diverged at step {step} (loss {loss.item()})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                last_loss = float(loss.detach())
            if progress is not None:
                progress((epoch + 1) / epochs, f"epoch {epoch + 1}/{epochs} loss {last_loss:.4f}")
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.eval()
    return {
        "steps": step,
        "final_train_loss": last_loss,
        "trainable_params": n_train_params,
        "frozen_params": n_frozen,
        "augmentation": view_spec.to_dict(),
    }


def _accuracy(model: nn.Module, split: Any, resolution: int, mean: Sequence[float], std: Sequence[float],
              device: torch.device | str) -> float:
    from kdsearch.measure.accuracy import evaluate_accuracy

    _images_labels(split, "held-out")
    return evaluate_accuracy(model, split, resolution, mean, std, device, EVAL_BATCH)


def finetune_model(
    model: nn.Module,
    train_split: Any,
    holdout_split: Any,
    resolution: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    epochs: int = 15,
    lr: float = 1e-3,
    batch_size: int = 128,
    unfreeze_last_block: bool = False,
    device: torch.device | str = "cpu",
    seed: int = 0,
    in_place: bool = False,
    progress: Progress | None = None,
    batch_hook: BatchHook | None = None,
) -> tuple[float, float]:
    """Held-out accuracy (fractions) before and after fine-tuning the head on ``train_split``.

    ``train_split`` and ``holdout_split`` have uint8 ``.images`` and int64 ``.labels`` (e.g.
    :class:`kdsearch.data.ImageSplit`) and must not share images. By default a copy of
    ``model`` is trained, so the caller's model (the trial's distilled student, whose
    checkpoint and metrics the search stores) is untouched; ``in_place=True`` trains ``model``.
    """
    dev = torch.device(device)
    work = model if in_place else copy.deepcopy(model)
    work.to(dev)
    pre = _accuracy(work, holdout_split, resolution, mean, std, dev)
    train_head(
        work, train_split, resolution, mean, std, epochs=epochs, lr=lr, batch_size=batch_size,
        unfreeze_last_block=unfreeze_last_block, device=dev, seed=seed, progress=progress, batch_hook=batch_hook,
    )
    post = _accuracy(work, holdout_split, resolution, mean, std, dev)
    return pre, post


# ----------------------------------------------------------------------------------------------
# kdsearch finetune: data, holdout, checkpoint + card


def indices_sha256(indices: torch.Tensor) -> str:
    """sha256 of sorted int64 little-endian indices: the identity of a holdout."""
    arr = torch.sort(indices.to(torch.int64).cpu())[0].numpy().astype("<i8")
    return hashlib.sha256(arr.tobytes()).hexdigest()


@dataclass
class _Pool:
    images: torch.Tensor  # uint8 [N, 3, S, S]
    labels: torch.Tensor  # int64 [N]
    class_names: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str


def _parse_data_spec(data_spec: str) -> tuple[str, str | None]:
    spec = (data_spec or "").strip()
    if spec in ("digits", "synthetic"):
        return spec, None
    if spec.startswith("imagefolder:") and spec.removeprefix("imagefolder:").strip():
        return "imagefolder", spec.removeprefix("imagefolder:").strip()
    if spec and Path(spec).expanduser().is_dir():
        return "imagefolder", spec  # a bare folder path is an image folder
    raise ConfigError("--data", "must be imagefolder:PATH, digits or synthetic", data_spec, "e.g. --data imagefolder:my_images/")


def load_finetune_pool(data_spec: str, image_size: int, num_classes: int) -> _Pool:
    """Every image of ``data_spec`` as one pool (train, val and test of the data set together).

    ``imagefolder:PATH`` accepts ``PATH/<class>/<image>`` or the ``PATH/train`` + ``val|test``
    layout. Images are stored at ``image_size`` px (the student's resolution).
    """
    from kdsearch.config import DataConfig
    from kdsearch.data import channel_stats, load_data

    kind, root = _parse_data_spec(data_spec)
    if kind == "imagefolder" and root is not None and not (Path(root).expanduser() / "train").is_dir():
        from kdsearch.data.decode import decode_files
        from kdsearch.data.imagefolder import list_image_folder

        folder = Path(root).expanduser()
        if not folder.is_dir():
            raise DataError(f"--data: folder {str(folder)!r} does not exist; give imagefolder:PATH with PATH/<class>/<image>")
        listing = list_image_folder(folder)
        images, _size = decode_files(listing.files, image_size, what="--data")
        mean, std = channel_stats(images)
        return _Pool(images, listing.labels, list(listing.class_names), mean, std, f"imagefolder {folder}")
    cfg = DataConfig(
        dataset=kind,
        root=root,
        download=False,
        image_size=image_size,
        num_classes=num_classes if kind == "synthetic" else 10,
    )
    bundle = load_data(cfg)
    splits = [s for s in (bundle.train, bundle.val, bundle.finetune, bundle.test) if s is not None]
    for s in splits:
        _images_labels(s, "data")
    images = torch.cat([s.images.cpu() for s in splits])
    labels = torch.cat([s.labels.cpu() for s in splits])
    desc = f"{kind} {root}" if root else kind
    return _Pool(images, labels, list(bundle.class_names), tuple(bundle.mean), tuple(bundle.std), desc)  # type: ignore[arg-type]


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


def _readme(card: dict[str, Any], files: dict[str, str]) -> str:
    r, d, t = card["results"], card["data"], card["training"]
    src = card["source"]
    lines = [
        f"# kdsearch student `{card['student']}`, fine-tuned (facet 4)",
        "",
        f"Fine-tuned by kdsearch {card['kdsearch_version']} from checkpoint sha256 `{src['sha256']}`"
        + (f" (study `{src.get('study')}`, trial {src.get('trial_number')})" if src.get("study") else "")
        + ".",
        "",
        "## Load it",
        "",
        "```python\nimport kdsearch\nmodel = kdsearch.load_student(\"DIR\")  # torch.nn.Module in eval mode\n```",
        "",
        "## Result (held-out images, never trained on)",
        "",
        "| | accuracy |",
        "|---|---|",
        f"| before | {100 * r['pre_accuracy']:.2f}% |",
        f"| after | {100 * r['post_accuracy']:.2f}% |",
        f"| gain | {100 * r['gain']:+.2f} points |",
        "",
        f"Data: {d['source']}; {d['n_pool']} images, {d['n_holdout']} held out "
        f"({100 * d['holdout_fraction']:.0f}% of every class, seed {d['seed']}; indices sha256 "
        f"`{d['holdout_indices_sha256']}`), {d['n_train']} trained on.",
        "",
        f"Training: {t['trainable']} trained, everything else frozen; {t['optimizer']}; {t['epochs']} epochs, "
        f"lr {t['lr']}, batch {t['batch_size']}, {t['steps']} steps.",
        "",
        f"Input: `[batch, 3, {card['spec']['resolution']}, {card['spec']['resolution']}]`, normalised with "
        f"mean {d['normalization']['mean']}, std {d['normalization']['std']} ({d['normalization']['source']}).",
        "",
        "## Files",
        "",
        "| file | sha256 |",
        "|---|---|",
        *[f"| {k} | `{v}` |" for k, v in files.items()],
        "",
    ]
    return "\n".join(lines)


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

    The data is pooled and a seeded stratified ``holdout_fraction`` of every class is held out
    (its indices' sha256 goes in the card); accuracy is measured on it before and after.
    Normalisation: the source card's ``input.normalization`` when recorded, else the data's own
    channel statistics. ``batch_hook`` receives (pool positions, images) of every training batch.
    """
    from kdsearch.data.splits import ImageSplit, content_digest, stratified_split
    from kdsearch.export import _check_out_dir, load_student_with_card, publish_dir, staging_dir

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
    out = Path(out_dir)
    _check_out_dir(out)
    src = Path(checkpoint_dir)
    model, spec, src_card = load_student_with_card(src)
    src_file = src / "model.safetensors" if src.is_dir() else src
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
    pre = _accuracy(model, holdout, spec.resolution, mean, std, dev)

    def hook(pos: torch.Tensor, imgs: torch.Tensor) -> None:
        if batch_hook is not None:
            batch_hook(train_idx[pos], imgs)

    stats = train_head(
        model, train, spec.resolution, mean, std, epochs=epochs, lr=lr, batch_size=batch_size,
        unfreeze_last_block=unfreeze_last_block, device=dev, seed=seed, progress=progress, batch_hook=hook,
    )
    post = _accuracy(model, holdout, spec.resolution, mean, std, dev)
    model = model.cpu().eval()

    holdout_sha = indices_sha256(holdout_idx)
    card: dict[str, Any] = {
        "kind": "kdsearch-student-finetune",
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
    stage = staging_dir(out)
    try:
        sha = save_student(model, spec, stage / "model.safetensors", {"finetuned_from": source_sha})
        files = {"model.safetensors": sha}
        card["files"] = dict(files)
        atomic_write_text(stage / "card.json", json.dumps(card, indent=1, default=str) + "\n")
        all_files = dict(files)
        all_files["card.json"] = sha256_file(stage / "card.json")
        atomic_write_text(stage / "README.md", _readme(card, all_files))
        all_files["README.md"] = sha256_file(stage / "README.md")
        publish_dir(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return FinetuneResult(
        out_dir=out, pre_accuracy=pre, post_accuracy=post, epochs=epochs, lr=lr, n_train=len(train_idx),
        n_holdout=len(holdout_idx), source_sha256=source_sha, holdout_indices_sha256=holdout_sha, files=all_files,
        card=card, train_indices=train_idx, holdout_indices=holdout_idx,
    )
