"""The metric registry: every metric has a unit, a split, a description and the one formatter."""

from __future__ import annotations

import math

import pytest

from kdsearch.metrics import (
    FIXED_METRICS,
    LATENCY_DEVICE_SUFFIXES,
    MISSING_TEXT,
    PATTERN_METRICS,
    Metric,
    MetricSettings,
    format_metric,
    is_known_metric,
    is_selectable_metric,
    metric_examples,
    metric_info,
    metric_unit,
    produced_metrics,
    why_not_produced,
)

UNITS = {"fraction", "count", "MACs", "s", "ms", "MB", "J", "mJ/image", "W"}


@pytest.mark.parametrize("name", [*FIXED_METRICS, *metric_examples((1, 8))])
def test_every_known_metric_has_a_complete_record(name: str) -> None:
    info = metric_info(name)
    assert isinstance(info, Metric) and info.name == name
    assert info.unit in UNITS and metric_unit(name) == info.unit
    assert info.direction in ("maximize", "minimize", None)
    assert info.split in ("train", "val", "test", None)
    assert len(info.description) > 20 and "\n" not in info.description
    assert is_known_metric(name)
    # The formatter gives a non-empty text for a value, and "—" for a missing one.
    assert format_metric(name, 0.5) not in ("", MISSING_TEXT)
    assert format_metric(name, None) == MISSING_TEXT


@pytest.mark.parametrize(
    ("name", "value", "text"),
    [
        ("val_accuracy", 0.41, "41.00%"),
        ("test_accuracy", 1.0, "100.00%"),
        ("ft_gain", -0.0312, "-3.12%"),
        ("params", 123_456, "0.1235 M"),
        ("params", 4_200, "0.0042 M"),
        ("macs", 206e6, "206 M"),
        ("macs", 22_700_000, "22.7 M"),
        ("latency_ms_b1", 1.95, "1.95 ms"),
        ("latency_ms_b64_cpu", 1234.5678, "1235 ms"),
        ("latency_p90_ms_b8_cuda", 0.012345, "0.01235 ms"),
        ("peak_infer_memory_mb_b16", 12.3, "12.3 MB"),
        ("kd_time_s", 45, "45 s"),
        ("kd_energy_j", 3120.0, "3120 J"),
        ("infer_energy_mj_per_image", 0.5, "0.5 mJ/image"),
        ("model_size_mb", 0.98, "0.98 MB"),
        ("val_accuracy", None, "—"),
        ("val_accuracy", math.nan, "—"),
        ("kd_time_s", math.inf, "—"),
        ("kd_time_s", "fast", "—"),
        ("kd_time_s", True, "—"),
        ("not_a_metric", 3.14159, "3.142"),
    ],
)
def test_format_metric_examples(name: str, value: object, text: str) -> None:
    assert format_metric(name, value) == text


def test_format_without_unit_keeps_percent_and_millions() -> None:
    assert format_metric("latency_ms_b1", 1.95, unit=False) == "1.95"
    assert format_metric("val_accuracy", 0.5, unit=False) == "50.00%"
    assert format_metric("macs", 4.2e6, unit=False) == "4.2 M"


@pytest.mark.parametrize(
    ("name", "unit", "batch_ok", "desc_part"),
    [
        ("latency_ms_b1", "ms", True, "batch 1 on the trial's device"),
        ("latency_ms_b16_cpu", "ms", True, "batch 16 on the CPU"),
        ("latency_ms_b16_cuda", "ms", True, "batch 16 on CUDA"),
        ("latency_p90_ms_b16", "ms", True, "90th-percentile"),
        ("peak_infer_memory_mb_b1", "MB", True, "batch 1"),
        ("latency_ms_b64", "ms", False, "batch 64"),
    ],
)
def test_pattern_metrics(name: str, unit: str, batch_ok: bool, desc_part: str) -> None:
    info = metric_info(name)
    assert info is not None and info.unit == unit and info.split is None and info.direction == "minimize"
    assert desc_part in info.description
    assert is_known_metric(name)  # any batch size without a list
    assert is_known_metric(name, (1, 16)) is batch_ok


@pytest.mark.parametrize("name", ["latency_ms_b", "latency_ms_bx", "latency_ms_b1_tpu", "peak_infer_memory_mb_b1_cpu",
                                  "accuracy", "Val_accuracy", ""])
