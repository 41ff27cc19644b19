"""The metric registry: every metric has a unit, a split, a description and the one formatter."""

from __future__ import annotations

import math

import pytest

from kdsearch.metrics import (
    FIXED_METRICS,
    MISSING_TEXT,
    Metric,
    format_metric,
    is_known_metric,
    is_selectable_metric,
    metric_examples,
    metric_info,
    metric_unit,
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
