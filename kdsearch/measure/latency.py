"""Inference latency: CUDA events on the GPU, ``time.perf_counter`` on the CPU, adaptive repeats.

One *repeat* is one synchronised forward pass of a fixed random batch. Before timing, the model
runs ``cfg.warmup`` untimed forwards (on CUDA first a few more so that cuDNN's autotuner, switched
on with ``torch.backends.cudnn.benchmark``, settles on kernels for this exact shape). Timing then
runs at least ``cfg.min_repeats`` repeats and goes on until the spread is small
(IQR / median < ``cfg.target_iqr_ratio``), or ``cfg.max_repeats`` repeats, or ``cfg.max_time_s``
seconds of timed repeats -- whichever comes first. The median is the figure stored; p90, IQR, mean
and min are stored beside it.

Inference is fp32 in eval mode under ``torch.inference_mode``; the input is channels-last when the
model's weights are (the CUDA KD loop leaves them so). On the CPU the thread count is pinned to
``cfg.cpu_threads`` for the duration and restored afterwards.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from kdsearch.config import LatencyConfig
from kdsearch.measure._common import (
    cpu_copy,
    device_label,
    example_input,
    model_dtype,
    percentile,
    resolve_device,
    uses_channels_last,
)

__all__ = ["LatencyResult", "measure_latency", "measure_latency_on_cpu", "latency_stats"]

_CUDA_SETTLE_FORWARDS = 3  # untimed forwards that let cudnn.benchmark pick kernels for this shape


@dataclass
class LatencyResult:
    """Latency of one forward pass of ``batch_size`` images, in milliseconds."""

    median_ms: float
    p90_ms: float
    iqr_ms: float  # 75th minus 25th percentile
    mean_ms: float
    min_ms: float
    repeats: int
    method: str  # "cuda-events" | "perf_counter"
    device: str  # "cuda:0 <name>" | "cpu"
    threads: int | None  # torch CPU threads during timing (None on CUDA)
    batch_size: int
    warmup: int
    stop_reason: str  # "stable" | "max_repeats" | "max_time"
    dtype: str = "float32"
    channels_last: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def latency_stats(samples_ms: list[float]) -> dict[str, float]:
    """median, p90, IQR, mean and min of a list of timings (ms)."""
    s = sorted(samples_ms)
    return {
        "median_ms": percentile(s, 50.0),
        "p90_ms": percentile(s, 90.0),
        "iqr_ms": percentile(s, 75.0) - percentile(s, 25.0),
        "mean_ms": sum(s) / len(s),
        "min_ms": s[0],
    }


def _stable(samples_ms: list[float], target_iqr_ratio: float) -> bool:
    st = latency_stats(samples_ms)
    return st["median_ms"] > 0 and st["iqr_ms"] / st["median_ms"] < target_iqr_ratio


def _adaptive_repeats(time_one: Callable[[], float], cfg: LatencyConfig) -> tuple[list[float], str]:
    """Run ``time_one`` (returns ms) at least ``min_repeats`` times, then until stable or a cap."""
    samples: list[float] = []
    t0 = time.perf_counter()
    while True:
        samples.append(time_one())
        n = len(samples)
        if n < cfg.min_repeats:
            continue
        if _stable(samples, cfg.target_iqr_ratio):
            return samples, "stable"
        if n >= cfg.max_repeats:
            return samples, "max_repeats"
        if time.perf_counter() - t0 >= cfg.max_time_s:
            return samples, "max_time"


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Pin ``torch.set_num_threads(n)`` for the block, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def measure_latency(
    model: nn.Module,
    resolution: int,
    batch_size: int,
    device: torch.device | str,
    cfg: LatencyConfig,
    in_chans: int = 3,
) -> LatencyResult:
    """Median latency (ms) of one forward of ``batch_size`` images of ``resolution`` px on ``device``.

    ``model`` must already live on ``device`` (use :func:`measure_latency_on_cpu` to time a CUDA
    model on the CPU without moving it).
    """
    dev = resolve_device(device)
    dtype = model_dtype(model)
    channels_last = dev.type == "cuda" and uses_channels_last(model)
    x = example_input(batch_size, resolution, dev, dtype, in_chans, channels_last)
    with _eval_mode(model), torch.inference_mode():
        if dev.type == "cuda":
            samples, stop = _time_cuda(model, x, dev, cfg)
            method, threads = "cuda-events", None
        else:
            with cpu_threads(cfg.cpu_threads):
                samples, stop = _time_cpu(model, x, cfg)
            method, threads = "perf_counter", cfg.cpu_threads
    st = latency_stats(samples)
    return LatencyResult(
        median_ms=st["median_ms"],
        p90_ms=st["p90_ms"],
        iqr_ms=st["iqr_ms"],
        mean_ms=st["mean_ms"],
        min_ms=st["min_ms"],
        repeats=len(samples),
        method=method,
        device=device_label(dev),
        threads=threads,
        batch_size=batch_size,
        warmup=cfg.warmup,
        stop_reason=stop,
        dtype=str(dtype).removeprefix("torch."),
        channels_last=channels_last,
    )


def _time_cpu(model: nn.Module, x: torch.Tensor, cfg: LatencyConfig) -> tuple[list[float], str]:
    for _ in range(cfg.warmup):
        model(x)

    def time_one() -> float:
        t = time.perf_counter()
        model(x)
        return (time.perf_counter() - t) * 1e3

    return _adaptive_repeats(time_one, cfg)


def _time_cuda(
    model: nn.Module, x: torch.Tensor, dev: torch.device, cfg: LatencyConfig
) -> tuple[list[float], str]:
    bench_before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        with torch.cuda.device(dev):
            stream = torch.cuda.current_stream(dev)
            for _ in range(_CUDA_SETTLE_FORWARDS + cfg.warmup):
                model(x)
            torch.cuda.synchronize(dev)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)

            def time_one() -> float:
                start.record(stream)
                model(x)
                end.record(stream)
                end.synchronize()
                return float(start.elapsed_time(end))

            return _adaptive_repeats(time_one, cfg)
    finally:
        torch.backends.cudnn.benchmark = bench_before


def measure_latency_on_cpu(
    model: nn.Module, resolution: int, batch_size: int, cfg: LatencyConfig, in_chans: int = 3
) -> LatencyResult:
    """CPU latency of a model that may live on CUDA: times a CPU copy, never moves the original."""
    first = next(iter(model.parameters()), None)
    if first is None or first.device.type == "cpu":
        return measure_latency(model, resolution, batch_size, "cpu", cfg, in_chans)
    copy_ = cpu_copy(model)
    try:
        return measure_latency(copy_, resolution, batch_size, "cpu", cfg, in_chans)
    finally:
        del copy_