def test_unknown_names(name: str) -> None:
    assert metric_info(name) is None and metric_unit(name) is None
    assert not is_known_metric(name) and not is_selectable_metric(name)


def test_test_split_metrics_are_marked_and_not_selectable() -> None:
    test_split = {n for n, m in FIXED_METRICS.items() if m.split == "test"}
    assert test_split == {"test_accuracy", "pre_ft_accuracy", "post_ft_accuracy", "ft_gain"}
    assert all(not is_selectable_metric(n) for n in test_split)
    assert metric_info("val_accuracy").split == "val" and is_selectable_metric("val_accuracy")
    assert metric_info("kd_time_s").split == "train" and is_selectable_metric("kd_time_s")
    assert is_selectable_metric("latency_ms_b1_cpu") and metric_info("params").split is None


def test_directions_are_the_usual_ones() -> None:
    for name, m in FIXED_METRICS.items():
        expected = "maximize" if m.unit == "fraction" else "minimize"
        assert m.direction == expected, name


def test_examples_are_known_under_their_batch_sizes() -> None:
    names = metric_examples((2, 32))
    assert "latency_ms_b32_cpu" in names and "latency_p90_ms_b2" in names
    assert all(is_known_metric(n, (2, 32)) for n in names)


# ---------------------------------------------------------------------------------------------
# What a study's settings produce (issue 19): each metric pattern and fixed name against each
# setting that produces it. (name, settings, None: produced | fragment of the fix naming the
# setting to add.)

_S = MetricSettings  # defaults: batch sizes [1, 64], devices [auto], energy on, finetune off
PRODUCED_BY = [
    # latency_ms_b{N}{suffix}: the batch in batch_sizes and the suffix's device listed
    ("latency_ms_b1", _S(), None),
    ("latency_ms_b1", _S(latency_devices=("cpu",)), "add auto to measure.latency.devices, e.g. [cpu, auto]"),
    ("latency_ms_b8", _S(), "add 8 to measure.latency.batch_sizes, e.g. [1, 8, 64]"),
    ("latency_ms_b64_cpu", _S(latency_devices=("auto", "cpu")), None),
    ("latency_ms_b64_cpu", _S(), "add cpu to measure.latency.devices, e.g. [auto, cpu]"),
    ("latency_ms_b1_cuda", _S(latency_devices=("cuda",)), None),
    ("latency_ms_b1_cuda", _S(latency_devices=("auto", "cpu")), "add cuda to measure.latency.devices"),
    ("latency_ms_b1_ort", _S(latency_devices=("auto", "ort-cpu")), None),
    ("latency_ms_b1_ort", _S(), "add ort-cpu to measure.latency.devices, e.g. [auto, ort-cpu]"),
    ("latency_ms_b4_ort", _S(batch_sizes=(1,), latency_devices=("ort-cpu",)), "add 4 to measure.latency.batch_sizes"),
    # latency_p90_ms_b{N}{suffix}: the same rules
    ("latency_p90_ms_b64", _S(), None),
    ("latency_p90_ms_b64", _S(latency_devices=("ort-cpu",)), "add auto to measure.latency.devices"),
    ("latency_p90_ms_b16", _S(), "add 16 to measure.latency.batch_sizes"),
    ("latency_p90_ms_b1_cpu", _S(latency_devices=("cpu",)), None),
    ("latency_p90_ms_b1_cpu", _S(), "add cpu to measure.latency.devices"),
    ("latency_p90_ms_b1_cuda", _S(latency_devices=("auto", "cuda")), None),
    ("latency_p90_ms_b1_cuda", _S(), "add cuda to measure.latency.devices"),
    ("latency_p90_ms_b1_ort", _S(latency_devices=("ort-cpu",)), None),
    ("latency_p90_ms_b1_ort", _S(latency_devices=("cpu",)), "add ort-cpu to measure.latency.devices"),
    # peak_infer_memory_mb_b{N}: the batch (any latency device: the trial's own CUDA device)
    ("peak_infer_memory_mb_b64", _S(latency_devices=("cpu",)), None),
    ("peak_infer_memory_mb_b4", _S(), "add 4 to measure.latency.batch_sizes"),
    # infer_energy_mj_per_image_b{N}: the batch and energy on
    ("infer_energy_mj_per_image_b1", _S(), None),
    ("infer_energy_mj_per_image_b2", _S(), "add 2 to measure.latency.batch_sizes"),
    ("infer_energy_mj_per_image_b1", _S(energy_enabled=False), "set measure.energy.enabled: true"),
    # fixed names
    ("infer_energy_mj_per_image", _S(batch_sizes=(4,)), None),
    ("infer_energy_mj_per_image", _S(energy_enabled=False), "set measure.energy.enabled: true"),
    ("kd_energy_j", _S(), None),
    ("kd_energy_j", _S(energy_enabled=False), "set measure.energy.enabled: true"),
    ("kd_energy_mj_per_image", _S(energy_enabled=False), "set measure.energy.enabled: true"),
    ("kd_mean_power_w", _S(energy_enabled=False), "set measure.energy.enabled: true"),
    ("pre_ft_val_accuracy", _S(finetune_enabled=True), None),
    ("pre_ft_val_accuracy", _S(), "set finetune.enabled: true"),
    ("post_ft_val_accuracy", _S(), "set finetune.enabled: true"),
    ("ft_gain_val", _S(finetune_enabled=True), None),
    ("ft_gain_val", _S(), "set finetune.enabled: true"),
    ("pre_ft_accuracy", _S(), "set finetune.enabled: true"),
    ("post_ft_accuracy", _S(finetune_enabled=True), None),
    ("ft_gain", _S(), "set finetune.enabled: true"),
    # Produced under any settings: kd_time_s with one box or a searched one (the box is no
    # measurement setting), the accuracies, sizes, and batch-1 activation peak at any batch list.
    ("kd_time_s", _S(batch_sizes=(8,), latency_devices=("cpu",), energy_enabled=False), None),
    ("val_accuracy", _S(batch_sizes=(8,), latency_devices=("cpu",), energy_enabled=False), None),
    ("test_accuracy", _S(), None),
    ("params", _S(latency_devices=("ort-cpu",)), None),
    ("macs", _S(energy_enabled=False), None),
    ("model_size_mb", _S(batch_sizes=(2,)), None),
    ("activation_peak_mb_b1", _S(batch_sizes=(64,)), None),
    ("peak_kd_memory_mb", _S(energy_enabled=False), None),
    ("peak_kd_memory_total_mb", _S(), None),
    ("probe_peak_memory_mb", _S(latency_devices=("cpu",)), None),
]


