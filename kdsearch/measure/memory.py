"""Memory figures: stored model size, activation footprint, CUDA peak memory of inference and KD.

Units: every figure is in **MB = 10^6 bytes** (not MiB), as the ``_mb`` metric names say.

- :func:`model_size_mb` -- parameters + buffers at their stored dtype (exact, any device).
- :func:`activation_peak_mb` -- an analytic approximation of the activation footprint of one
  forward (any device, runs on a CPU copy): the largest, over leaf-module calls, of the bytes of
  that call's input tensors plus its output tensors. See its docstring for what it leaves out.
- :func:`peak_inference_memory_mb` -- what the CUDA caching allocator actually held at peak for
  one forward (CUDA only).
- :class:`KDMemoryTracker` -- the peak of the KD *training steps* only (the loop pauses it
  around every validation), above the baseline resident before the trial
  (``peak_kd_memory_mb``) and for the whole process (``peak_kd_memory_total_mb``). CUDA only; on
  the CPU both are missing with a reason. The counters are read through
  :class:`AllocatorCounters`, so the accounting is tested without a GPU.

``cudnn.benchmark`` (on while distilling: fixed shapes) makes cuDNN try several convolution
algorithms in the first steps; their workspaces are allocations through the caching allocator,
so they count in ``max_memory_allocated`` and therefore in the KD peak. That is deliberate: a
card must hold them to train the student this way. ``benchmarks/bench_memory.py`` measures the
peak with the autotuner on and off.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from kdsearch.measure.suite import Measurements

from kdsearch.measure._common import (
    BYTES_PER_MB,
    cpu_copy,
    device_label,
    example_input,
    meta_copy,
    model_dtype,
    resolve_device,
    uses_channels_last,
)

__all__ = [
    "CUDA_ONLY_REASON",
    "model_size_bytes",
    "model_size_mb",
    "activation_peak_mb",
    "peak_inference_memory_mb",
    "AllocatorCounters",
    "CudaAllocatorCounters",
    "KDMemoryTracker",
    "KD_MEMORY_METHOD",
    "CUDNN_NOTE",
]

CUDA_ONLY_REASON = "cpu: torch.cuda.max_memory_allocated is CUDA-only"


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer at its stored dtype; shared tensors count once.

    Buffers include BatchNorm running statistics and its int64 ``num_batches_tracked``.
    """
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def model_size_mb(model: nn.Module) -> float:
    """Parameters + buffers at their stored dtype, in MB (10^6 bytes). The checkpoint's tensor
    payload has this size; its small header is not counted."""
    return model_size_bytes(model) / BYTES_PER_MB


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)


