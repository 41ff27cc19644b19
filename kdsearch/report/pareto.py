"""The feasible Pareto front, infeasible marking, trial-table rows with units, and ``--pick``.

Everything here reads stored trials only (see docs/ARCHITECTURE.md, "Storage contract").

Feasibility: a COMPLETE trial is feasible when every constraint value Optuna stores for it
(``trial.set_constraint(metric, value - limit)``) is ``<= 0`` and no constrained metric is missing
(``None`` in its user attrs) or not finite. A trial without constraints is feasible.

``--pick`` rules (a small validated grammar, keywords case-insensitive)::

    rule  := ("max" | "min") METRIC [ "where" cond ( "and" cond )* ]
    cond  := METRIC ("<=" | "<" | ">=" | ">" | "==") NUMBER

``METRIC`` must be a metric kdsearch stores (:func:`kdsearch.metrics.is_known_metric`). A rule
picks from the *feasible Pareto front*: the front trials that meet every condition, then the one
with the largest (``max``) or smallest (``min``) value of the metric; ties go to the lowest trial
number. A trial whose metric is missing never meets a condition and is never picked.
"""

from __future__ import annotations

import difflib
import math
import operator
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from kdsearch.errors import ConfigError
from kdsearch.metrics import (
    KNOWN_METRICS,
    TEST_SPLIT_RULE,
    format_metric,
    is_known_metric,
    is_selectable_metric,
    metric_examples,
    metric_unit,
    val_counterpart,
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
    "Condition",
    "PickRule",
    "parse_pick",
    "pick_trial",
    "trial_state_label",
    "teacher_accuracies",
    "DEFAULT_PICK_RULE",
    "default_pick_rule",
    "front_sorted",
    "best_per_objective",
]

DEFAULT_PICK_RULE = "max val_accuracy"
"""The rule of the default export: the most accurate student (val split) on the feasible front."""


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
    reasons: list[str] = []
    for metric, violation in sorted(trial.constraints.items()):
        # A constrained metric stored as None (or NaN/Inf) is missing: infeasible whatever the
        # stored violation says.
        missing = metric in trial.user_attrs and metric_value(trial, metric) is None
        if missing:
            why = (trial.user_attrs.get("missing_metrics") or {}).get(metric, "not measured")
            reasons.append(f"{metric} missing ({why})")
        elif not math.isfinite(violation) or violation > 0:
            reasons.append(f"{metric} exceeds its limit by {violation:.4g}")
    if not reasons and trial.user_attrs.get("feasible") is False:
        reasons.append(str(trial.user_attrs.get("infeasible_reason") or "marked infeasible when stored"))
    return "; ".join(reasons) if reasons else None


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
    stored = study.user_attrs.get("teachers")
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


def default_pick_rule(study: optuna.Study, front: Sequence[FrozenTrial] | None = None) -> str:
    """The ``--pick`` rule of the default export: :data:`DEFAULT_PICK_RULE` (every trial stores
    ``val_accuracy``); for a study whose front lacks it, the best value of its first objective
    (``max NAME`` / ``min NAME``) when that is a known, selectable metric."""
    names = list(study.metric_names or [])
    pool = list(front) if front is not None else pareto_front(study, feasible_only=True)
    if any(metric_value(t, "val_accuracy", names) is not None for t in pool) or not names:
        return DEFAULT_PICK_RULE
    first = names[0]
    if not is_known_metric(first) or not is_selectable_metric(first):
        return DEFAULT_PICK_RULE
    return f"{'min' if study.directions[0] == StudyDirection.MINIMIZE else 'max'} {first}"


# ----------------------------------------------------------------------------------------------
# Table rows


def _is_metric_attr(key: str, value: Any) -> bool:
    return metric_unit(key) is not None and (value is None or isinstance(value, (int, float)))


