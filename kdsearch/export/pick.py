"""Which trial to export: a trial number, or a ``--pick`` rule over the feasible Pareto front.

``--pick`` rules (a small validated grammar, keywords case-insensitive)::

    rule  := ("max" | "min") METRIC [ "where" cond ( "and" cond )* ]
    cond  := METRIC ("<=" | "<" | ">=" | ">" | "==") NUMBER

``METRIC`` must be a metric kdsearch stores (:func:`kdsearch.metrics.is_known_metric`). A rule
picks from the *feasible Pareto front* (:func:`kdsearch.report.pareto.pareto_front`): the front
trials that meet every condition, then the one with the largest (``max``) or smallest (``min``)
value of the metric; ties go to the lowest trial number. A trial whose metric is missing never
meets a condition and is never picked. The HTML report names the trial the default rule picks
(:func:`default_pick_rule`) with the same :func:`pick_trial`.

Nothing here imports torch: the report imports this module.
"""

from __future__ import annotations

import difflib
import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from kdsearch.errors import ConfigError
from kdsearch.metrics import (
    FIXED_METRICS,
    TEST_SPLIT_RULE,
    is_known_metric,
    is_selectable_metric,
    metric_examples,
    val_counterpart,
)
from kdsearch.report.pareto import feasible, metric_value, pareto_front

__all__ = [
    "Condition",
    "PickRule",
    "parse_pick",
    "pick_trial",
    "DEFAULT_PICK_RULE",
    "default_pick_rule",
    "select_trial",
    "number_ranges",
]

DEFAULT_PICK_RULE = "max val_accuracy"
"""The rule of the default export: the most accurate student (val split) on the feasible front."""


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
# The --pick grammar

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
        fix = f"did you mean {m[0]!r}?" if m else f"known metrics: {', '.join(FIXED_METRICS)}"
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


# ----------------------------------------------------------------------------------------------
# Trial number or rule


def number_ranges(numbers: list[int]) -> str:
    """``[0, 1, 2, 4, 7, 8]`` -> ``"0-2, 4, 7-8"`` (sorted input; ``"none"`` when empty)."""
    if not numbers:
        return "none"
    out: list[str] = []
    start = prev = numbers[0]
    for n in numbers[1:] + [None]:  # type: ignore[list-item]
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(out)


def select_trial(study: optuna.Study, trial_number: int | None, pick: str | None) -> FrozenTrial:
    """The COMPLETE trial named by ``trial_number`` or selected by the ``pick`` rule
    (:func:`pick_trial`). Exactly one of the two must be given."""
    if (trial_number is None) == (pick is None):
        raise ConfigError("--trial/--pick", "give exactly one of --trial K or --pick RULE", None)
    if pick is not None:
        return pick_trial(study, pick)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    complete = sorted(n for n, t in trials.items() if t.state == TrialState.COMPLETE)
    t = trials.get(int(trial_number))  # type: ignore[arg-type]
    if t is None or t.state != TrialState.COMPLETE:
        what = "does not exist" if t is None else f"is {t.state.name}"
        raise ConfigError(
            "--trial",
            f"must be a COMPLETE trial of study {study.study_name!r}; trial {trial_number} {what}",
            trial_number,
            f"COMPLETE trials: {number_ranges(complete)}",
        )
    return t