@pytest.mark.parametrize(("name", "settings", "fix"), PRODUCED_BY, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(PRODUCED_BY)])
def test_which_settings_produce_a_metric(name: str, settings: MetricSettings, fix: str | None) -> None:
    why = why_not_produced(name, settings)
    listed = name in produced_metrics(settings)
    if fix is None:
        assert why is None and listed
    else:
        assert why is not None and fix in why.fix, why
        assert "\n" not in why.rule and not listed


def test_every_metric_and_pattern_has_a_produced_by_row() -> None:
    """A new metric (or a new device suffix) gets a row above, produced and (if a setting can
    turn it off) refused."""
    names = [name for name, _, _ in PRODUCED_BY]
    assert set(FIXED_METRICS) <= set(names)
    for pat in PATTERN_METRICS:
        rows = [n for n in names if pat.pattern.fullmatch(n)]
        assert rows, pat.pattern.pattern
        if "device" in pat.pattern.groupindex:
            suffixes = {pat.pattern.fullmatch(n).group("device") or "" for n in rows}  # type: ignore[union-attr]
            assert suffixes == set(LATENCY_DEVICE_SUFFIXES.values()), pat.pattern.pattern


@pytest.mark.parametrize("settings", [
    _S(), _S(batch_sizes=(1, 4, 16), latency_devices=("auto", "cpu", "cuda", "ort-cpu")),
    _S(batch_sizes=(2,), latency_devices=("ort-cpu",), energy_enabled=False, finetune_enabled=True),
])
def test_produced_metrics_are_exactly_the_names_the_rule_accepts(settings: MetricSettings) -> None:
    produced = produced_metrics(settings)
    assert len(produced) == len(set(produced))
    assert all(why_not_produced(n, settings) is None and metric_info(n) is not None for n in produced)
    # Every name the rule accepts over a wide sample of candidates is listed.
    batches = (1, 2, 4, 16, 64)
    candidates = [*FIXED_METRICS, *metric_examples(batches),
                  *(f"{p}_b{b}{sfx}" for p in ("latency_ms", "latency_p90_ms") for b in batches
                    for sfx in LATENCY_DEVICE_SUFFIXES.values())]
    assert {n for n in candidates if why_not_produced(n, settings) is None} == set(produced)