def _unique_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``: an in-place op's output (the same
    tensor) and a view (same ``_base``) count once. Works on the meta device too."""
    by_base: dict[int, int] = {}
    for t in tensors:
        base = t._base if t._base is not None else t
        by_base[id(base)] = max(by_base.get(id(base), 0), base.untyped_storage().nbytes())
    return sum(by_base.values())


def _activation_peak_bytes(
    m: nn.Module, device: torch.device, resolution: int, batch_size: int, in_chans: int
) -> int:
    peak = 0

    def hook(_mod: nn.Module, inputs: Any, output: Any) -> None:
        nonlocal peak
        ts = list(_tensors(inputs)) + list(_tensors(output))
        peak = max(peak, _unique_bytes(ts))

    handles = [mod.register_forward_hook(hook) for mod in m.modules() if next(mod.children(), None) is None]
    try:
        m.eval()
        if device.type == "meta":
            x = torch.empty(batch_size, in_chans, resolution, resolution, dtype=model_dtype(m), device=device)
        else:
            x = example_input(batch_size, resolution, device, model_dtype(m), in_chans)
        # no_grad, not inference_mode: views of inference tensors do not record their ``_base``.
        with torch.no_grad():
            m(x)
    finally:
        for h in handles:
            h.remove()
    return peak


def activation_peak_mb(model: nn.Module, resolution: int, batch_size: int = 1, in_chans: int = 3) -> float:
    """Largest activation footprint of one forward, in MB (10^6 bytes), by a simple rule.

    What it computes, exactly: a forward hook on every *leaf* module (one with no children) sees
    that call's input and output tensors. For each call the bytes of the distinct storages behind
    them are summed (an in-place ReLU's output is its input and counts once; so does a view such
    as ``Flatten``'s output). The result is the maximum of that sum over all leaf calls, at the
    model's parameter dtype, for a batch of ``batch_size`` images of ``resolution`` px.

    It is the memory an inference engine that frees each tensor as soon as the next layer has
    consumed it needs for activations; weights are not included (see :func:`model_size_mb`).
    It does not see skip connections kept alive across layers, tensors made by functional calls in
    a non-leaf ``forward`` (``F.relu``, ``x.flatten()``), or framework workspaces. For the plain
    feed-forward CNN students it is the real lower bound; for others it is an approximation.

    Runs on a ``meta``-device copy (shapes only, no arithmetic, so it costs milliseconds even for
    VGG-19 at 224 px), falling back to a CPU copy for a model with an op that has no meta kernel.
    The original model is untouched.
    """
    try:
        peak = _activation_peak_bytes(
            meta_copy(model), torch.device("meta"), resolution, batch_size, in_chans
        )
    except Exception:  # noqa: BLE001 - an op without a meta kernel: do the real arithmetic
        peak = _activation_peak_bytes(cpu_copy(model), torch.device("cpu"), resolution, batch_size, in_chans)
    return peak / BYTES_PER_MB


def peak_inference_memory_mb(
    model: nn.Module,
    resolution: int,
    batch_size: int,
    device: torch.device | str,
    in_chans: int = 3,
) -> float:
    """CUDA memory one inference forward needs, in MB (10^6 bytes): the model's parameters and
    buffers plus the allocator's peak growth during the forward (input, activations, workspaces).

    Measured with ``torch.cuda.reset_peak_memory_stats`` / ``max_memory_allocated`` around one
    forward after two warm-up forwards (so cuDNN autotuning's trial workspaces are not counted).
    Memory the process holds for other things (device-resident data, teacher logits) is left out
    by subtracting what was allocated before the forward. Raises ``ValueError`` on a CPU device:
    callers record :data:`CUDA_ONLY_REASON` instead.
    """
    dev = resolve_device(device)
    if dev.type != "cuda":
        raise ValueError(CUDA_ONLY_REASON)
    dtype = model_dtype(model)
    channels_last = uses_channels_last(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), torch.cuda.device(dev):
            x = example_input(batch_size, resolution, dev, dtype, in_chans, channels_last)
            for _ in range(2):
                model(x)
            del x
            torch.cuda.synchronize(dev)
            before = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            x = example_input(batch_size, resolution, dev, dtype, in_chans, channels_last)
            out = model(x)
            torch.cuda.synchronize(dev)
            peak = torch.cuda.max_memory_allocated(dev)
            del out, x
    finally:
        model.train(was_training)
    return (model_size_bytes(model) + max(0, peak - before)) / BYTES_PER_MB


class AllocatorCounters(Protocol):
    """What :class:`KDMemoryTracker` reads: a device allocator's current and peak bytes.

    :class:`CudaAllocatorCounters` reads the CUDA caching allocator; tests pass a fake.
    """

    def synchronize(self) -> None: ...

    def allocated_bytes(self) -> int: ...

    def peak_bytes(self) -> int: ...

    def reset_peak(self) -> None: ...


class CudaAllocatorCounters:
    """:class:`AllocatorCounters` of the CUDA caching allocator on one device
    (``memory_allocated`` / ``max_memory_allocated`` / ``reset_peak_memory_stats``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def allocated_bytes(self) -> int:
        return int(torch.cuda.memory_allocated(self.device))

    def peak_bytes(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device))

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)


KD_MEMORY_METHOD = (
    "torch.cuda.max_memory_allocated over the KD training steps (peak counter reset when each "
    "training segment starts, read when it ends; in-loop validation excluded)"
)
CUDNN_NOTE = (
    "includes cuDNN workspaces: they are caching-allocator allocations, and with "
    "cudnn.benchmark the autotuner's trial workspaces of the first steps count too"
)


class KDMemoryTracker:
    """Peak device memory of the KD *training steps*, above and including what was resident.

    ``start()`` (at trial start, before the student reaches the device) records the baseline:
    what the allocator holds then -- the resident train/val/test data and the teacher cache
    (the teacher itself has left the device once its cache was built). ``distill()`` then calls
    ``pause()`` when its training clock stops for a validation and ``resume()`` when it restarts,
    so the evaluation pass never enters the figure. ``stop()`` ends the window.

    * ``total_mb`` (``peak_kd_memory_total_mb``): the largest allocator peak over the training
      segments, in MB (10^6 bytes) -- everything the process held at that moment;
    * ``value_mb`` (``peak_kd_memory_mb``): ``total_mb - baseline_mb``, what training this
      student needs on top of the data: its weights, gradients, optimiser state, activations,
      the per-step batch and targets, and cuDNN workspaces (see :data:`CUDNN_NOTE`).

    The counters come from ``counters`` (:class:`AllocatorCounters`); by default the CUDA
    caching allocator on a CUDA device. On a CPU device without counters both figures are
    ``None`` and ``reason`` says why.

    Usable as a context manager::

        with KDMemoryTracker(device) as mem:
            distill(..., meters=(mem,))
        attrs["peak_kd_memory_mb"] = mem.value_mb
    """

    def __init__(self, device: torch.device | str, counters: AllocatorCounters | None = None) -> None:
        self.device = resolve_device(device)
        if counters is None and self.device.type == "cuda":
            counters = CudaAllocatorCounters(self.device)
        self.counters = counters
        self.value_mb: float | None = None
        self.total_mb: float | None = None
        self.baseline_mb: float | None = None
        self.segments = 0  # training segments seen (one per evaluation, plus the first)
        self.reason: str | None = None if counters is not None else CUDA_ONLY_REASON
        self._started = False
        self._open = False
        self._baseline_bytes = 0
        self._peak_bytes: int | None = None

    @property
    def available(self) -> bool:
        return self.counters is not None

    def start(self) -> KDMemoryTracker:
        """Record the baseline and open the first training segment."""
        if self.counters is not None:
            self.counters.synchronize()
            self._baseline_bytes = self.counters.allocated_bytes()
            self.baseline_mb = self._baseline_bytes / BYTES_PER_MB
            self._peak_bytes = None
        self._started = True
        self._open = False
        self.resume()
        return self

    def pause(self) -> None:
        """Close the current training segment (its peak is kept); a no-op when none is open."""
        if not self._open:
            return
        self._open = False
        if self.counters is not None:
            self.counters.synchronize()
            peak = self.counters.peak_bytes()
            self._peak_bytes = peak if self._peak_bytes is None else max(self._peak_bytes, peak)
            self._publish()

    def resume(self) -> None:
        """Open a training segment: the allocator's peak counter restarts from what is held now."""
        if not self._started:
            raise RuntimeError("KDMemoryTracker.resume() called before start()")
        if self._open:
            return
        self._open = True
        self.segments += 1
        if self.counters is not None:
            self.counters.synchronize()
            self.counters.reset_peak()

    def stop(self) -> float | None:
        """End the window (closing an open segment) and return ``value_mb``."""
        if not self._started:
            raise RuntimeError("KDMemoryTracker.stop() called before start()")
        self.pause()
        return self.value_mb

    def _publish(self) -> None:
        assert self._peak_bytes is not None
        self.total_mb = self._peak_bytes / BYTES_PER_MB
        self.value_mb = max(0, self._peak_bytes - self._baseline_bytes) / BYTES_PER_MB
        self.reason = None

    def method(self) -> dict[str, Any]:
        """The method record stored under ``methods["peak_kd_memory_mb"]`` (and ``..._total_mb``)."""
        if not self.available:
            return {"method": "unavailable", "device": device_label(self.device), "reason": self.reason}
        return {
            "method": KD_MEMORY_METHOD,
            "device": device_label(self.device),
            "baseline_mb": self.baseline_mb,
            "baseline": "allocated at trial start: resident data and teacher cache (teacher off the device)",
            "peak_total_mb": self.total_mb,
            "peak_above_baseline_mb": self.value_mb,
            "segments": self.segments,
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "workspaces": CUDNN_NOTE,
            "unit": "MB (1e6 bytes)",
        }

    def store_metrics(self, m: Measurements) -> None:
        """Set ``peak_kd_memory_mb`` (above the baseline) and ``peak_kd_memory_total_mb`` in ``m``,
        one method record for both; missing with the reason when nothing was measured."""
        how = self.method()
        for name, value in (("peak_kd_memory_mb", self.value_mb), ("peak_kd_memory_total_mb", self.total_mb)):
            if value is not None:
                m.set(name, value, how)
            else:
                m.set_missing(name, str(self.reason or "no training segment was measured"), how)

    def __enter__(self) -> KDMemoryTracker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        # Read the peak even when KD raised (an OOM's peak is informative); never mask the error.
        try:
            self.stop()
        except Exception:  # noqa: BLE001 - a broken CUDA context must not hide the KD error
            if exc[0] is None:
                raise
