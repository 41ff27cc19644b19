"""Feasible Pareto front, infeasible marking, trial rows with units, and the --pick grammar."""

from __future__ import annotations

import pytest
from optuna.trial import TrialState

from kdsearch.errors import ConfigError, StorageError
from kdsearch.export.pick import Condition, PickRule, parse_pick, pick_trial
from kdsearch.metrics import format_metric, metric_unit
from kdsearch.report.pareto import (
    feasible,
    infeasible_reason,
    load_trials,
    metric_columns,
    pareto_front,
    trial_rows,
    trial_state_label,
)

from study_helpers import FIXTURE_ROWS, FixtureStudy


def test_load_trials_reads_every_state(fixture_study: FixtureStudy) -> None:
    trials = load_trials(fixture_study.storage_url, fixture_study.study_name)
    assert [t.number for t in trials] == list(range(10))
    assert [t.number for t in trials if t.state == TrialState.FAIL] == fixture_study.failed == [8, 9]
    with pytest.raises(StorageError, match="no study 'nope'"):
        load_trials(fixture_study.storage_url, "nope")


def test_feasible_front_leaves_out_infeasible_and_missing(fixture_study: FixtureStudy) -> None:
    study = fixture_study.open()
    by_number = {t.number: t for t in study.trials}
    assert [t.number for t in pareto_front(study)] == fixture_study.feasible_front == [0, 1, 4, 7]
    # Without the constraint the over-limit trial 3 and the unmeasured trial 5 would be on the front.
    assert [t.number for t in pareto_front(study, feasible_only=False)] == [0, 1, 3, 4, 5, 7]
    assert [n for n, t in by_number.items() if not feasible(t) and t.state == TrialState.COMPLETE] == [3, 5]
    assert "exceeds its limit by 1.5" in infeasible_reason(by_number[3])
    assert "latency_ms_b1 missing" in infeasible_reason(by_number[5])
    assert "RuntimeError" in infeasible_reason(by_number[5])
    assert not feasible(by_number[8])  # FAIL is never feasible
    assert [trial_state_label(by_number[n]) for n in (0, 3, 5, 8)] == ["COMPLETE", "INFEASIBLE", "INFEASIBLE", "FAIL"]


def test_missing_constrained_metric_is_infeasible_even_with_a_zero_violation(fixture_study: FixtureStudy) -> None:
    # The storage contract stores None for an unmeasured metric; a writer that forgot the
    # violation sentinel must still not make the trial feasible.
    trial = fixture_study.open().trials[1]
    import copy

    forged = copy.deepcopy(trial)
    forged.user_attrs["latency_ms_b1"] = None
    assert feasible(trial) and not feasible(forged)


def test_three_objective_front(fixture_study3: FixtureStudy) -> None:
    study = fixture_study3.open()
    assert [t.number for t in pareto_front(study)] == fixture_study3.feasible_front
    assert 2 in fixture_study3.feasible_front  # dominated in 2-D, but the fastest KD at its accuracy


def test_trial_rows_carry_units_and_missing_reasons(fixture_study: FixtureStudy) -> None:
    study = fixture_study.open()
    cols = metric_columns(study)
    assert cols[:2] == ["val_accuracy", "macs"]  # objectives first
    assert {"latency_ms_b1", "latency_p90_ms_b1", "kd_energy_j", "params"} <= set(cols)
    rows = trial_rows(study)
    assert [r.number for r in rows] == [0, 1, 4, 7] and all(r.on_front for r in rows)
    for r in rows:
        assert r.state == "COMPLETE"
        assert r.cells["val_accuracy"].value == FIXTURE_ROWS[r.number][3]
        assert r.cells["macs"].value == FIXTURE_ROWS[r.number][4]
        for m, c in r.cells.items():
            assert c.unit == metric_unit(m)
        energy = r.cells["kd_energy_j"]
        assert energy.value is None and energy.text() == "—" and "NVML" in energy.missing_reason
        assert r.artifact_id and r.weights_sha256
    assert rows[0].cells["val_accuracy"].text() == "41.00%"
    macs = rows[0].cells["macs"]
    assert macs.text() == format_metric("macs", macs.value) == f"{macs.value / 1e6:.4g} M"  # the one formatter
    assert rows[0].cells["latency_ms_b1"].method == "perf_counter"
    all_rows = trial_rows(study, trials=study.trials)
    assert {r.number: r.state for r in all_rows}[9] == "FAIL"
    assert {r.number: r.fail_reason for r in all_rows}[8] == "oom"


# ----------------------------------------------------------------------------------------------
# --pick grammar

VALID = [
    ("max val_accuracy", PickRule("max", "val_accuracy")),
    ("  MIN   macs ", PickRule("min", "macs")),
    (
        "max val_accuracy where latency_ms_b1 <= 2 and macs < 1.5e6",
        PickRule("max", "val_accuracy", (Condition("latency_ms_b1", "<=", 2.0), Condition("macs", "<", 1.5e6))),
    ),
    ("max val_accuracy WHERE latency_ms_b1<=1.5", PickRule("max", "val_accuracy", (Condition("latency_ms_b1", "<=", 1.5),))),
    (
        "min kd_time_s where val_accuracy >= .5 and params > -1 and latency_p90_ms_b64_cuda == 3",
        PickRule(
            "min",
            "kd_time_s",
            (Condition("val_accuracy", ">=", 0.5), Condition("params", ">", -1.0), Condition("latency_p90_ms_b64_cuda", "==", 3.0)),
        ),
    ),
]


