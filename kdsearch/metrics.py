"""Every metric kdsearch stores, in one registry: name, unit, direction hint, split, what the
figure includes, and its one formatter.

A metric name is either fixed (``val_accuracy``) or a pattern with a batch size
(``latency_ms_b{N}``, ``latency_ms_b{N}_cpu``, ``latency_ms_b{N}_ort``, ``latency_p90_ms_b{N}``,
``peak_infer_memory_mb_b{N}``). The ``_ort`` latencies are ONNX Runtime on the CPU (the
``ort-cpu`` entry of ``measure.latency.devices``). :func:`metric_info` resolves either kind to a :class:`Metric`.

``split`` says which data split a figure is computed on: ``"train"`` for figures of the KD run
itself (it reads only the training split), ``"val"`` and ``"test"`` for accuracies, ``None`` for
figures that depend on the architecture and device only (params, MACs, latency, memory). A
``"test"`` figure is stored for reporting and never steers the search (see
:func:`is_selectable_metric`): objectives, constraints and ``--pick`` refuse it.

``needs_cuda`` marks a figure that only a CUDA device can give (the allocator's peaks, CUDA
latency, NVML energy); ``needs_nvml`` one that also needs NVML's energy counter or power reading.
The preflight refuses such a metric as an objective or a constraint on a machine that cannot
measure it, in seconds, instead of failing every trial after its box.

Display convention (:func:`format_metric`, used by progress, the report, the pivot tables, the
trial table and the export card): fractions as percent with two decimals (``"41.00%"``);
counts and MACs in millions with four significant digits and a spaced ``M`` (``"0.123 M"``);
everything else with four significant digits, a space and its unit (``"1.95 ms"``). A missing or
non-finite value is ``"—"``.

Which names a study will actually store depends on its settings, not only on this registry:
a ``_cpu``/``_cuda``/``_ort`` latency needs that entry in ``measure.latency.devices`` (the plain
name needs ``auto``), a batch-size figure needs its batch in ``measure.latency.batch_sizes``, an
energy figure ``measure.energy.enabled``, a fine-tune figure ``finetune.enabled``.
:func:`why_not_produced` is that one rule (the study file's validation refuses an objective or
constraint it would never store) and :func:`produced_metrics` lists every name for given
:class:`MetricSettings`; the measurement suite takes its device suffixes from
:data:`LATENCY_DEVICE_SUFFIXES`, so the two cannot drift apart.

To add a metric: add one :class:`Metric` to :data:`FIXED_METRICS` (or a pattern to
:data:`PATTERN_METRICS`) and store it under that name from the code that measures it; if a
setting turns it off, say so with a flag that :func:`why_not_produced` reads.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "Direction",
    "FIXED_METRICS",
    "LATENCY_DEVICE_SUFFIXES",
    "MISSING_TEXT",
    "Metric",
    "MetricSettings",
    "NotProduced",
    "PATTERN_METRICS",
    "PatternMetric",
    "Split",
    "TEST_SPLIT_RULE",
    "format_metric",
    "is_fixed_cost",
    "is_known_metric",
    "is_selectable_metric",
    "metric_examples",
    "metric_info",
    "metric_unit",
    "produced_metrics",
    "val_counterpart",
    "why_not_produced",
]

Direction = Literal["maximize", "minimize"]
Split = Literal["train", "val", "test"]

MISSING_TEXT = "—"
"""What :func:`format_metric` shows for a missing (``None``) or non-finite value."""

_MILLIONS_UNITS = frozenset({"count", "MACs"})


@dataclass(frozen=True)
class Metric:
    """One stored metric.

    ``unit`` is the unit of the stored value (``"fraction"`` for accuracies in [0, 1],
    ``"count"``, ``"MACs"``, ``"s"``, ``"ms"``, ``"MB"`` = 10^6 bytes, ``"J"``, ``"mJ/image"``, ``"W"``).
    ``direction`` is the usual better way (a hint for reports; the study file decides).
    ``split`` is the data split it is computed on, or None for architecture/device figures.
    ``description`` says in one line exactly what the figure includes.
    ``needs_cuda``: only a CUDA device measures it; ``needs_nvml``: it also needs NVML energy
    (and ``measure.energy.enabled``). ``needs_finetune``: stored only with ``finetune.enabled``.
    """

    name: str
    unit: str
    direction: Direction | None
    split: Split | None
    description: str
    needs_cuda: bool = False
    needs_nvml: bool = False
    needs_finetune: bool = False


@dataclass(frozen=True)
class PatternMetric:
    """A family of metric names with a batch size, ``latency_ms_b{N}`` and the like.

    ``description`` may use ``{batch}`` and ``{device}`` (the device suffix: "the trial's device",
    "the CPU", "CUDA", "ONNX Runtime on the CPU"). A name with the ``_cuda`` suffix needs CUDA whatever ``needs_cuda`` says.
    """

    pattern: re.Pattern[str]
    unit: str
    direction: Direction | None
    split: Split | None
    description: str
    needs_cuda: bool = False
    needs_nvml: bool = False

    def match(self, name: str) -> Metric | None:
        """The :class:`Metric` for ``name`` if it matches this pattern, else None."""
        m = self.pattern.fullmatch(name)
        if m is None:
            return None
        suffix = m.groupdict().get("device") or None
        device = {
            None: "the trial's device",
            "_cpu": "the CPU",
            "_cuda": "CUDA",
            "_ort": "the CPU in ONNX Runtime (the student exported to ONNX; measure.latency.ort_threads threads)",
        }[suffix]
        desc = self.description.format(batch=m.group("batch"), device=device)
        cuda = self.needs_cuda or suffix == "_cuda"
        return Metric(name, self.unit, self.direction, self.split, desc, cuda, self.needs_nvml)

    def batch_size(self, name: str) -> int | None:
        """The batch size in ``name`` if it matches this pattern, else None."""
        m = self.pattern.fullmatch(name)
        return int(m.group("batch")) if m else None


def _fixed(*metrics: Metric) -> dict[str, Metric]:
    return {m.name: m for m in metrics}


FIXED_METRICS: dict[str, Metric] = _fixed(
    Metric("val_accuracy", "fraction", "maximize", "val",
           "top-1 accuracy of the distilled student on the validation split carved from the training data"),
    Metric("test_accuracy", "fraction", "maximize", "test",
           "top-1 accuracy of the distilled student on the test split; reported, never used for selection"),
    Metric("kd_time_s", "s", "minimize", "train",
           "training time of the KD loop (evaluation pauses the clock); at most the trial's time box, "
           "which study.trial_time may search"),
    Metric("params", "count", "minimize", None, "parameters of the student (ptflops)"),
    Metric("macs", "MACs", "minimize", None, "multiply-accumulates of one forward pass, one image (ptflops)"),
    Metric("model_size_mb", "MB", "minimize", None, "parameters + buffers at their stored dtype, 10^6 bytes"),
    Metric("activation_peak_mb_b1", "MB", "minimize", None,
           "largest leaf-module input + output footprint of one forward pass at batch 1"),
    Metric("peak_kd_memory_mb", "MB", "minimize", "train",
           "CUDA allocator peak of the KD training steps above what was resident before the trial "
           "(data, teacher cache): the student's weights, gradients, optimiser state, activations and "
           "cuDNN workspaces; in-loop validation excluded (CUDA only)", needs_cuda=True),
    Metric("peak_kd_memory_total_mb", "MB", "minimize", "train",
           "CUDA allocator peak of the KD training steps for the whole process: peak_kd_memory_mb plus "
           "the resident data and teacher cache (CUDA only)", needs_cuda=True),
    Metric("probe_peak_memory_mb", "MB", "minimize", "train",
           "CUDA allocator peak of a few KD training steps run before the box (the fail-fast memory "
           "probe), above the same baseline as peak_kd_memory_mb (CUDA only)", needs_cuda=True),
    Metric("kd_energy_j", "J", "minimize", "train",
           "NVML board energy of the KD training steps (in-loop validation excluded; idle power "
           "included); close to board power x box when the box is fixed (CUDA only)",
           needs_cuda=True, needs_nvml=True),
    Metric("kd_energy_mj_per_image", "mJ/image", "minimize", "train",
           "kd_energy_j per training image seen (one view each), in mJ (CUDA only)", needs_cuda=True, needs_nvml=True),
    Metric("kd_mean_power_w", "W", "minimize", "train",
           "mean board power over the KD training steps: kd_energy_j / training time (CUDA only)",
           needs_cuda=True, needs_nvml=True),
    Metric("infer_energy_mj_per_image", "mJ/image", "minimize", None,
           "NVML board energy of an inference loop at the largest latency batch size, per image; the "
           "same figure as infer_energy_mj_per_image_b<largest> (CUDA only)", needs_cuda=True, needs_nvml=True),
    Metric("pre_ft_val_accuracy", "fraction", "maximize", "val",
           "top-1 validation accuracy of the distilled student before head fine-tuning (selection)",
           needs_finetune=True),
    Metric("post_ft_val_accuracy", "fraction", "maximize", "val",
           "top-1 validation accuracy after training the head on the finetune split (selection)",
           needs_finetune=True),
    Metric("ft_gain_val", "fraction", "maximize", "val",
           "post_ft_val_accuracy - pre_ft_val_accuracy, on the validation split (selection)",
           needs_finetune=True),
    Metric("pre_ft_accuracy", "fraction", "maximize", "test",
           "top-1 test accuracy of the distilled student before head fine-tuning; reported only",
           needs_finetune=True),
    Metric("post_ft_accuracy", "fraction", "maximize", "test",
           "top-1 test accuracy after training the head on the finetune split; reported only",
           needs_finetune=True),
    Metric("ft_gain", "fraction", "maximize", "test",
           "post_ft_accuracy - pre_ft_accuracy, on the test split; reported only", needs_finetune=True),
)

PATTERN_METRICS: tuple[PatternMetric, ...] = (
    PatternMetric(re.compile(r"latency_ms_b(?P<batch>\d+)(?P<device>_cpu|_cuda|_ort)?"), "ms", "minimize", None,
                  "median latency of one forward pass at batch {batch} on {device}, after warm-up"),
    PatternMetric(re.compile(r"latency_p90_ms_b(?P<batch>\d+)(?P<device>_cpu|_cuda|_ort)?"), "ms", "minimize", None,
                  "90th-percentile latency of one forward pass at batch {batch} on {device}"),
    PatternMetric(re.compile(r"peak_infer_memory_mb_b(?P<batch>\d+)"), "MB", "minimize", None,
                  "CUDA allocator peak of one forward pass at batch {batch}, weights included (CUDA only)",
                  needs_cuda=True),
    PatternMetric(re.compile(r"infer_energy_mj_per_image_b(?P<batch>\d+)"), "mJ/image", "minimize", None,
                  "NVML board energy of a back-to-back inference loop at batch {batch}, per image; the "
                  "window lasts measure.energy.infer_min_time and enough counter updates (CUDA only)",
                  needs_cuda=True, needs_nvml=True),
)

def metric_info(name: str) -> Metric | None:
    """The :class:`Metric` record of ``name``, or None if kdsearch does not store it."""
    fixed = FIXED_METRICS.get(name)
    if fixed is not None:
        return fixed
    for pat in PATTERN_METRICS:
        found = pat.match(name)
        if found is not None:
            return found
    return None


def metric_unit(name: str) -> str | None:
    """The unit of a metric name, or None if kdsearch does not store it."""
    info = metric_info(name)
    return info.unit if info is not None else None


def is_known_metric(name: str, batch_sizes: Sequence[int] | None = None) -> bool:
    """True if ``name`` is a metric kdsearch stores. Latency/inference-memory names must use a
    batch size from ``batch_sizes`` (``measure.latency.batch_sizes``) when it is given."""
    if name in FIXED_METRICS:
        return True
    for pat in PATTERN_METRICS:
        batch = pat.batch_size(name)
        if batch is not None:
            return batch_sizes is None or batch in batch_sizes
    return False


def is_fixed_cost(name: str) -> bool:
    """True for a figure that depends on the architecture (and the device) only, not on training:
    params, MACs, size, activation peak, latency, inference memory and energy (``split`` None).
    It is measured on the untrained student before the KD box, so a constraint on it is checked
    before any training."""
    info = metric_info(name)
    return info is not None and info.split is None


def is_selectable_metric(name: str) -> bool:
    """False for a test-split metric: it may be stored and reported, never used as an objective,
    a constraint or a pick rule. Unknown names are False too."""
    info = metric_info(name)
    return info is not None and info.split != "test"


TEST_SPLIT_RULE = (
    "is measured on the test split, which never steers the search (selection uses val; test is for reporting)"
)
"""The rule an objective, constraint or ``--pick`` metric on the test split breaks."""

_VAL_COUNTERPARTS = {
    "test_accuracy": "val_accuracy",
    "pre_ft_accuracy": "pre_ft_val_accuracy",
    "post_ft_accuracy": "post_ft_val_accuracy",
    "ft_gain": "ft_gain_val",
}


def val_counterpart(name: str) -> str | None:
    """The validation-split metric to select on instead of the test-split metric ``name``."""
    return _VAL_COUNTERPARTS.get(name)


LATENCY_DEVICE_SUFFIXES: dict[str, str] = {"auto": "", "cpu": "_cpu", "cuda": "_cuda", "ort-cpu": "_ort"}
"""``measure.latency.devices`` entry -> the suffix of the latency names it gives
(``latency_ms_b{N}{suffix}``, ``latency_p90_ms_b{N}{suffix}``); the measurement suite measures
exactly these."""


@dataclass(frozen=True)
class MetricSettings:
    """The study settings that decide which metric names a trial stores (the machine is another
    matter: a CUDA or NVML figure on a machine without them is the preflight's refusal).

    ``batch_sizes`` and ``latency_devices`` are ``measure.latency.batch_sizes`` / ``.devices``,
    ``energy_enabled`` is ``measure.energy.enabled``, ``finetune_enabled`` ``finetune.enabled``.
    The KD box (one or searched) changes no name: ``kd_time_s`` is stored with any.
    """

    batch_sizes: tuple[int, ...] = (1, 64)
    latency_devices: tuple[str, ...] = ("auto",)
    energy_enabled: bool = True
    finetune_enabled: bool = False


@dataclass(frozen=True)
class NotProduced:
    """Why a known metric name is never stored under some settings: the rule it breaks and the
    setting that would produce it."""

    rule: str
    fix: str


def _yaml_list(values: Sequence[Any]) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


def why_not_produced(name: str, settings: MetricSettings) -> NotProduced | None:
    """None when a trial under ``settings`` stores ``name`` (a value, or missing with the
    machine's reason), else the rule and the setting to add. Unknown names are None: they are
    :func:`is_known_metric`'s refusal."""
    info = metric_info(name)
    if info is None:
        return None
    for pat in PATTERN_METRICS:
        m = pat.pattern.fullmatch(name)
        if m is None:
            continue
        batch = int(m.group("batch"))
        if batch not in settings.batch_sizes:
            return NotProduced(
                f"is measured only at the batch sizes measure.latency.batch_sizes lists "
                f"({_yaml_list(settings.batch_sizes)})",
                f"add {batch} to measure.latency.batch_sizes, e.g. {_yaml_list(sorted({*settings.batch_sizes, batch}))}",
            )
        if "device" in pat.pattern.groupindex:
            suffix = m.group("device") or ""
            device = next(d for d, s in LATENCY_DEVICE_SUFFIXES.items() if s == suffix)
            if device not in settings.latency_devices:
                return NotProduced(
                    f"is measured only when measure.latency.devices lists {device} "
                    f"(it lists {_yaml_list(settings.latency_devices)})",
                    f"add {device} to measure.latency.devices, e.g. {_yaml_list([*settings.latency_devices, device])}",
                )
        break
    if info.needs_nvml and not settings.energy_enabled:
        return NotProduced("is an energy figure, and measure.energy.enabled is false",
                           "set measure.energy.enabled: true, or drop the metric")
    if info.needs_finetune and not settings.finetune_enabled:
        return NotProduced("needs finetune.enabled: true",
                           "set finetune.enabled: true (with data.finetune_fraction > 0), or drop the metric")
    return None


def produced_metrics(settings: MetricSettings) -> list[str]:
    """Every metric name a trial under ``settings`` stores (a value, or missing with a reason
    where the machine cannot measure it), fixed names first, then per batch size."""
    names = [n for n in FIXED_METRICS if why_not_produced(n, settings) is None]
    for b in sorted(settings.batch_sizes):
        for device in settings.latency_devices:
            suffix = LATENCY_DEVICE_SUFFIXES[device]
            names += [f"latency_ms_b{b}{suffix}", f"latency_p90_ms_b{b}{suffix}"]
        names += [n for n in (f"peak_infer_memory_mb_b{b}", f"infer_energy_mj_per_image_b{b}")
                  if why_not_produced(n, settings) is None]
    return list(dict.fromkeys(names))


def metric_examples(batch_sizes: Sequence[int] | None = None) -> list[str]:
    """Metric names to suggest from in an error message."""
    names = list(FIXED_METRICS)
    bs = batch_sizes if batch_sizes is not None else (1, 64)
    for b in bs:
        names += [f"latency_ms_b{b}", f"latency_p90_ms_b{b}", f"latency_ms_b{b}_cpu", f"latency_ms_b{b}_ort",
                  f"peak_infer_memory_mb_b{b}",
                  f"infer_energy_mj_per_image_b{b}"]
    return names


def format_metric(name: str, value: Any, *, unit: bool = True) -> str:
    """``value`` of metric ``name`` as text, the one display convention of kdsearch.

    Fractions as percent (``"41.00%"``), counts and MACs in millions (``"0.123 M"``), anything
    else with four significant digits and its unit (``"1.95 ms"``); ``unit=False`` leaves the
    unit off for a table that names it in the header (percent and ``M`` stay: they are part of
    the number). None, NaN, infinities and non-numbers are ``"—"``. An unknown metric name is
    shown with four significant digits and no unit.
    """
    info = metric_info(name)
    return _format(info.unit if info is not None else "", value, unit=unit)


def _format(metric_unit_: str, value: Any, *, unit: bool) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return MISSING_TEXT
    v = float(value)
    if not math.isfinite(v):
        return MISSING_TEXT
    if metric_unit_ == "fraction":
        return f"{100 * v:.2f}%"
    if metric_unit_ in _MILLIONS_UNITS:
        return f"{v / 1e6:.4g} M"
    text = f"{v:.4g}"
    return f"{text} {metric_unit_}" if unit and metric_unit_ else text
