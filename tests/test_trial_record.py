"""The trial record (kdsearch.trial_record): one rule for each record the search writes."""

from __future__ import annotations

import math
from typing import Any

import pytest

from kdsearch import trial_record as tr


class _Trial:
    """Just what the writers call: ``set_user_attr``."""

    def __init__(self) -> None:
        self.user_attrs: dict[str, Any] = {}

    def set_user_attr(self, key: str, value: Any) -> None:
        self.user_attrs[key] = value


def test_a_failure_record_cuts_its_detail_once_for_every_writer() -> None:
    a = tr.failure_attrs("error", "x" * 2000)
    assert a == {tr.FAIL_REASON: "error", tr.FAIL_DETAIL: "x" * tr.FAIL_DETAIL_MAX_CHARS}
    assert tr.failure_attrs("oom", "short") == {"fail_reason": "oom", "fail_detail": "short"}  # the stored keys


def test_the_verdict_checks_each_limit_and_makes_a_missing_value_infeasible() -> None:
    limits = {"params": 1e5, "latency_ms_b1": 2.0, "macs": 1e6, "val_accuracy_min": 0.5}
    values: dict[str, float | None] = {"params": 2.5e5, "latency_ms_b1": None, "macs": 1e6, "val_accuracy_min": math.nan}
    v = tr.constraint_verdict(limits, values, {"latency_ms_b1": "over measure.max_time"})
    assert v.violations == {"params": pytest.approx(1.5e5), "latency_ms_b1": tr.INFEASIBLE, "macs": 0.0,
                            "val_accuracy_min": tr.INFEASIBLE}
    assert v.reasons == ("params=2.5e+05 > 1e+05", "latency_ms_b1 missing (over measure.max_time)",
                         "val_accuracy_min missing (not measured)")
    assert not v.feasible and v.reason == "; ".join(v.reasons)
    assert tr.verdict_attrs(v) == {tr.CONSTRAINT_VIOLATIONS: v.violations, tr.FEASIBLE: False,
                                   tr.INFEASIBLE_REASON: v.reason}


def test_a_verdict_before_training_leaves_the_unchecked_constraints_at_zero() -> None:
    v = tr.constraint_verdict({"macs": 1e6, "peak_kd_memory_mb": 100.0}, {"macs": 5e5}, {}, checked=["macs"])
    assert v.violations == {"macs": pytest.approx(-5e5), "peak_kd_memory_mb": 0.0} and v.feasible
    assert tr.verdict_attrs(v) == {tr.CONSTRAINT_VIOLATIONS: v.violations, tr.FEASIBLE: True}


def test_a_stored_verdict_reads_back_with_its_reasons() -> None:
    assert tr.stored_infeasible_reason({"macs": -1.0}, {"macs": 10.0}) is None
    assert tr.stored_infeasible_reason({"macs": 3.0}, {"macs": 10.0}) == "macs exceeds its limit by 3"
    missing = {"latency_ms_b1": None, tr.MISSING_METRICS: {"latency_ms_b1": "over budget"}}
    assert tr.stored_infeasible_reason({"latency_ms_b1": -1.0}, missing) == "latency_ms_b1 missing (over budget)"
    marked = {tr.FEASIBLE: False, tr.INFEASIBLE_REASON: "objective macs missing (oom)"}
    assert tr.stored_infeasible_reason({}, marked) == "objective macs missing (oom)"


def test_the_screened_and_pruned_records_are_written_whole() -> None:
    t = _Trial()
    tr.write(t, tr.screened_attrs({"macs": 5.0}, "macs=6 > 1", {"val_accuracy": None, "macs": 6.0}))
    assert t.user_attrs == {"constraint_violations": {"macs": 5.0}, "feasible": False, "infeasible_reason": "macs=6 > 1",
                            "screened": True, "screen_reason": "macs=6 > 1",
                            "screened_values": {"val_accuracy": None, "macs": 6.0}}
    assert tr.pruned_attrs(1 / 9, 0, 3, 1, "rank 3") == {"pruned_rung": 1 / 9, "pruned_rung_index": 0,
                                                       "pruned_rank": 3, "pruned_front": 1, "prune_reason": "rank 3"}
