"""Inference latency: CUDA events on the GPU, ``time.perf_counter`` on the CPU, adaptive repeats.

One *repeat* is one synchronised forward pass of a fixed random batch. Before timing, the model
runs up to ``cfg.warmup`` untimed forwards, and at most ``cfg.max_time_s`` seconds of them (on
CUDA first a few more so that cuDNN's autotuner, switched on with
``torch.backends.cudnn.benchmark``, settles on kernels for this exact shape). Timing then runs at
least ``cfg.min_repeats`` repeats and goes on until the spread is small
(IQR / median < ``cfg.target_iqr_ratio``), or ``cfg.max_repeats`` repeats, or ``cfg.max_time_s``
seconds of timed repeats -- whichever comes first. The median is the figure stored; p90, IQR, mean
and min are stored beside it.

A hard budget (``budget_s``, the part of ``measure.max_time`` left) bounds everything, warm-ups
included. Each forward is timed, the first one too, so after every forward the cost still to pay
(the warm-ups left plus the missing minimum repeats, at the fastest forward seen so far) is
known. When it cannot finish inside the budget the measurement stops at once and raises
:class:`OverBudget` with that estimate; the caller stores the figure as missing with the reason.
With ``expected_forward_s`` (e.g. extrapolated from a smaller batch) a hopeless measurement is
refused before its first forward. Repeats done past ``min_repeats`` stop at the deadline
(``stop_reason`` ``"budget"``).

Why not ``torch.utils.benchmark.Timer``: its ``adaptive_autorange`` reports means of blocks, not
one sample per forward (p90 and IQR need those), times CUDA with wall clock plus synchronize
rather than CUDA events, and has no deadline that counts warm-ups. It is the reference this
timer is checked against (``tests/measure/test_latency.py``, GPU-marked).

Inference is fp32 in eval mode under ``torch.inference_mode``; the input is channels-last when the
model's weights are (the CUDA KD loop leaves them so). On the CPU the thread count is pinned to
``cfg.cpu_threads`` for the duration and restored afterwards.
"""

from __future__ import annotations

import contextlib
import math
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

__all__ = [
    "LatencyResult",
    "OverBudget",
    "Timing",
    "eval_mode",
    "latency_result",
    "latency_stats",
    "measure_latency",
    "measure_latency_on_cpu",
    "time_forwards",
]

_CUDA_SETTLE_FORWARDS = 3  # untimed forwards that let cudnn.benchmark pick kernels for this shape


class OverBudget(Exception):
    """A measurement that cannot finish inside the time left; carries the estimate.

    ``estimate_s`` is the whole measurement's estimated cost (s), ``left_s`` the budget that was
    left when it was judged (s), ``forward_s`` the per-forward time the estimate used (s).
    """

    def __init__(self, what: str, estimate_s: float, left_s: float, forward_s: float, detail: str) -> None:
        self.what = what
        self.estimate_s = estimate_s
        self.left_s = left_s
        self.forward_s = forward_s
        self.detail = detail
        super().__init__(self.reason)

    @property
    def reason(self) -> str:
        """The stored missing-metric reason: ``over budget: <what> estimated X s (...) > Y s left ...``."""
        return (
            f"over budget: {self.what} estimated {self.estimate_s:.3g} s ({self.detail}) > "
            f"{max(self.left_s, 0.0):.3g} s left of measure.max_time"
        )


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
    warmup: int  # untimed forwards actually run (CUDA: the cuDNN settle forwards included)
    stop_reason: str  # "stable" | "max_repeats" | "max_time" | "budget"
    dtype: str = "float32"
    channels_last: bool = False
    first_forward_ms: float | None = None  # the first (cold) forward, timed
    budget_s: float | None = None  # the hard budget it ran under (None: none)
    elapsed_s: float = 0.0  # wall time of the whole measurement, warm-ups included

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


