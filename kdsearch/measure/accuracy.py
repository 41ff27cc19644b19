"""Top-1 accuracy of a model on a uint8 image split, with the evaluation preprocessing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kdsearch.measure._common import resolve_device, uses_channels_last

__all__ = ["evaluate_accuracy"]


def evaluate_accuracy(
    model: nn.Module,
    split: Any,
    resolution: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str,
    batch_size: int = 512,
    interpolation: str = "bilinear",
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """Fraction (0..1) of ``split`` whose arg-max logit equals the label.

    ``split`` has ``.images`` (uint8 ``[N, 3, H, W]``, on any device) and ``.labels`` (int64
    ``[N]``), e.g. a :class:`kdsearch.data.ImageSplit`. Each batch is moved to ``device`` and
    passed through :func:`kdsearch.data.augment.preprocess` (resize to ``resolution`` px with
    ``interpolation``, normalise with ``mean``/``std``; no crop or flip). Eval mode, inference mode;
    fp32 unless ``autocast_dtype`` (``torch.bfloat16`` / ``torch.float16``) asks for autocast on a
    CUDA device -- the distillation loop evaluates in its training precision, at a batch no
    larger than its training batch, so a validation never needs more memory than a training step.
    The model's train/eval mode is restored afterwards. ``model`` must already be on ``device``.
    """
    from kdsearch.data.augment import preprocess  # noqa: PLC0415 - data/ is optional at import time

    images, labels = split.images, split.labels
    n = int(labels.shape[0])
    if n == 0:
        raise ValueError("evaluate_accuracy: the split is empty")
    if int(images.shape[0]) != n:
        raise ValueError(f"evaluate_accuracy: {images.shape[0]} images but {n} labels")
    if batch_size < 1:
        raise ValueError(f"evaluate_accuracy: batch_size must be >= 1 (got {batch_size})")
    dev = resolve_device(device)
    channels_last = dev.type == "cuda" and uses_channels_last(model)
    use_autocast = autocast_dtype is not None and dev.type == "cuda"
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    was_training = model.training
    model.eval()
    try:
        amp = torch.autocast("cuda", dtype=autocast_dtype or torch.bfloat16, enabled=use_autocast)
        with torch.inference_mode(), amp:
            for i in range(0, n, batch_size):
                xb = images[i : i + batch_size].to(dev, non_blocking=True)
                yb = labels[i : i + batch_size].to(dev, non_blocking=True)
                x = preprocess(xb, resolution, mean, std, channels_last=channels_last, interpolation=interpolation)
                logits = model(x)
                correct += (logits.argmax(dim=1) == yb).sum()
    finally:
        model.train(was_training)
    return int(correct.item()) / n
