"""Which floating-point precision training (and the teacher) runs in, on this device.

bf16 autocast is what Ampere and newer GPUs (compute capability 8.0 and up) do natively, with no
loss scaling. Older cards have no bf16 tensor cores: ``torch.cuda.is_bf16_supported()`` still
answers True there by default (``including_emulation=True`` only tries to make a bf16 tensor),
and training in emulated bf16 is far slower than fp16 + ``GradScaler`` by an amount that differs
per architecture, which would bias the front. So native support is asked without emulation, and
the choice is a pure function (:func:`select_train_dtype`) of the device type, its compute
capability, native bf16 support and ``distill.amp``:

=============  ====================  =========  ==================================================
device         compute capability    ``amp``    train dtype
=============  ====================  =========  ==================================================
cuda           >= 8.0, native bf16   true       ``bf16``: bf16 autocast, no loss scaling
cuda           7.0 - 7.x (or 8.0+    true       ``fp16``: fp16 autocast + ``torch.amp.GradScaler``
               without native bf16)
cuda           < 7.0                 true       ``fp32``: no tensor cores; fp16 math runs at 1/64
                                                the fp32 rate on consumer Pascal (6.1), so fp16
                                                autocast would only slow the box down
cuda           any                   false      ``fp32``
cpu (any)      any                   any        ``fp32`` (the CPU always trains in fp32)
=============  ====================  =========  ==================================================

The student's training, the teacher fit (:mod:`kdsearch.distill.fit`) and the teacher-cache
build (:mod:`kdsearch.distill.teacher_cache`) all take it from :func:`train_dtype_for`.

The choice is recorded with every trial (``train_dtype`` in its KD history and in the method of
``kd_time_s``) and enters the teacher-cache key: logits computed in another precision are
another cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch

__all__ = [
    "TrainDtype",
    "TRAIN_DTYPES",
    "BF16_MIN_CAPABILITY",
    "FP16_MIN_CAPABILITY",
    "select_train_dtype",
    "bf16_native",
    "train_dtype_for",
    "autocast_dtype",
    "autocast",
]

TrainDtype = Literal["bf16", "fp16", "fp32"]
TRAIN_DTYPES: tuple[str, ...] = ("bf16", "fp16", "fp32")
_TORCH: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


BF16_MIN_CAPABILITY: tuple[int, int] = (8, 0)
"""Native bf16 (tensor cores): Ampere and newer."""
FP16_MIN_CAPABILITY: tuple[int, int] = (7, 0)
"""fp16 tensor cores: Volta and newer. Below, fp16 autocast gains nothing and the study trains in fp32."""


def select_train_dtype(
    device_type: str, capability: tuple[int, int] | None, bf16_native: bool, amp: bool
) -> TrainDtype:
    """The training precision for a device type (``"cuda"``, ``"cpu"``, ...), its compute
    capability (``(major, minor)``; None when unknown), whether it supports bf16 natively (not
    emulated) and the study's ``distill.amp``: see the table in the module docstring."""
    if device_type != "cuda" or not amp:
        return "fp32"
    if capability is None:
        return "bf16" if bf16_native else "fp32"
    if bf16_native and tuple(capability) >= BF16_MIN_CAPABILITY:
        return "bf16"
    return "fp16" if tuple(capability) >= FP16_MIN_CAPABILITY else "fp32"


def bf16_native(device: torch.device) -> bool:
    """Whether the CUDA ``device`` runs bf16 natively: ``torch.cuda.is_bf16_supported`` WITHOUT
    emulation (its default also answers True where bf16 is only emulated)."""
    with torch.cuda.device(device):
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # a torch without the argument answered by capability alone
            return torch.cuda.get_device_capability(device) >= BF16_MIN_CAPABILITY


def train_dtype_for(device: torch.device | str, amp: bool) -> TrainDtype:
    """:func:`select_train_dtype` for a real device (asks torch for its compute capability and
    native bf16 support)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return select_train_dtype(dev.type, None, False, amp)
    capability = tuple(torch.cuda.get_device_capability(dev))
    return select_train_dtype(dev.type, (int(capability[0]), int(capability[1])), bf16_native(dev), amp)


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
