"""Every metric kdsearch stores: its name and unit (a registry; see :func:`metric_unit`)."""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["KNOWN_METRICS", "metric_unit", "is_known_metric", "metric_examples"]

FIXED_METRICS: dict[str, str] = {
    "val_accuracy": "fraction",
    "test_accuracy": "fraction",
    "kd_time_s": "s",
    "params": "count",
    "macs": "MACs",
    "model_size_mb": "MB",
    "activation_peak_mb_b1": "MB",
    "peak_kd_memory_mb": "MB",
    "kd_energy_j": "J",
    "infer_energy_mj_per_image": "mJ/image",
    "pre_ft_accuracy": "fraction",
    "post_ft_accuracy": "fraction",
    "ft_gain": "fraction",
}
PATTERN_METRICS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"latency_ms_b(\d+)(_cpu|_cuda)?"), "ms"),
    (re.compile(r"latency_p90_ms_b(\d+)(_cpu|_cuda)?"), "ms"),
    (re.compile(r"peak_infer_memory_mb_b(\d+)"), "MB"),
)
KNOWN_METRICS: dict[str, str] = dict(FIXED_METRICS)


def metric_unit(name: str) -> str | None:
    """The unit of a metric name, or None if kdsearch does not measure it."""
    if name in FIXED_METRICS:
        return FIXED_METRICS[name]
    for pat, unit in PATTERN_METRICS:
        if pat.fullmatch(name):
            return unit
    return None


def is_known_metric(name: str, batch_sizes: Sequence[int] | None = None) -> bool:
    """True if ``name`` is a metric kdsearch stores. Latency/inference-memory names must use a
    batch size from ``batch_sizes`` (``measure.latency.batch_sizes``) when it is given."""
    if name in FIXED_METRICS:
        return True
    for pat, _ in PATTERN_METRICS:
        m = pat.fullmatch(name)
        if m:
            if batch_sizes is None:
                return True
            return int(m.group(1)) in batch_sizes
    return False


def metric_examples(batch_sizes: Sequence[int] | None = None) -> list[str]:
    """Metric names to suggest from in an error message."""
    names = list(FIXED_METRICS)
    bs = batch_sizes if batch_sizes is not None else (1, 64)
    for b in bs:
        names += [f"latency_ms_b{b}", f"latency_ms_b{b}_cpu", f"peak_infer_memory_mb_b{b}"]
    return names


