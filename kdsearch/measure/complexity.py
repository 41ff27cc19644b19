"""Operation and parameter counts with ptflops.

``macs`` is ptflops' ``pytorch`` backend with its module hooks only
(``backend_specific_config={"count_functional": False}``), for one image:

==============================  ===================================================
module                          MACs counted
==============================  ===================================================
Conv2d                          Cout*Hout*Wout*(Cin/groups)*kh*kw (+ Cout*Hout*Wout bias)
Linear                          in*out (+ out bias) per row
BatchNorm2d (affine)            2 * input elements
ReLU / GELU / ...               output elements
MaxPool2d / AvgPool2d / Adapt.  input elements
MultiheadAttention, LayerNorm   ptflops' formulas
``a @ b``, matmul, bmm, mm       out elements * inner dim   (kdsearch, see below)
F.scaled_dot_product_attention  batch*heads*L*S*(E + Ev)   (kdsearch, see below)
==============================  ===================================================

Why this backend and setting (checked on ptflops 0.7.5): the ``aten`` backend counts only
``aten.convolution`` and matrix products, so BatchNorm, activations and pooling are missing; the
``pytorch`` backend with its default ``count_functional=True`` counts every ``nn.ReLU`` and
``nn.MaxPool2d`` twice (the module hook plus the patched ``F.relu`` / ``F.max_pool2d`` it calls).
With module hooks only, every layer is counted once. Neither setting sees the attention products
of a timm ViT (``F.scaled_dot_product_attention``, or ``q @ k.transpose`` when not fused), so a
``TorchFunctionMode`` counts top-level matrix products and SDPA calls during the same forward and
adds them (calls made *inside* another torch function, e.g. inside ``nn.MultiheadAttention``'s
functional forward that ptflops already counts, are not seen by the mode, so nothing is counted
twice). Other functional calls in a ``forward`` (``F.relu(x)``, softmax, additions) are not
counted: students should use modules for them.

``params`` counts every parameter, trainable or frozen (ptflops counts only ``requires_grad``
ones; the copy it runs on has grad switched on for all).
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from kdsearch.measure._common import cpu_copy, meta_copy

__all__ = ["measure_complexity", "PTFLOPS_BACKEND"]

PTFLOPS_BACKEND = "pytorch"


_MATMULS = {
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.bmm,
    torch.Tensor.bmm,
    torch.mm,
    torch.Tensor.mm,
}


class _FunctionalMacs(TorchFunctionMode):
    """Counts MACs of top-level matrix products and scaled-dot-product attention."""

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _MATMULS and len(args) >= 1 and isinstance(out, torch.Tensor):
            a = args[0]
            if isinstance(a, torch.Tensor) and a.dim() >= 1:
                self.macs += out.numel() * a.shape[-1]
        elif func is F.scaled_dot_product_attention:
            q = args[0] if args else kwargs["query"]
            k = args[1] if len(args) > 1 else kwargs["key"]
            v = args[2] if len(args) > 2 else kwargs["value"]
            batch = q.numel() // (q.shape[-2] * q.shape[-1])
            self.macs += batch * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        return out


def _count(m: nn.Module, resolution: int, in_chans: int) -> tuple[int, int]:
    from ptflops import get_model_complexity_info  # noqa: PLC0415 - heavy import, only when measuring

    for p in m.parameters():
        p.requires_grad_(True)
    m.eval()
    sink = io.StringIO()
    functional = _FunctionalMacs()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), torch.no_grad(), functional:
        macs, params = get_model_complexity_info(
            m,
            (in_chans, resolution, resolution),
            as_strings=False,
            print_per_layer_stat=False,
            ost=sink,
            backend=PTFLOPS_BACKEND,
            backend_specific_config={"count_functional": False},
        )
    if macs is None or params is None:
        text = " ".join(sink.getvalue().split())[-300:]
        raise RuntimeError(f"ptflops could not count the model: {text}")
    return int(macs) + int(functional.macs), int(params)


def measure_complexity(model: nn.Module, resolution: int, in_chans: int = 3) -> tuple[int, int]:
    """``(macs, params)`` of one forward of one ``resolution`` x ``resolution`` image.

    ptflops adds hooks and attributes to the module it counts, so it runs on a copy: first a
    ``meta``-device copy (shapes only: milliseconds even for VGG-19 at 224 px), and, if some op
    has no meta kernel, a float32 CPU copy. Its printing is silenced. Raises ``RuntimeError`` if
    ptflops could not count.
    """
    try:
        return _count(meta_copy(model), resolution, in_chans)
    except Exception:  # noqa: BLE001 - retry with real arithmetic on the CPU
        return _count(cpu_copy(model, dtype=torch.float32), resolution, in_chans)
