"""Which floating-point precision training (and the teacher) runs in, on this device.

bf16 autocast is what Ampere and Hopper GPUs do best, and it needs no loss scaling. Older cards
(Turing, Pascal: the paper's "8 GB consumer GPU" may be one) have no fast bf16, and
``torch.autocast(dtype=torch.bfloat16)`` is refused or emulated slowly there. kdsearch picks:

=============  ===================  =========  ===================================================
device         bf16 supported       ``amp``    train dtype
=============  ===================  =========  ===================================================
cuda           yes                  true       ``bf16``: bf16 autocast, no loss scaling
cuda           no                   true       ``fp16``: fp16 autocast + ``torch.amp.GradScaler``
cuda           any                  false      ``fp32``
cpu (any)      any                  any        ``fp32`` (the CPU always trains in fp32)
=============  ===================  =========  ===================================================

The choice is recorded with every trial (``train_dtype`` in its KD history and in the method of
``kd_time_s``) and enters the teacher-cache key: logits computed in another precision are
another cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch

__all__ = ["TrainDtype", "TRAIN_DTYPES", "select_train_dtype", "train_dtype_for", "autocast_dtype", "autocast"]

TrainDtype = Literal["bf16", "fp16", "fp32"]
TRAIN_DTYPES: tuple[str, ...] = ("bf16", "fp16", "fp32")
_TORCH: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def select_train_dtype(device_type: str, bf16_supported: bool, amp: bool) -> TrainDtype:
    """The training precision for a device type (``"cuda"``, ``"cpu"``, ...), whether that device
    supports bf16, and the study's ``distill.amp``: see the table in the module docstring."""
    if device_type != "cuda" or not amp:
        return "fp32"
    return "bf16" if bf16_supported else "fp16"


def train_dtype_for(device: torch.device | str, amp: bool) -> TrainDtype:
    """:func:`select_train_dtype` for a real device (asks ``torch.cuda.is_bf16_supported``)."""
    dev = torch.device(device)
    bf16 = False
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            bf16 = bool(torch.cuda.is_bf16_supported())
    return select_train_dtype(dev.type, bf16, amp)


def autocast_dtype(train_dtype: str) -> torch.dtype | None:
    """The autocast dtype of a train dtype, or None for fp32 (no autocast)."""
    if train_dtype not in TRAIN_DTYPES:
        raise ValueError(f"train dtype must be one of {', '.join(TRAIN_DTYPES)}, got {train_dtype!r}")
    return _TORCH.get(train_dtype)


@contextlib.contextmanager
def autocast(train_dtype: str, device: torch.device | str) -> Iterator[None]:
    """``torch.autocast`` on ``device`` for ``train_dtype``; a no-op for fp32 or a CPU device."""
    dev = torch.device(device)
    dtype = autocast_dtype(train_dtype)
    if dtype is None or dev.type != "cuda":
        yield
        return
    with torch.autocast("cuda", dtype=dtype):
        yield
