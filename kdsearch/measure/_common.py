"""Small pieces shared by the measurement modules: devices, model copies, inputs, units."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

__all__ = [
    "BYTES_PER_MB",
    "resolve_device",
    "device_label",
    "unwrap_model",
    "cpu_copy",
    "meta_copy",
    "model_dtype",
    "uses_channels_last",
    "example_input",
    "percentile",
    "error_reason",
]

BYTES_PER_MB = 1_000_000
"""Every ``_mb`` figure in kdsearch is in MB = 10^6 bytes (not MiB)."""


def resolve_device(device: torch.device | str | int | None) -> torch.device:
    """``"cuda"`` -> ``cuda:<current>``, ints -> ``cuda:<i>``, ``None`` -> cpu."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, int):
        return torch.device("cuda", device)
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def device_label(device: torch.device) -> str:
    """``"cuda:0 NVIDIA H100 80GB HBM3"`` or ``"cpu"``: what a stored figure was measured on."""
    if device.type == "cuda":
        return f"cuda:{device.index} {torch.cuda.get_device_name(device)}"
    return device.type


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module behind a ``torch.compile`` wrapper (``OptimizedModule._orig_mod``)."""
    return getattr(model, "_orig_mod", model)


def cpu_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers live on the CPU.

    The original is not moved and no second copy is made on its device: every tensor is copied
    straight to host memory through the deepcopy memo. ``dtype`` casts floating tensors.
    """
    model = unwrap_model(model)
    memo: dict[int, Any] = {}
    for p in model.parameters():
        data = p.detach().to("cpu", copy=True)
        if dtype is not None and data.is_floating_point():
            data = data.to(dtype)
        memo[id(p)] = nn.Parameter(data, requires_grad=p.requires_grad)
    for b in model.buffers():
        data = b.detach().to("cpu", copy=True)
        if dtype is not None and data.is_floating_point():
            data = data.to(dtype)
        memo[id(b)] = data
    return copy.deepcopy(model, memo)


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` on the ``meta`` device: shapes and dtypes only, no data, no cost.

    Forward passes on it compute output shapes without arithmetic, which is all that operation
    and activation counting need.
    """
    model = unwrap_model(model)
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the first floating parameter (float32 for a parameterless module)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def uses_channels_last(model: nn.Module) -> bool:
    """True when the model's 4-D weights are stored channels-last (as the CUDA KD loop leaves them)."""
    for p in model.parameters():
        if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


def example_input(
    batch_size: int,
    resolution: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    in_chans: int = 3,
    channels_last: bool = False,
    seed: int = 0,
) -> torch.Tensor:
    """A standard-normal input ``[batch, in_chans, res, res]`` (never zeros: zeros can run faster)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch_size, in_chans, resolution, resolution, generator=gen, dtype=torch.float32)
    x = x.to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of an already sorted list, q in [0, 100]."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def error_reason(exc: BaseException) -> str:
    """``"error: <Type>: <first line of message>"``, the stored reason for a failed measurement."""
    msg = " ".join(str(exc).split())
    if len(msg) > 300:
        msg = msg[:297] + "..."
    return f"error: {type(exc).__name__}: {msg}"