@dataclass
class _Plan:
    """The warm-up/repeat plan of one measurement and its running budget check."""

    cfg: LatencyConfig
    n_warmup: int  # untimed forwards wanted
    batch_size: int
    deadline: float | None  # perf_counter time the measurement must end by (None: no budget)
    t0: float  # perf_counter at the start
    fastest_s: float = math.inf  # fastest forward seen so far (s): the first is often cold

    def planned_warmups(self, forward_s: float) -> int:
        """Warm-ups the plan runs at ``forward_s`` per forward: ``n_warmup``, capped by ``max_time_s``."""
        if self.n_warmup <= 0:
            return 0
        return max(1, min(self.n_warmup, math.ceil(self.cfg.max_time_s / max(forward_s, 1e-9))))

    def check(self, forward_s: float, warm_done: int, repeats_done: int, warm_elapsed_s: float, *, warm_over: bool) -> None:
        """Raise :class:`OverBudget` when the warm-ups left plus the missing minimum repeats, at the
        fastest forward seen, cannot finish before the deadline."""
        self.fastest_s = min(self.fastest_s, forward_s)
        if self.deadline is None or repeats_done >= self.cfg.min_repeats:
            return
        t = self.fastest_s
        warm_left = 0
        if not warm_over:
            by_count = self.n_warmup - warm_done
            by_time = math.ceil(max(0.0, self.cfg.max_time_s - warm_elapsed_s) / max(t, 1e-9))
            warm_left = max(0, min(by_count, by_time))
        still = (warm_left + self.cfg.min_repeats - repeats_done) * t
        now = time.perf_counter()
        if now + still > self.deadline:
            raise self.over_budget(t, left_s=self.deadline - now, estimate_s=(now - self.t0) + still)

    def over_budget(self, forward_s: float, left_s: float, estimate_s: float | None = None) -> OverBudget:
        """The error for this plan: ``estimate_s`` defaults to the whole plan at ``forward_s``."""
        n_warm = self.planned_warmups(forward_s)
        if estimate_s is None:
            estimate_s = (n_warm + self.cfg.min_repeats) * forward_s
        detail = (
            f"{n_warm} warm-up + {self.cfg.min_repeats} repeats x {forward_s * 1e3:.4g} ms per forward"
        )
        return OverBudget(f"batch {self.batch_size}", estimate_s, left_s, forward_s, detail)


def _run_plan(forward_ms: Callable[[], float], plan: _Plan) -> tuple[list[float], str, int, float]:
    """Warm up, then time adaptively; every forward checks the budget. Returns
    (samples in ms, stop reason, warm-ups run, first forward in ms)."""
    cfg = plan.cfg
    first_ms = math.nan
    warm = 0
    t_warm = time.perf_counter()
    while warm < plan.n_warmup:
        ms = forward_ms()
        warm += 1
        if warm == 1:
            first_ms = ms
        elapsed = time.perf_counter() - t_warm
        over = warm >= plan.n_warmup or elapsed >= cfg.max_time_s
        plan.check(ms / 1e3, warm, 0, elapsed, warm_over=over)
        if over:
            break

    samples: list[float] = []
    t0 = time.perf_counter()
    while True:
        ms = forward_ms()
        samples.append(ms)
        if warm == 0 and len(samples) == 1:
            first_ms = ms
        n = len(samples)
        plan.check(ms / 1e3, warm, n, 0.0, warm_over=True)
        if n < cfg.min_repeats:
            continue
        if _stable(samples, cfg.target_iqr_ratio):
            return samples, "stable", warm, first_ms
        if n >= cfg.max_repeats:
            return samples, "max_repeats", warm, first_ms
        now = time.perf_counter()
        if now - t0 >= cfg.max_time_s:
            return samples, "max_time", warm, first_ms
        if plan.deadline is not None and now >= plan.deadline:
            return samples, "budget", warm, first_ms


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
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for the block, then back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass
class Timing:
    """What :func:`time_forwards` saw: every timed repeat (ms), why it stopped, the untimed
    warm-ups it ran, the first (cold) forward (ms) and its wall time, warm-ups included (s)."""

    samples_ms: list[float]
    stop_reason: str  # "stable" | "max_repeats" | "max_time" | "budget"
    warmup: int
    first_forward_ms: float | None
    elapsed_s: float


def time_forwards(
    forward_ms: Callable[[], float],
    batch_size: int,
    cfg: LatencyConfig,
    *,
    extra_warmup: int = 0,
    budget_s: float | None = None,
    expected_forward_s: float | None = None,
) -> Timing:
    """Warm up and time ``forward_ms`` (one synchronised forward of ``batch_size`` images; returns
    its duration in ms) with the plan of the module docstring: ``cfg.warmup + extra_warmup``
    untimed forwards, then adaptive repeats, all under the hard ``budget_s`` (s).

    Any runtime can be timed this way (PyTorch on CPU or CUDA here, ONNX Runtime in
    :mod:`kdsearch.measure.runtime_ort`). Raises :class:`OverBudget` as described there;
    ``expected_forward_s`` (s) refuses a hopeless measurement before its first forward.
    """
    t_start = time.perf_counter()
    deadline = None if budget_s is None else t_start + max(0.0, budget_s)
    plan = _Plan(cfg, cfg.warmup + extra_warmup, batch_size, deadline, t_start)
    if deadline is not None and expected_forward_s is not None:
        cost = (plan.planned_warmups(expected_forward_s) + cfg.min_repeats) * expected_forward_s
        if cost > deadline - time.perf_counter():
            raise plan.over_budget(expected_forward_s, deadline - time.perf_counter())
    samples, stop, warm, first_ms = _run_plan(forward_ms, plan)
    return Timing(
        samples_ms=samples,
        stop_reason=stop,
        warmup=warm,
        first_forward_ms=None if math.isnan(first_ms) else first_ms,
        elapsed_s=time.perf_counter() - t_start,
    )


