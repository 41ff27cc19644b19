"""The trial table of ``kdsearch trials`` and of the end of ``kdsearch optimize``: as a rich table
or as JSON-ready records.

``pareto=True`` keeps the feasible Pareto front plus the COMPLETE trials that break a constraint
(marked INFEASIBLE, so a user sees why a good-looking trial is not on the front).
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.table import Table

from kdsearch.metrics import format_metric
from kdsearch.report.pareto import feasible, pareto_front

__all__ = ["PARETO_FOOTNOTE", "table_trials", "trials_table", "trial_records"]

PARETO_FOOTNOTE = "* = on the feasible Pareto front; INFEASIBLE rows break a constraint and are not on it."


def table_trials(study: optuna.Study, pareto: bool) -> tuple[list[FrozenTrial], set[int]]:
    """(the trials to show, the numbers of the trials on the feasible front)."""
    trials = study.get_trials(deepcopy=False)
    front = {t.number for t in pareto_front(study, feasible_only=True)}
    if pareto:
        trials = [t for t in trials if t.number in front or (t.state == TrialState.COMPLETE and not feasible(t))]
    return trials, front


def trials_table(study: optuna.Study, pareto: bool) -> Table:
    """One row per trial: number, state, student, teacher, each objective, KD time, front mark."""
    trials, front = table_trials(study, pareto)
    names = study.metric_names or [f"value{i}" for i in range(len(study.directions))]
    table = Table(title=f"{study.study_name}: {'Pareto front (feasible)' if pareto else 'all trials'}")
    extra = [] if "kd_time_s" in names else ["kd_time_s"]
    for col in ["#", "state", "student", "teacher", *names, *extra, "front"]:
        table.add_column(col, justify="right" if col not in ("state", "student", "teacher") else "left")
    for t in trials:
        ua = t.user_attrs
        vals = [format_metric(m, v) for m, v in zip(names, t.values, strict=True)] if t.values else ["—"] * len(names)
        state = t.state.name
        if state == "COMPLETE" and not feasible(t):
            state = "INFEASIBLE"
        elif state == "FAIL":
            state = f"FAIL ({ua.get('fail_reason', '?')})"
        mark = "*" if t.number in front else ""
        kd = [format_metric("kd_time_s", ua.get("kd_time_s"))] if extra else []
        table.add_row(str(t.number), state, str(ua.get("student", "")), str(ua.get("teacher", "")), *vals, *kd, mark)
    return table


def trial_records(study: optuna.Study, pareto: bool) -> list[dict[str, object]]:
    """The same trials as records: number, state, params, values, user attrs, constraints,
    ``feasible`` (None unless COMPLETE) and ``pareto``."""
    trials, front = table_trials(study, pareto)
    return [
        {
            "number": t.number,
            "state": t.state.name,
            "params": t.params,
            "values": t.values,
            "user_attrs": t.user_attrs,
            "constraints": t.constraints,
            "feasible": feasible(t) if t.state == TrialState.COMPLETE else None,
            "pareto": t.number in front,
        }
        for t in trials
    ]
