"""The feasible Pareto front, infeasible marking and trial-table rows with units.

Everything here reads stored trials only (see docs/ARCHITECTURE.md, "Storage contract").

Feasibility: a COMPLETE trial is feasible when every constraint value Optuna stores for it
(``trial.set_constraint(metric, value - limit)``) is ``<= 0`` and no constrained metric is missing
(``None`` in its user attrs) or not finite. A trial without constraints is feasible.

Which trial of the front to export (the ``--pick`` grammar) is :mod:`kdsearch.export.pick`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from kdsearch import trial_record as tr
from kdsearch.metrics import (
    FIXED_METRICS,
    format_metric,
    metric_unit,
)
from kdsearch.pareto import non_dominated, signs, to_losses
from kdsearch.storage import load_study

__all__ = [
    "load_trials",
    "feasible",
    "infeasible_reason",
    "pareto_front",
    "metric_value",
    "metric_columns",
    "Cell",
    "TrialRow",
    "trial_rows",
    "trial_state_label",
    "teacher_accuracies",
    "front_sorted",
    "best_per_objective",
]


# ----------------------------------------------------------------------------------------------
# Loading


def load_trials(storage_url: str, study_name: str) -> list[FrozenTrial]:
    """Every stored trial of the study (all states), in trial-number order."""
    study = load_study(storage_url, study_name)
    return sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)


def _trials_of(study_or_trials: optuna.Study | Iterable[FrozenTrial]) -> list[FrozenTrial]:
    if isinstance(study_or_trials, optuna.Study):
        return sorted(study_or_trials.get_trials(deepcopy=False), key=lambda t: t.number)
    return sorted(study_or_trials, key=lambda t: t.number)


# ----------------------------------------------------------------------------------------------
# Feasibility and the front


def metric_value(trial: FrozenTrial, metric: str, metric_names: Sequence[str] | None = None) -> float | None:
    """A trial's value of ``metric``: the user attr, else the objective value of that name.

    Returns ``None`` when it is missing or not a finite number.
    """
    value = trial.user_attrs.get(metric)
    if value is None and metric_names and trial.values is not None and metric in metric_names:
        value = trial.values[list(metric_names).index(metric)]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def infeasible_reason(trial: FrozenTrial) -> str | None:
    """Why a COMPLETE trial breaks a constraint (``None`` when it is feasible)."""
    return tr.stored_infeasible_reason(trial.constraints, trial.user_attrs)


def feasible(trial: FrozenTrial) -> bool:
    """True for a COMPLETE trial whose constraints are all ``<= 0`` with no constrained metric missing."""
    if trial.state != TrialState.COMPLETE:
        return False
    return infeasible_reason(trial) is None


def pareto_front(
    study: optuna.Study,
    feasible_only: bool = True,
    trials: Sequence[FrozenTrial] | None = None,
) -> list[FrozenTrial]:
    """The non-dominated COMPLETE trials (by the study's directions), in trial-number order.

    With ``feasible_only`` (the default) infeasible trials are left out *before* dominance is
    computed, so an infeasible trial never hides a feasible one. Trials with identical values
    are all kept. ``trials`` restricts the pool (default: every stored trial).

    Dominance is :mod:`kdsearch.pareto`'s (the one the rung pruner uses), computed by moocore.
    """
    pool = _trials_of(trials if trials is not None else study)
    candidates = [
        t for t in pool
        if t.state == TrialState.COMPLETE
        and t.values is not None
        and all(math.isfinite(v) for v in t.values)
        and (not feasible_only or feasible(t))
    ]
    if not candidates:
        return []
    keep = non_dominated(to_losses([t.values for t in candidates], study.directions))
    return [t for t, on in zip(candidates, keep, strict=True) if on]


def trial_state_label(trial: FrozenTrial) -> str:
    """``COMPLETE``, ``INFEASIBLE`` (complete but breaks a constraint), ``FAIL``, ``RUNNING``, ..."""
    if trial.state == TrialState.COMPLETE and not feasible(trial):
        return "INFEASIBLE"
    return trial.state.name


def teacher_accuracies(study: optuna.Study, split: str = "val") -> dict[str, float]:
    """Each teacher's accuracy on ``split`` (``val`` or ``test``), label -> fraction, as the
    search stored it (study user attr ``teachers``); empty when not recorded."""
    stored = study.user_attrs.get(tr.TEACHERS)
    out: dict[str, float] = {}
    if isinstance(stored, dict):
        for label, info in stored.items():
            v = info.get(f"{split}_accuracy") if isinstance(info, dict) else None
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[str(label)] = float(v)
    return out


def front_sorted(study: optuna.Study, trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """``trials`` best first by the first objective (ties: the next objectives, then the trial
    number); a trial without values goes last."""
    sgn = [float(x) for x in signs(study.directions)]

    def key(t: FrozenTrial) -> tuple[int, tuple[float, ...], int]:
        if t.values is None:
            return (1, (), t.number)
        return (0, tuple(sg * v for sg, v in zip(sgn, t.values, strict=False)), t.number)

    return sorted(trials, key=key)


def best_per_objective(study: optuna.Study, front: Sequence[FrozenTrial] | None = None) -> dict[str, FrozenTrial]:
    """For each objective (by name), the trial of the feasible Pareto front with its best value
    (ties: the lowest trial number). Empty when the front is."""
    pool = list(front) if front is not None else pareto_front(study, feasible_only=True)
    names = list(study.metric_names or [f"objective_{i}" for i in range(len(study.directions))])
    out: dict[str, FrozenTrial] = {}
    for k, (name, sg) in enumerate(zip(names, (float(x) for x in signs(study.directions)), strict=False)):
        done = [t for t in pool if t.values is not None]
        if done:
            out[name] = min(done, key=lambda t, k=k, sg=sg: (sg * t.values[k], t.number))
    return out


# ----------------------------------------------------------------------------------------------
# Table rows


def _is_metric_attr(key: str, value: Any) -> bool:
    return metric_unit(key) is not None and (value is None or isinstance(value, (int, float)))


def metric_columns(study: optuna.Study, trials: Sequence[FrozenTrial] | None = None) -> list[str]:
    """Metric names to show: the objectives first, then every other stored metric in the order
    of :data:`kdsearch.metrics.FIXED_METRICS`, then the batch-size metrics (latency, memory) sorted."""
    pool = _trials_of(trials if trials is not None else study)
    # Keys that hold a number (or None) in some trial; only keys not yet known as such are looked
    # at (trials share their keys: a few thousand trials cost a set difference each, not a scan
    # of every attribute), and a metric's unit is looked up once per key.
    numeric: set[str] = set()
    for t in pool:
        attrs = t.user_attrs
        numeric.update(k for k in attrs.keys() - numeric if attrs[k] is None or isinstance(attrs[k], (int, float)))
    present = {k for k in numeric if _is_metric_attr(k, None)}
    names = list(study.metric_names or [])
    for name in FIXED_METRICS:
        if name in present and name not in names:
            names.append(name)
    rest = sorted(n for n in present if n not in names)
    return names + rest


@dataclass(frozen=True)
class Cell:
    """One metric of one trial: value (``None`` if missing), unit and, when missing, why."""

    metric: str
    value: float | None
    unit: str
    missing_reason: str | None = None
    method: str | None = None

    def text(self) -> str:
        """Human text, by :func:`kdsearch.metrics.format_metric`."""
        return format_metric(self.metric, self.value)


@dataclass(frozen=True)
class TrialRow:
    """One row of the trial table."""

    number: int
    state: str  # COMPLETE | INFEASIBLE | FAIL | RUNNING | PRUNED | WAITING
    student: str
    teacher: str
    on_front: bool
    cells: dict[str, Cell]
    params: dict[str, Any] = field(default_factory=dict)
    infeasible_reason: str | None = None
    fail_reason: str | None = None
    fail_detail: str | None = None
    artifact_id: str | None = None
    weights_sha256: str | None = None


def _student_label(trial: FrozenTrial) -> str:
    label = trial.user_attrs.get(tr.STUDENT)
    if label:
        return str(label)
    spec = trial.user_attrs.get(tr.SPEC)
    if isinstance(spec, dict):
        try:
            from kdsearch.models.spec import StudentSpec

            return StudentSpec.from_dict(spec).label
        except (TypeError, ValueError):
            pass
    return ""


def trial_rows(
    study: optuna.Study,
    trials: Sequence[FrozenTrial] | None = None,
    columns: Sequence[str] | None = None,
) -> list[TrialRow]:
    """Rows for ``trials`` (default: the feasible Pareto front) with every metric in ``columns``
    (default: :func:`metric_columns`), each with its unit and, when missing, the stored reason."""
    front = {t.number for t in pareto_front(study, feasible_only=True)}
    rows_of = list(trials) if trials is not None else pareto_front(study, feasible_only=True)
    cols = list(columns) if columns is not None else metric_columns(study)
    names = list(study.metric_names or [])
    out: list[TrialRow] = []
    for t in rows_of:
        ua = t.user_attrs
        missing = ua.get(tr.MISSING_METRICS) or {}
        methods = ua.get(tr.METHODS) or {}
        cells: dict[str, Cell] = {}
        for m in cols:
            value = metric_value(t, m, names)
            reason = None
            if value is None:
                if m in missing:
                    reason = str(missing[m])
                elif t.state != TrialState.COMPLETE:
                    reason = f"trial {t.state.name.lower()}"
                else:
                    reason = "not recorded for this trial"
            meth = methods.get(m)
            method = str(meth.get("method")) if isinstance(meth, dict) and meth.get("method") else None
            cells[m] = Cell(m, value, metric_unit(m) or "", reason, method)
        out.append(
            TrialRow(
                number=t.number,
                state=trial_state_label(t),
                student=_student_label(t),
                teacher=str(ua.get(tr.TEACHER, "")),
                on_front=t.number in front,
                cells=cells,
                params=dict(t.params),
                infeasible_reason=infeasible_reason(t) if t.state == TrialState.COMPLETE else None,
                fail_reason=ua.get(tr.FAIL_REASON),
                fail_detail=ua.get(tr.FAIL_DETAIL),
                artifact_id=ua.get(tr.ARTIFACT_ID),
                weights_sha256=ua.get(tr.WEIGHTS_SHA256),
            )
        )
    return out