def metric_columns(study: optuna.Study, trials: Sequence[FrozenTrial] | None = None) -> list[str]:
    """Metric names to show: the objectives first, then every other stored metric in the order
    of :data:`kdsearch.metrics.KNOWN_METRICS`, then the batch-size metrics (latency, memory) sorted."""
    pool = _trials_of(trials if trials is not None else study)
    present: set[str] = set()
    for t in pool:
        present.update(k for k, v in t.user_attrs.items() if _is_metric_attr(k, v))
    names = list(study.metric_names or [])
    for name in KNOWN_METRICS:
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
    label = trial.user_attrs.get("student")
    if label:
        return str(label)
    spec = trial.user_attrs.get("spec")
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
        missing = ua.get("missing_metrics") or {}
        methods = ua.get("methods") or {}
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
                teacher=str(ua.get("teacher", "")),
                on_front=t.number in front,
                cells=cells,
                params=dict(t.params),
                infeasible_reason=infeasible_reason(t) if t.state == TrialState.COMPLETE else None,
                fail_reason=ua.get("fail_reason"),
                fail_detail=ua.get("fail_detail"),
                artifact_id=ua.get("artifact_id"),
                weights_sha256=ua.get("weights_sha256"),
            )
        )
    return out


# ----------------------------------------------------------------------------------------------
# --pick

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    "<": operator.lt,
    ">=": operator.ge,
    ">": operator.gt,
    "==": operator.eq,
}
_TOKEN_RE = re.compile(
    r"\s*(?:(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(?![A-Za-z_])"
    r"|(?P<op><=|>=|==|<|>)"
    r"|(?P<word>[A-Za-z_][A-Za-z0-9_]*))"
)
_EXAMPLE = 'e.g. "max val_accuracy where latency_ms_b1 <= 2"'


@dataclass(frozen=True)
class _Token:
    kind: str  # num | op | word | end
    text: str
    pos: int  # 1-based character position in the rule


@dataclass(frozen=True)
class Condition:
    metric: str
    op: str
    value: float

    def holds(self, value: float | None) -> bool:
        return value is not None and _OPS[self.op](value, self.value)

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"


@dataclass(frozen=True)
class PickRule:
    """A parsed ``--pick`` rule: ``direction`` is ``max`` or ``min``."""

    direction: str
    metric: str
    conditions: tuple[Condition, ...] = ()
    text: str = ""

    def __str__(self) -> str:
        s = f"{self.direction} {self.metric}"
        if self.conditions:
            s += " where " + " and ".join(str(c) for c in self.conditions)
        return s