@pytest.mark.parametrize(("rule", "expected"), VALID, ids=[v[0].strip() for v in VALID])
def test_parse_pick_valid(rule: str, expected: PickRule) -> None:
    parsed = parse_pick(rule)
    assert (parsed.direction, parsed.metric, parsed.conditions) == (expected.direction, expected.metric, expected.conditions)


INVALID = [
    ("", "must be a rule"),
    ("maximum val_accuracy", "must start with 'max' or 'min' (position 1: 'maximum')"),
    ("max", "expected a metric name at position 4, found the end of the rule"),
    ("max val_acuracy", "unknown metric 'val_acuracy' at position 5 (got 'max val_acuracy'); did you mean 'val_accuracy'?"),
    ("max val_accuracy where latncy_ms_b1 <= 2", "did you mean 'latency_ms_b1'?"),
    ("max val_accuracy latency_ms_b1", "expected 'where' or the end of the rule at position 18, found 'latency_ms_b1'"),
    ("max val_accuracy where latency_ms_b1 2", "expected one of <=, <, >=, >, == at position 38, found '2'"),
    ("max val_accuracy where latency_ms_b1 <= fast", "expected a number at position 41, found 'fast'"),
    ("max val_accuracy where latency_ms_b1 <= 2 or macs < 5", "expected 'and' or the end of the rule at position 43, found 'or'"),
    ("max val_accuracy where latency_ms_b1 <= 2 and", "expected a metric name at position 46, found the end of the rule"),
    ("max val_accuracy; drop", "unexpected character ';' at position 17"),
    ("max 3", "expected a metric name at position 5, found '3'"),
    ("max val_accuracy where <= 2", "expected a metric name at position 24, found '<='"),
    ("max test_accuracy", "'test_accuracy' at position 5 is measured on the test split, which never steers the search"),
    ("max val_accuracy where ft_gain > 0", "use 'ft_gain_val' instead"),
]


@pytest.mark.parametrize(("rule", "message"), INVALID, ids=[v[0] or "<empty>" for v in INVALID])
def test_parse_pick_errors_name_the_token_and_position(rule: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_pick(rule)
    text = str(info.value)
    assert text.startswith("--pick: ") and "\n" not in text
    assert message in text


PICKS = [
    ("max val_accuracy", 7),  # trial 3 is more accurate but breaks the latency limit
    ("min macs", 0),
    ("max val_accuracy where latency_ms_b1 <= 1.5", 1),
    ("max val_accuracy where macs < 2e6 and latency_ms_b1 < 1.9", 4),
    ("min latency_ms_b1 where val_accuracy >= 0.6", 1),
    ("min kd_time_s", 0),
]


@pytest.mark.parametrize(("rule", "number"), PICKS, ids=[p[0] for p in PICKS])
def test_pick_trial_chooses_from_the_feasible_front(fixture_study: FixtureStudy, rule: str, number: int) -> None:
    study = fixture_study.open()
    picked = pick_trial(study, rule)
    assert picked.number == number
    assert picked.number in fixture_study.feasible_front


def test_pick_trial_without_a_match_names_the_rule(fixture_study: FixtureStudy) -> None:
    study = fixture_study.open()
    with pytest.raises(ConfigError, match=r"no trial on the feasible Pareto front .* meets the rule \(got 'max val_accuracy where latency_ms_b1 < 0.1'\)"):
        pick_trial(study, "max val_accuracy where latency_ms_b1 < 0.1")
    # Trial 2 (0.55, dominated) meets this one: the message says so instead of picking it.
    with pytest.raises(ConfigError, match=r"feasible trials off the front that meet it: \[2\]"):
        pick_trial(study, "max val_accuracy where val_accuracy >= 0.5 and val_accuracy <= 0.6")


@pytest.mark.parametrize("directions", [["maximize", "minimize"], ["minimize", "minimize", "maximize"]])
def test_fast_front_equals_the_pairwise_definition_with_ties_and_constraints(directions: list[str]) -> None:
    import random

    import optuna
    from optuna.trial import create_trial

    rng = random.Random(len(directions))
    study = optuna.create_study(directions=directions)
    grid = [0.0, 0.25, 0.5, 0.75, 1.0]  # coarse values: many ties and duplicates
    trials = []
    for i in range(300):
        values = [rng.choice(grid) for _ in directions]
        violation = rng.choice([-1.0, -1.0, -1.0, 0.5])
        state = TrialState.FAIL if i % 17 == 0 else TrialState.COMPLETE
        trials.append(create_trial(state=state, values=values if state == TrialState.COMPLETE else None,
                                   constraints={"c": violation}))
    study.add_trials(trials)
    stored = study.get_trials(deepcopy=False)
    signs = [1 if d == "minimize" else -1 for d in directions]

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(s * x <= s * y for s, x, y in zip(signs, a, b, strict=True)) and a != b

    for feasible_only in (True, False):
        pool = [t for t in stored if t.state == TrialState.COMPLETE and (feasible(t) or not feasible_only)]
        expected = [t.number for t in pool if not any(dominates(o.values, t.values) for o in pool)]
        assert [t.number for t in pareto_front(study, feasible_only=feasible_only)] == expected
    assert len(expected) > len({tuple(t.values) for t in pareto_front(study, feasible_only=False)})  # ties kept
