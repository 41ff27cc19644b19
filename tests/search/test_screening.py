"""Fixed-cost screening (kdsearch.search.screening), and TPE learning from screened-out trials."""

from __future__ import annotations

import functools
import math

import optuna
import pytest

from kdsearch.models import StudentSpec, student_param_count
from kdsearch.search.screening import screen_fixed_costs

FIXED = ("params", "macs", "model_size_mb", "latency_ms_b1")


def test_a_broken_fixed_cost_is_found_before_training() -> None:
    r = screen_fixed_costs(
        {"params": 2.5e5, "macs": 1e6, "latency_ms_b1": None},
        {"params": 1e5, "macs": 5e6, "latency_ms_b1": 1.0, "val_accuracy_min": 0.5, "peak_kd_memory_mb": 100.0},
        FIXED,
    )
    assert r.violated == ("params",) and not r.feasible_so_far
    assert r.violations == {"params": pytest.approx(1.5e5), "macs": pytest.approx(-4e6)}
    assert r.unchecked == {"latency_ms_b1": "not measured before training", "val_accuracy_min": "needs training",
                           "peak_kd_memory_mb": "needs training"}
    assert r.reason({"params": 1e5}) == "params=2.5e+05 > 1e+05"
    assert r.constraint_values(["params", "macs", "peak_kd_memory_mb"]) == {
        "params": pytest.approx(1.5e5), "macs": pytest.approx(-4e6), "peak_kd_memory_mb": 0.0}


def test_a_student_within_every_limit_passes() -> None:
    r = screen_fixed_costs({"params": 9e4, "macs": 1e6}, {"params": 1e5, "macs": 1e6}, FIXED)
    assert r.feasible_so_far and r.violated == () and r.violations["macs"] == 0.0


DEPTHS = (2, 3, 4, 5, 8, 11)
PARAM_LIMIT = 60_000


@functools.cache
def _vgg_params(depth: int, width: float) -> int:
    spec = StudentSpec.from_dict({"family": "vgg", "resolution": 32, "num_classes": 10, "depth": depth,
                                  "width": width, "in_chans": 3})
    return student_param_count(spec)


def _tpe_run(seed: int, *, screened: bool, n: int = 60) -> list[bool]:
    """One TPE study over VGG depth x width; True where the proposal breaks the params limit.

    No training: the objective rewards capacity (log params, as accuracy would) and the second
    objective is the parameter count, the real one of the VGG student. ``screened``: a student
    over the limit ends at once, PRUNED, its violation set with ``trial.set_constraint`` (what a
    live trial does after screening). Otherwise it is told like any finished trial (the control:
    a study with no constraint).
    """
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=10)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    out: list[bool] = []
    for _ in range(n):
        trial = study.ask()
        depth = trial.suggest_categorical("depth", DEPTHS)
        width = trial.suggest_float("width", 1 / 16, 1.0, log=True)
        params = _vgg_params(depth, round(width, 4))
        screen = screen_fixed_costs({"params": float(params)}, {"params": PARAM_LIMIT}, FIXED)
        out.append(not screen.feasible_so_far)
        values = [math.log(params) - 0.02 * depth, float(params)]
        if screened:
            trial.set_constraint("params", screen.constraint_values(["params"])["params"])
            if not screen.feasible_so_far:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)  # ended in seconds, no box spent
                continue
        study.tell(trial, values)
    return out


def test_tpe_stops_proposing_students_over_a_params_limit() -> None:
    """Pooled over 4 seeds: under the screened constraint the infeasible share falls from the
    first third of the study to the last, and ends far below the unconstrained control's."""
    seeds = range(4)
    screened = [_tpe_run(s, screened=True) for s in seeds]
    control = [_tpe_run(s, screened=False) for s in seeds]

    def share(runs: list[list[bool]], part: slice) -> float:
        flags = [f for r in runs for f in r[part]]
        return sum(flags) / len(flags)

    first, last = slice(0, 20), slice(40, 60)
    assert share(screened, first) >= 0.2  # the start does land in the infeasible region
    assert share(screened, last) <= 0.75 * share(screened, first), (share(screened, first), share(screened, last))
    assert share(screened, last) <= 0.5 * share(control, last), (share(screened, last), share(control, last))
