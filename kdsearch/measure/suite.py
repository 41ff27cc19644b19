"""The inference-side measurement suite: the fixed costs of a student's architecture.

A trial runs it once, on the untrained student before the box (latency, size and energy depend
on the architecture, not on the weights: :func:`kdsearch.search.screening.measure_fixed_costs`);
``kdsearch export`` and the paper scripts run it on trained students. :func:`measure_inference`
fills:

================================  ==================================================================
metric                            how
================================  ==================================================================
``latency_ms_b{N}``               median latency, batch N, on the trial's device (``"auto"``)
``latency_p90_ms_b{N}``           its 90th percentile
``latency_ms_b{N}_cpu``           on the CPU (a CPU copy when the trial runs on CUDA), if ``"cpu"``
                                  is in ``measure.latency.devices``; same for ``_cuda`` / ``"cuda"``
``latency_ms_b{N}_ort``           ONNX Runtime on the CPU (the student exported to ONNX once, in
                                  memory), if ``"ort-cpu"`` is listed; p90 beside it; the method
                                  records the runtime's version, provider, threads, optimisation
``peak_infer_memory_mb_b{N}``     CUDA allocator peak of one forward + weights (CUDA only)
``model_size_mb``                 parameters + buffers, MB = 10^6 bytes
``activation_peak_mb_b1``         largest leaf-module (input + output) footprint, batch 1
``macs``, ``params``              ptflops, one image
``infer_energy_mj_per_image_b{N}`` GPU board energy (Zeus) of a >= ``infer_min_time_s`` inference loop
                                  (and >= 20 counter updates) at batch N, per image (CUDA only)
``infer_energy_mj_per_image``     the same at the largest batch size
``infer_energy_mj_per_image_b{N}_cpu`` CPU package energy (RAPL through Zeus) of the same loop on a
                                  CPU copy, per image, beside ``latency_ms_b{N}_cpu`` (the edge
                                  figure); missing with the reason where RAPL is not readable
================================  ==================================================================

The whole phase runs under a hard time budget (``budget_s``, by default
``cfg.budget_s()``, i.e. ``measure.max_time``), warm-ups included, so measuring never pushes a
trial past its box + grace. The cheap figures run first; then latency per device, batch sizes in
ascending order: each (device, batch) measurement times its first forward and stops as soon as
its warm-ups plus minimum repeats cannot finish inside what is left; on the CPU a larger batch
is refused before its first forward when the smaller batch's time, scaled by the batch ratio,
says it cannot fit. Peak memory and energy (CUDA) are refused the same way from the latency
just measured. Each refused figure is missing with reason ``"over budget: ... estimated X s
(...) > Y s left of measure.max_time"``.

A figure that cannot be measured is ``None`` in ``values`` with a reason in ``missing`` -- never 0.
One failing measurement (an exception, an OOM) does not stop the others: it is recorded as
missing with reason ``"error: <Type>: <message>"``. ``methods[metric]`` says how each figure was
taken (method, device, repeats, spread, p90, threads, batch size, ...).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdsearch import trial_record as tr
from kdsearch.config import MeasureConfig
from kdsearch.measure._common import device_label, error_reason, resolve_device
from kdsearch.measure.complexity import PTFLOPS_BACKEND, measure_complexity
from kdsearch.measure.energy import cpu_energy_unavailable_reason, measure_inference_energy
from kdsearch.measure.latency import LatencyResult, OverBudget, measure_latency, measure_latency_on_cpu
from kdsearch.measure.memory import (
    CUDA_ONLY_REASON,
    activation_peak_mb,
    model_size_mb,
    peak_inference_memory_mb,
)
from kdsearch.measure.runtime_ort import ORT_DEVICE, OrtLatency
from kdsearch.metrics import LATENCY_DEVICE_SUFFIXES

__all__ = ["Measurements", "measure_inference"]


@dataclass
class Measurements:
    """Measured values (``None`` when missing), reasons for the missing ones, and methods."""

    values: dict[str, float | None] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    elapsed_s: float = 0.0  # wall time of the whole measurement phase
    budget_s: float | None = None  # the phase's hard time budget (s), None: none
    timings_s: dict[str, float] = field(default_factory=dict)  # wall time per step (name -> s)

    def set(self, metric: str, value: float | None, method: dict[str, Any] | None = None) -> None:
        """Record a value; ``None`` must go through :meth:`set_missing` (it needs a reason)."""
        if value is None:
            raise ValueError(f"{metric}: a missing value needs a reason; use set_missing")
        self.values[metric] = value
        self.missing.pop(metric, None)
        if method is not None:
            self.methods[metric] = method

    def set_missing(self, metric: str, reason: str, method: dict[str, Any] | None = None) -> None:
        self.values[metric] = None
        self.missing[metric] = reason
        if method is not None:
            self.methods[metric] = method

    def update(self, other: Measurements) -> None:
        """Merge another set of measurements (e.g. accuracy and KD figures from the objective)."""
        self.values.update(other.values)
        for k in other.values:
            self.missing.pop(k, None)
        self.missing.update(other.missing)
        self.methods.update(other.methods)

    def to_user_attrs(self) -> dict[str, Any]:
        """Trial user attrs per the storage contract: each metric, ``missing_metrics``, ``methods``."""
        attrs: dict[str, Any] = dict(self.values)
        attrs[tr.MISSING_METRICS] = dict(self.missing)
        attrs[tr.METHODS] = {k: dict(v) for k, v in self.methods.items()}
        return attrs


def _latency_method(r: LatencyResult) -> dict[str, Any]:
    return {
        "method": r.method,
        "device": r.device,
        "repeats": r.repeats,
        "spread": r.iqr_ms,
        "spread_kind": "iqr_ms",
        "p90": r.p90_ms,
        "median_ms": r.median_ms,
        "mean_ms": r.mean_ms,
        "min_ms": r.min_ms,
        "threads": r.threads,
        "batch_size": r.batch_size,
        "warmup": r.warmup,
        "stop_reason": r.stop_reason,
        "dtype": r.dtype,
        "channels_last": r.channels_last,
        "first_forward_ms": r.first_forward_ms,
        "budget_s": r.budget_s,
    }


def _over_budget_method(exc: OverBudget, device: str, batch_size: int) -> dict[str, Any]:
    return {
        "method": "unmeasured: over the measurement budget",
        "device": device,
        "batch_size": batch_size,
        "estimate_s": exc.estimate_s,
        "left_s": max(exc.left_s, 0.0),
        "forward_ms": exc.forward_s * 1e3,
    }


def _guard(m: Measurements, metrics: list[str], fn: Callable[[], None]) -> None:
    """Run one measurement; on an exception mark every metric it was to fill as missing."""
    t = time.perf_counter()
    try:
        fn()
    except OverBudget as exc:
        for metric in metrics:
            m.set_missing(metric, exc.reason, m.methods.get(metric))
    except Exception as exc:  # noqa: BLE001 - one failed figure must not lose the others
        reason = error_reason(exc)
        for metric in metrics:
            m.set_missing(metric, reason)
        if isinstance(exc, torch.cuda.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()
    finally:
        m.timings_s[metrics[0]] = m.timings_s.get(metrics[0], 0.0) + time.perf_counter() - t


def measure_inference(
    model: nn.Module,
    resolution: Any,
    device: torch.device | str,
    cfg: MeasureConfig,
    in_chans: int | None = None,
    *,
    budget_s: float | None = None,
) -> Measurements:
    """Measure a trained student (see the module docstring for every metric).

    ``resolution`` is the input side in px, or a :class:`kdsearch.models.spec.StudentSpec` (its
    ``resolution`` and ``in_chans`` are used). ``model`` lives on ``device`` (the trial's device)
    and is left there, in the train/eval mode it came in. ``budget_s`` (s) is the phase's hard
    time budget; by default ``cfg.budget_s()`` (``measure.max_time``, or 60 s).
    """
    t_start = time.perf_counter()
    budget = cfg.budget_s() if budget_s is None else float(budget_s)
    deadline = t_start + budget

    def left() -> float:
        return deadline - time.perf_counter()

    if hasattr(resolution, "resolution"):
        in_chans = in_chans if in_chans is not None else int(getattr(resolution, "in_chans", 3))
        resolution = int(resolution.resolution)
    res = int(resolution)
    chans = 3 if in_chans is None else int(in_chans)
    dev = resolve_device(device)
    lat = cfg.latency
    m = Measurements(budget_s=budget)
    was_training = model.training

    # Cheap, device-independent figures first.
    def size() -> None:
        m.set(
            "model_size_mb",
            model_size_mb(model),
            {"method": "params+buffers at stored dtype", "unit": "MB (1e6 bytes)"},
        )

    def act() -> None:
        m.set(
            "activation_peak_mb_b1",
            activation_peak_mb(model, res, 1, chans),
            {
                "method": "max over leaf modules of input+output bytes",
                "batch_size": 1,
                "unit": "MB (1e6 bytes)",
            },
        )

    def complexity() -> None:
        macs, params = measure_complexity(model, res, chans)
        how = {
            "method": f"ptflops {PTFLOPS_BACKEND} backend, module hooks",
            "resolution": res,
            "batch_size": 1,
        }
        m.set("macs", macs, how)
        m.set("params", params, {"method": "sum of parameter numel (trainable and frozen)"})

    _guard(m, ["model_size_mb"], size)
    _guard(m, ["activation_peak_mb_b1"], act)
    _guard(m, ["macs", "params"], complexity)

    # Latency: one measurement per (device kind, batch); suffixed names alias when they coincide.
    cache: dict[tuple[str, int], LatencyResult | OverBudget] = {}

    def expected_forward_s(kind: str, b: int) -> float | None:
        """On the CPU, a forward costs about batch-proportional time: scale the largest smaller
        batch measured (or judged) on the same device. None on CUDA (far from proportional)."""
        if kind not in ("cpu", ORT_DEVICE):
            return None
        smaller = [(bb, r) for (k, bb), r in cache.items() if k == kind and bb < b]
        if not smaller:
            return None
        bb, r = max(smaller, key=lambda item: item[0])
        per_forward_s = r.median_ms / 1e3 if isinstance(r, LatencyResult) else r.forward_s
        return per_forward_s * b / bb

    def latency_on(kind: str, b: int) -> LatencyResult:
        if (kind, b) not in cache:
            try:
                if kind == dev.type:
                    cache[(kind, b)] = measure_latency(
                        model, res, b, dev, lat, chans,
                        budget_s=left(), expected_forward_s=expected_forward_s(kind, b),
                    )
                elif kind == "cpu":
                    cache[(kind, b)] = measure_latency_on_cpu(
                        model, res, b, lat, chans,
                        budget_s=left(), expected_forward_s=expected_forward_s(kind, b),
                    )
                elif kind == ORT_DEVICE:
                    cache[(kind, b)] = ort.measure(b, budget_s=left(), expected_forward_s=expected_forward_s(kind, b))
                else:
                    raise AssertionError(kind)
            except OverBudget as exc:
                cache[(kind, b)] = exc
        r = cache[(kind, b)]
        if isinstance(r, OverBudget):
            raise r
        return r

    # (name suffix, device kind) per listed device, the suffixes the metric registry names
    # (kdsearch.metrics.LATENCY_DEVICE_SUFFIXES, which the study file's validation also reads).
    targets: list[tuple[str, str]] = [
        (LATENCY_DEVICE_SUFFIXES[d], dev.type if d == "auto" else d)
        for d in ("auto", "cpu", "cuda", ORT_DEVICE) if d in lat.devices
    ]
    ort = OrtLatency(model, res, chans, lat)  # exports nothing until an _ort figure is measured
    # Ascending batch sizes: a small batch is cheap and its time predicts the larger ones.
    for b in sorted(lat.batch_sizes):
        for suffix, kind in targets:
            med, p90 = f"latency_ms_b{b}{suffix}", f"latency_p90_ms_b{b}{suffix}"
            if kind == "cuda" and dev.type != "cuda":
                reason = "no CUDA device: the trial runs on the CPU"
                m.set_missing(med, reason)
                m.set_missing(p90, reason)
                continue

            def one(b: int = b, kind: str = kind, med: str = med, p90: str = p90) -> None:
                try:
                    r = latency_on(kind, b)
                except OverBudget as exc:
                    how = _over_budget_method(exc, kind if kind in ("cpu", ORT_DEVICE) else device_label(dev), b)
                    m.methods[med] = how
                    m.methods[p90] = how
                    raise
                how = _latency_method(r) if kind != ORT_DEVICE else {**_latency_method(r), **ort.method}
                m.set(med, r.median_ms, how)
                m.set(p90, r.p90_ms, how)

            _guard(m, [med, p90], one)

    def forward_s_on_device(b: int) -> float | None:
        """The measured median forward (s) of batch ``b`` on the trial's device, if known."""
        r = cache.get((dev.type, b))
        if isinstance(r, LatencyResult):
            return r.median_ms / 1e3
        if isinstance(r, OverBudget):
            return r.forward_s
        return None

    def refuse_unless_fits(what: str, b: int, forwards: int, fixed_s: float = 0.0) -> None:
        """Raise OverBudget when ``fixed_s`` plus ``forwards`` forwards of batch ``b`` cannot fit."""
        per = forward_s_on_device(b)
        estimate = fixed_s + forwards * (per or 0.0)
        if estimate > left():
            known = f"{forwards} forwards x {per * 1e3:.4g} ms" if per is not None else "forward time unknown"
            raise OverBudget(what, estimate, left(), per or 0.0, f"{fixed_s:.3g} s + {known}")

    # CUDA peak inference memory.
    for b in lat.batch_sizes:
        name = f"peak_infer_memory_mb_b{b}"
        if dev.type != "cuda":
            m.set_missing(name, CUDA_ONLY_REASON, {"method": "unavailable", "device": device_label(dev)})
            continue

        def peak(b: int = b, name: str = name) -> None:
            refuse_unless_fits(f"peak memory at batch {b}", b, 2)
            m.set(
                name,
                peak_inference_memory_mb(model, res, b, dev, chans),
                {
                    "method": "weights + torch.cuda.max_memory_allocated growth over one forward",
                    "device": device_label(dev),
                    "batch_size": b,
                    "unit": "MB (1e6 bytes)",
                },
            )

        _guard(m, [name], peak)

    # Energy per image at every batch size: batch 1 is the edge figure, the largest the
    # throughput one (also stored as infer_energy_mj_per_image).
    largest = max(lat.batch_sizes)
    for b in sorted(lat.batch_sizes):
        name = f"infer_energy_mj_per_image_b{b}"

        def energy(b: int = b, name: str = name) -> None:
            if dev.type == "cuda" and cfg.energy.enabled:
                # A >= infer_min_time_s loop, 3 warm-up forwards and up to one burst of 8 past the end.
                refuse_unless_fits(f"inference energy at batch {b}", b, 11, cfg.energy.infer_min_time_s)
            mj, r = measure_inference_energy(model, res, b, dev, cfg.energy, chans, max_s=left() - 1.0)
            how = r.to_dict()
            how["batch_size"] = b
            how["device"] = device_label(dev)
            if mj is None:
                m.set_missing(name, r.reason or "unmeasured", how)
            else:
                m.set(name, mj, how)

        _guard(m, [name], energy)
    # CPU energy per image (RAPL through Zeus) beside the CPU latency: the edge figure.
    # Produced exactly when kdsearch.metrics.why_not_produced says so: "cpu" listed, energy on.
    if "cpu" in lat.devices and cfg.energy.enabled:
        rapl_reason = cpu_energy_unavailable_reason()
        for b in sorted(lat.batch_sizes):
            name = f"infer_energy_mj_per_image_b{b}_cpu"
            if rapl_reason is not None:
                m.set_missing(name, rapl_reason, {"method": "unavailable", "device": "cpu", "batch_size": b})
                continue

            def cpu_energy(b: int = b, name: str = name) -> None:
                r = cache.get(("cpu", b))
                per = r.median_ms / 1e3 if isinstance(r, LatencyResult) else (r.forward_s if r else 0.0)
                estimate = cfg.energy.infer_min_time_s + 11 * per
                if estimate > left():
                    raise OverBudget(f"CPU inference energy at batch {b}", estimate, left(), per,
                                     f"{cfg.energy.infer_min_time_s:.3g} s + 11 forwards")
                mj, er = measure_inference_energy(model, res, b, "cpu", cfg.energy, chans,
                                                  max_s=left() - 1.0, on_cpu=True)
                how = {**er.to_dict(), "batch_size": b, "device": "cpu", "threads": torch.get_num_threads()}
                if mj is None:
                    m.set_missing(name, er.reason or "unmeasured", how)
                else:
                    m.set(name, mj, how)

            _guard(m, [name], cpu_energy)
    alias = f"infer_energy_mj_per_image_b{largest}"
    if m.values.get(alias) is not None:
        m.set("infer_energy_mj_per_image", m.values[alias], m.methods.get(alias))
    else:
        m.set_missing("infer_energy_mj_per_image", m.missing.get(alias, "unmeasured"), m.methods.get(alias))

    model.train(was_training)
    m.elapsed_s = time.perf_counter() - t_start
    return m
