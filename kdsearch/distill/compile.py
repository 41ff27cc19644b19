"""``distill.compile``: compile the student before the training clock starts, and say whether it
compiled.

``torch.compile`` is lazy: left alone, it compiles inside the first training step, so the compile
time would eat the KD box, and after Dynamo's recompile limit (8 code-object variants by default)
a worker that has trained 8 architectures silently runs every later student eagerly, so
``kd_time_s`` would mix compiled and eager trials. Here, per trial:

* ``torch.compiler.reset()`` first: each trial starts with an empty Dynamo cache, so earlier
  students never count against the limit;
* one warm-up forward and backward pass on a batch of the training shape (the same autocast,
  memory format and batch size) compiles it, timed as ``compile_time_s``: set-up, outside the box
  and inside the supervisor's grace. The weights are untouched (no optimiser step, gradients
  dropped) and BatchNorm's running statistics are put back;
* Dynamo's own counters tell whether a frame was compiled; when none was (or compiling raised),
  the trial trains the eager model and stores why (``compile_reason``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["CompileInfo", "compile_for_training", "NOT_ASKED"]

NOT_ASKED = "distill.compile is off"


@dataclass(frozen=True)
class CompileInfo:
    """Whether the student trained compiled, why not, and the wall s the compiling warm-up took."""

    compiled: bool
    reason: str | None = None  # why it did not compile (None when it did)
    compile_time_s: float | None = None  # None when compiling was not asked for
    graph_breaks: int = 0  # Dynamo graph breaks (compiled, but in pieces)

    def to_attrs(self) -> dict[str, Any]:
        """The trial's user attrs: ``compiled``, ``compile_reason``, ``compile_time_s``, ``compile_graph_breaks``."""
        return {"compiled": self.compiled, "compile_reason": self.reason, "compile_time_s": self.compile_time_s,
                "compile_graph_breaks": self.graph_breaks}


def _dynamo_counters() -> Any:
    # Private, but Dynamo's only record of what it compiled; present from torch 2.0 to 2.14.
    from torch._dynamo.utils import counters  # noqa: PLC0415 - loads Dynamo only when compiling

    return counters


def _limit_text(text: str) -> bool:
    low = text.lower()
    return ("recompile" in low or "cache_size" in low or "cache size" in low) and "limit" in low


def _limit_hit(counters: Any) -> bool:
    """Whether Dynamo gave up on a frame at its recompile limit (it then runs eagerly, silently)."""
    return any(_limit_text(str(text)) for key in ("unimplemented", "graph_break") for text in counters.get(key, {}))


def _why_not_compiled(counters: Any) -> str:
    """A one-line reason from Dynamo's counters when the student did not compile."""
    texts = [str(t) for key in ("unimplemented", "graph_break") for t in counters.get(key, {})]
    for text in texts:
        if _limit_text(text):
            return f"Dynamo's recompile limit was reached: {' '.join(text.splitlines()[0].split())}"
    if texts:
        return f"Dynamo compiled no frame: {' '.join(texts[0].splitlines()[0].split())}"
    return "Dynamo compiled no frame (no reason recorded)"


def compile_for_training(
    model: nn.Module,
    shape: tuple[int, ...],
    device: torch.device | str,
    *,
    enabled: bool,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    backend: str | None = None,
) -> tuple[nn.Module, CompileInfo]:
    """``(the module to train, what happened)``. ``shape`` is the training batch's shape (the
    warm-up batch is random, on ``device``, channels-last when training is); ``amp_dtype`` the
    training autocast dtype (None: fp32); ``backend`` a ``torch.compile`` backend (None: its
    default, inductor). Off (``enabled`` False): the model itself, ``compiled`` False."""
    if not enabled:
        return model, CompileInfo(False, NOT_ASKED, None)
    device = torch.device(device)
    torch.compiler.reset()  # a fresh Dynamo cache per trial: the recompile limit counts this student only
    counters = _dynamo_counters()
    counters.clear()
    saved = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    compiled = torch.compile(model, backend=backend) if backend else torch.compile(model)
    t0 = time.perf_counter()
    error: str | None = None
    # The random state is put back too: compiling or not draws the same dropout masks in training.
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        example = torch.randn(*shape, device=device)
        if channels_last:
            example = example.contiguous(memory_format=torch.channels_last)
        try:
            with torch.autocast("cuda", dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                out = compiled(example)
            out.float().sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as exc:  # noqa: BLE001 - a compiler failure trains eagerly, and says so
            error = f"compiling failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    elapsed = time.perf_counter() - t0
    with torch.no_grad():  # the warm-up leaves no trace: BatchNorm statistics back, no gradients
        for name, buf in model.named_buffers():
            if name in saved:
                buf.copy_(saved[name])
    model.zero_grad(set_to_none=True)
    del example
    if error is not None:
        return model, CompileInfo(False, error, elapsed)
    frames_ok = int(counters["frames"].get("ok", 0))
    breaks = int(sum(dict(counters.get("graph_break", {})).values()))
    if frames_ok == 0 or _limit_hit(counters):
        return model, CompileInfo(False, _why_not_compiled(counters), elapsed, breaks)
    return compiled, CompileInfo(True, None, elapsed, breaks)
