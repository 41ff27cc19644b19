"""Head training (fine-tuning after distillation): train a distilled student's classifier on new data, features frozen.

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

One implementation serves the per-trial ``finetune:`` stage of the search
(:func:`finetune_model`: train on ``bundle.finetune``, score on a held-out split) and
``kdsearch finetune`` (:mod:`kdsearch.finetune`, which calls :func:`train_head` on an exported
student).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "WEIGHT_DECAY",
    "EVAL_BATCH",
    "Progress",
    "BatchHook",
    "trainable_parameters",
    "in_memory_split",
    "train_head",
    "heldout_accuracy",
    "finetune_model",
]

WEIGHT_DECAY = 1e-4  # AdamW weight decay of head training
EVAL_BATCH = 512  # images per forward pass when scoring the held-out split

Progress = Callable[[float, str], None]  # (fraction done in [0, 1], message)
BatchHook = Callable[[torch.Tensor, torch.Tensor], None]  # (positions in the train split, uint8 images)


def trainable_parameters(model: nn.Module, unfreeze_last_block: bool = False) -> list[nn.Parameter]:
    """The parameters head training trains: ``model.head`` (+ ``model.last_block``)."""
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


def in_memory_split(split: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 [N, 3, H, W], labels int64 [N])`` of a split held in memory; ValueError otherwise."""
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

    ``resolution`` is the student's input side (px); ``mean``/``std`` its normalisation (0..1
    scale). ``model`` must already be on ``device``. ``batch_hook(positions, images_u8)`` sees
    every training batch before it is used (tests prove held-out images never appear). Returns
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
    images, labels = in_memory_split(train_split, "training")
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


def heldout_accuracy(model: nn.Module, split: Any, resolution: int, mean: Sequence[float], std: Sequence[float],
                     device: torch.device | str) -> float:
    """Top-1 accuracy (fraction) of ``model`` on an in-memory held-out ``split``."""
    from kdsearch.measure.accuracy import evaluate_accuracy

    in_memory_split(split, "held-out")
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
    """Held-out accuracy (fractions) before and after training the head on ``train_split``.

    ``train_split`` and ``holdout_split`` have uint8 ``.images`` and int64 ``.labels`` (e.g.
    :class:`kdsearch.data.ImageSplit`) and must not share images. By default a copy of
    ``model`` is trained, so the caller's model (the trial's distilled student, whose
    checkpoint and metrics the search stores) is untouched; ``in_place=True`` trains ``model``.
    """
    dev = torch.device(device)
    work = model if in_place else copy.deepcopy(model)
    work.to(dev)
    pre = heldout_accuracy(work, holdout_split, resolution, mean, std, dev)
    train_head(
        work, train_split, resolution, mean, std, epochs=epochs, lr=lr, batch_size=batch_size,
        unfreeze_last_block=unfreeze_last_block, device=dev, seed=seed, progress=progress, batch_hook=batch_hook,
    )
    post = heldout_accuracy(work, holdout_split, resolution, mean, std, dev)
    return pre, post