def measure_latency(
    model: nn.Module,
    resolution: int,
    batch_size: int,
    device: torch.device | str,
    cfg: LatencyConfig,
    in_chans: int = 3,
    *,
    budget_s: float | None = None,
    expected_forward_s: float | None = None,
) -> LatencyResult:
    """Median latency (ms) of one forward of ``batch_size`` images of ``resolution`` px on ``device``.

    ``model`` must already live on ``device`` (use :func:`measure_latency_on_cpu` to time a CUDA
    model on the CPU without moving it). ``budget_s`` (s) is a hard cap on the whole call,
    warm-ups included; ``expected_forward_s`` (s) lets a measurement that cannot fit be refused
    before its first forward. Both raise :class:`OverBudget` (see the module docstring).
    """
    t_start = time.perf_counter()
    dev = resolve_device(device)
    dtype = model_dtype(model)
    channels_last = dev.type == "cuda" and uses_channels_last(model)
    x = example_input(batch_size, resolution, dev, dtype, in_chans, channels_last)
    extra = _CUDA_SETTLE_FORWARDS if dev.type == "cuda" else 0

    def timed(forward_ms: Callable[[], float]) -> Timing:
        return time_forwards(
            forward_ms, batch_size, cfg, extra_warmup=extra,
            budget_s=None if budget_s is None else budget_s - (time.perf_counter() - t_start),
            expected_forward_s=expected_forward_s,
        )

    with eval_mode(model), torch.inference_mode():
        if dev.type == "cuda":
            timing = _time_cuda(model, x, dev, timed)
            method, threads = "cuda-events", None
        else:
            with cpu_threads(cfg.cpu_threads):
                timing = _time_cpu(model, x, timed)
            method, threads = "perf_counter", cfg.cpu_threads
    return latency_result(
        timing, method=method, device=device_label(dev), threads=threads, batch_size=batch_size,
        dtype=str(dtype).removeprefix("torch."), channels_last=channels_last, budget_s=budget_s,
        elapsed_s=time.perf_counter() - t_start,
    )


def latency_result(
    timing: Timing,
    *,
    method: str,
    device: str,
    threads: int | None,
    batch_size: int,
    dtype: str = "float32",
    channels_last: bool = False,
    budget_s: float | None = None,
    elapsed_s: float | None = None,
) -> LatencyResult:
    """A :class:`LatencyResult` from a :class:`Timing` and how it was taken."""
    st = latency_stats(timing.samples_ms)
    return LatencyResult(
        median_ms=st["median_ms"],
        p90_ms=st["p90_ms"],
        iqr_ms=st["iqr_ms"],
        mean_ms=st["mean_ms"],
        min_ms=st["min_ms"],
        repeats=len(timing.samples_ms),
        method=method,
        device=device,
        threads=threads,
        batch_size=batch_size,
        warmup=timing.warmup,
        stop_reason=timing.stop_reason,
        dtype=dtype,
        channels_last=channels_last,
        first_forward_ms=timing.first_forward_ms,
        budget_s=budget_s,
        elapsed_s=timing.elapsed_s if elapsed_s is None else elapsed_s,
    )


def _time_cpu(model: nn.Module, x: torch.Tensor, timed: Callable[[Callable[[], float]], Timing]) -> Timing:
    def forward_ms() -> float:
        t = time.perf_counter()
        model(x)
        return (time.perf_counter() - t) * 1e3

    return timed(forward_ms)


def _time_cuda(
    model: nn.Module, x: torch.Tensor, dev: torch.device, timed: Callable[[Callable[[], float]], Timing]
) -> Timing:
    bench_before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        with torch.cuda.device(dev):
            stream = torch.cuda.current_stream(dev)
            torch.cuda.synchronize(dev)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)

            def forward_ms() -> float:
                start.record(stream)
                model(x)
                end.record(stream)
                end.synchronize()
                return float(start.elapsed_time(end))

            return timed(forward_ms)
    finally:
        torch.backends.cudnn.benchmark = bench_before


def measure_latency_on_cpu(
    model: nn.Module,
    resolution: int,
    batch_size: int,
    cfg: LatencyConfig,
    in_chans: int = 3,
    *,
    budget_s: float | None = None,
    expected_forward_s: float | None = None,
) -> LatencyResult:
    """CPU latency of a model that may live on CUDA: times a CPU copy, never moves the original.

    The copy's cost counts against ``budget_s``.
    """
    t0 = time.perf_counter()
    first = next(iter(model.parameters()), None)
    if first is None or first.device.type == "cpu":
        return measure_latency(
            model, resolution, batch_size, "cpu", cfg, in_chans,
            budget_s=budget_s, expected_forward_s=expected_forward_s,
        )
    copy_ = cpu_copy(model)
    left = None if budget_s is None else budget_s - (time.perf_counter() - t0)
    try:
        return measure_latency(
            copy_, resolution, batch_size, "cpu", cfg, in_chans,
            budget_s=left, expected_forward_s=expected_forward_s,
        )
    finally:
        del copy_
