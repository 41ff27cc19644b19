"""Online teacher: run the teacher on each batch's exact views (no cache).

For augmentations that cannot be cached, or to check the cache: given the same ``(dy, dx, flip)``
views and uint8 images, it computes what :func:`~kdsearch.distill.build_or_load_cache` stores
(same input size, normalisation, eval mode, the same precision: bf16 autocast on CUDA unless
``dtype`` says otherwise), only in fp32 instead of fp16.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kdsearch.data import ViewSpec, apply_views
from kdsearch.distill.precision import autocast_dtype

if TYPE_CHECKING:
    from kdsearch.models import LoadedTeacher

__all__ = ["OnlineTeacher"]


class OnlineTeacher:
    """Teacher logits computed on the fly; counts its forward passes (``teacher_forward_count``)."""

    def __init__(self, teacher: LoadedTeacher, view_spec: ViewSpec, dtype: str | None = None) -> None:
        self.teacher = teacher
        self.view_spec = view_spec
        # "bf16" | "fp16" | "fp32" (kdsearch.distill.precision); None: bf16 autocast on CUDA
        self.dtype = dtype
        self.teacher_forward_count = 0  # forward passes (batches) run so far
        teacher.model.eval()

    @property
    def num_classes(self) -> int:
        return int(self.teacher.num_classes)

    def teacher_logits(self, views: torch.Tensor, images_u8: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``[B, C]`` of the teacher on ``images_u8`` (uint8 ``[B, 3, S, S]``) seen
        through ``views`` (int16 ``[B, 3]``), at the teacher's input size and normalisation."""
        t = self.teacher
        use_cuda = images_u8.device.type == "cuda"
        amp_dtype = (autocast_dtype(self.dtype) if self.dtype is not None else torch.bfloat16) if use_cuda else None
        amp = torch.autocast("cuda", dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None)
        with torch.inference_mode(), amp:
            x = apply_views(images_u8, views, self.view_spec, t.input_size, t.mean, t.std,
                            interpolation=t.interpolation)
            logits = t.model(x).float()
        self.teacher_forward_count += 1
        # Leave inference mode: the result feeds a loss whose graph autograd records.
        return logits.clone()