def _tokenize(rule: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(rule):
        if rule[pos:].strip() == "":
            break
        m = _TOKEN_RE.match(rule, pos)
        if m is None or m.end() == pos:
            start = pos + (len(rule[pos:]) - len(rule[pos:].lstrip()))
            raise ConfigError(
                "--pick",
                f"unexpected character {rule[start]!r} at position {start + 1}",
                rule,
                _EXAMPLE,
            )
        kind = m.lastgroup or "word"
        tokens.append(_Token(kind, m.group(kind), m.start(kind) + 1))
        pos = m.end()
    tokens.append(_Token("end", "", len(rule) + 1))
    return tokens


def _expect_metric(tok: _Token, rule: str) -> str:
    if tok.kind != "word":
        what = "the end of the rule" if tok.kind == "end" else repr(tok.text)
        raise ConfigError("--pick", f"expected a metric name at position {tok.pos}, found {what}", rule, _EXAMPLE)
    if not is_known_metric(tok.text):
        m = difflib.get_close_matches(tok.text, metric_examples(), n=1, cutoff=0.5)
        fix = f"did you mean {m[0]!r}?" if m else f"known metrics: {', '.join(KNOWN_METRICS)}"
        raise ConfigError("--pick", f"unknown metric {tok.text!r} at position {tok.pos}", rule, fix)
    if not is_selectable_metric(tok.text):  # a pick selects: test figures are for reporting only
        alt = val_counterpart(tok.text)
        raise ConfigError("--pick", f"{tok.text!r} at position {tok.pos} {TEST_SPLIT_RULE}", rule,
                          f"use {alt!r} instead" if alt else None)
    return tok.text


def parse_pick(rule: str) -> PickRule:
    """Parse a ``--pick`` rule (grammar in the module docstring).

    Raises :class:`~kdsearch.errors.ConfigError` (field ``--pick``) naming the offending token and
    its 1-based position, and suggesting the closest metric for a misspelt one.
    """
    if not isinstance(rule, str) or not rule.strip():
        raise ConfigError("--pick", "must be a rule such as 'max val_accuracy'", rule, _EXAMPLE)
    toks = _tokenize(rule)
    i = 0
    head = toks[i]
    if head.kind != "word" or head.text.lower() not in ("max", "min"):
        found = "the end of the rule" if head.kind == "end" else repr(head.text)
        raise ConfigError("--pick", f"must start with 'max' or 'min' (position {head.pos}: {found})", rule, _EXAMPLE)
    direction = head.text.lower()
    i += 1
    metric = _expect_metric(toks[i], rule)
    i += 1
    conditions: list[Condition] = []
    if toks[i].kind != "end":
        if not (toks[i].kind == "word" and toks[i].text.lower() == "where"):
            raise ConfigError(
                "--pick", f"expected 'where' or the end of the rule at position {toks[i].pos}, found {toks[i].text!r}",
                rule, _EXAMPLE,
            )
        i += 1
        while True:
            cm = _expect_metric(toks[i], rule)
            i += 1
            op = toks[i]
            if op.kind != "op":
                found = "the end of the rule" if op.kind == "end" else repr(op.text)
                raise ConfigError(
                    "--pick", f"expected one of <=, <, >=, >, == at position {op.pos}, found {found}", rule, _EXAMPLE
                )
            i += 1
            num = toks[i]
            if num.kind != "num":
                found = "the end of the rule" if num.kind == "end" else repr(num.text)
                raise ConfigError("--pick", f"expected a number at position {num.pos}, found {found}", rule, _EXAMPLE)
            value = float(num.text)
            if not math.isfinite(value):
                raise ConfigError("--pick", f"the number at position {num.pos} must be finite", rule)
            conditions.append(Condition(cm, op.text, value))
            i += 1
            if toks[i].kind == "end":
                break
            if toks[i].kind == "word" and toks[i].text.lower() == "and":
                i += 1
                continue
            raise ConfigError(
                "--pick", f"expected 'and' or the end of the rule at position {toks[i].pos}, found {toks[i].text!r}",
                rule, _EXAMPLE,
            )
    return PickRule(direction, metric, tuple(conditions), rule)


def pick_trial(study: optuna.Study, rule: str | PickRule) -> FrozenTrial:
    """The trial of the feasible Pareto front that ``rule`` selects (see the module docstring).

    Raises :class:`~kdsearch.errors.ConfigError` naming the rule when no front trial has the
    metric and meets every condition.
    """
    parsed = parse_pick(rule) if isinstance(rule, str) else rule
    names = list(study.metric_names or [])
    front = pareto_front(study, feasible_only=True)
    ok = [
        t
        for t in front
        if metric_value(t, parsed.metric, names) is not None
        and all(c.holds(metric_value(t, c.metric, names)) for c in parsed.conditions)
    ]
    if not ok:
        if not front:
            raise ConfigError(
                "--pick", f"the study {study.study_name!r} has no feasible COMPLETE trial to pick from", str(parsed)
            )
        others = [
            t.number
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if feasible(t)
            and t.number not in {f.number for f in front}
            and metric_value(t, parsed.metric, names) is not None
            and all(c.holds(metric_value(t, c.metric, names)) for c in parsed.conditions)
        ]
        fix = (
            f"feasible trials off the front that meet it: {others[:10]}; export one with --trial K"
            if others
            else "relax the conditions, or use --trial K"
        )
        raise ConfigError(
            "--pick",
            f"no trial on the feasible Pareto front ({len(front)} trials: "
            f"{[t.number for t in front][:10]}) meets the rule",
            str(parsed),
            fix,
        )
    sign = -1.0 if parsed.direction == "max" else 1.0
    return min(ok, key=lambda t: (sign * metric_value(t, parsed.metric, names), t.number))  # type: ignore[operator]
