"""TPE that learns from the trials the rung pruner stopped (``study.sampler: tpe-impute``, ``tpe-bohb``).

Optuna's multi-objective TPE splits the finished trials into a "good" group (non-dominated
sorting plus hypervolume subset selection over the COMPLETE trials) and a "bad" group. A PRUNED
trial of a multi-objective study has no intermediate values (``Trial.report`` refuses more than
one objective), so Optuna puts every one of them in the bad group: the sampler learns that a
trial was stopped, never how close it came. Yet the rung pruner stored what it saw: each trial's
rung vector (validation accuracy at the rung plus its fixed-cost objectives) in user attr
``rung_<k>`` (:data:`kdsearch.trial_record.RUNG_PREFIX`), written for every trial that reached
rung k, from any worker.

:class:`RungTPESampler` is Optuna's :class:`~optuna.samplers.TPESampler` unchanged except for
the trials it reads: its ``_sample`` is given a view of the study (:class:`RungStudyView`) whose
``_get_trials`` presents the stored PRUNED trials differently, by one of three modes:

* ``impute``: a PRUNED trial becomes a COMPLETE one whose validation accuracy is predicted from
  its highest rung's accuracy through the rung-to-final relation of the study's own COMPLETE
  trials (a least-squares line per rung and per box bracket, slope at least 0, fitted once at
  least ``min_observations`` COMPLETE trials reached that rung); its fixed-cost objectives are its
  measured rung values. A trial whose other objectives are not known before training (e.g. a
  training-energy objective) stays PRUNED.
* ``bohb``: as BOHB, the model is fitted at the highest rung that at least ``min_observations``
  trials reached: every trial with that rung's vector is presented as COMPLETE with it (final
  values ignored), the trials stopped below it stay PRUNED (bad group). Brackets of a searched
  box are pooled (the box is a parameter TPE models).
* ``rank``: PRUNED trials keep their state but are given one intermediate value, their rank
  share at the rung that stopped them (rank / competitors), at that rung's index: Optuna's own
  single-objective rule for PRUNED trials (later rung first, then the better value) then orders
  them when the good group has room for them. That is only while the study has fewer COMPLETE
  trials than the good group holds (about a tenth of the finished trials), so in practice it
  proposes what ``tpe`` proposes: the replay only (``benchmarks/bench_search.py``), not a
  ``study.sampler`` choice.

Everything is read from the storage at each sample, so workers sharing a storage see each
other's rung vectors; constraints are untouched (a presented trial keeps its system attrs, so
TPE's constrained split still puts an infeasible trial in the bad group); a screened trial
(PRUNED before training, no rung vector) stays PRUNED. The replay (``benchmarks/bench_search.py``,
``benchmarks/RESULTS.md`` "Issue 21") found no mode faster than plain TPE on the recorded table
(60 paired seeds for ``impute``), so the bundled studies keep ``tpe`` and these are opt-in.

The wrapper overrides ``TPESampler._sample``, a private method (optuna 5); the unit tests in
``tests/search/test_samplers.py`` pin that it is still the one door through which the trials are
read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Container, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from kdsearch import trial_record as tr

__all__ = [
    "RUNG_MODES",
    "RungStudyView",
    "RungTPESampler",
    "present_trials",
]

RUNG_MODES: tuple[str, ...] = ("impute", "bohb", "rank")
"""How :class:`RungTPESampler` presents PRUNED trials (the module docstring)."""

ACCURACY = "val_accuracy"  # the rung vector's first value (kdsearch.search.pruning.rung_pruner)


def _bracket(rec: dict[str, Any]) -> str:
    return json.dumps(rec.get("bracket"), sort_keys=True)


def _with(trial: FrozenTrial, *, state: TrialState, values: Sequence[float] | None,
          intermediate: dict[int, float] | None = None) -> FrozenTrial:
    """A copy of ``trial`` in another state with other values (params, attrs and constraints kept)."""
    return FrozenTrial(
        number=trial.number, state=state, value=None, values=None if values is None else list(values),
        datetime_start=trial.datetime_start, datetime_complete=trial.datetime_complete,
        params=trial.params, distributions=trial.distributions, user_attrs=trial.user_attrs,
        system_attrs=trial.system_attrs,
        intermediate_values=trial.intermediate_values if intermediate is None else intermediate,
        trial_id=trial._trial_id,
    )


def _vector(rec: dict[str, Any], metric_names: Sequence[str], accuracy: float) -> list[float] | None:
    """The study's objective vector from a rung record, with ``accuracy`` for val_accuracy
    (None when an objective is not in the record or is not finite)."""
    out = []
    for name in metric_names:
        if name == ACCURACY:
            v = accuracy
        elif name in rec["names"]:
            v = float(rec["values"][rec["names"].index(name)])
        else:
            return None
        if not math.isfinite(v):
            return None
        out.append(v)
    return out


def _fit_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line, slope clipped at 0 (a better rung never
    predicts a worse end); a constant x predicts the mean of y."""
    if np.ptp(x) <= 0:
        return float(y.mean()), 0.0
    slope, intercept = np.polyfit(x, y, 1)
    slope = max(float(slope), 0.0)
    return float(y.mean() - slope * x.mean()), slope


def _impute(trials: list[FrozenTrial], metric_names: Sequence[str], min_observations: int) -> list[FrozenTrial]:
    acc_i = list(metric_names).index(ACCURACY)
    pairs: dict[tuple[int, str], tuple[list[float], list[float]]] = {}
    for t in trials:
        if t.state != TrialState.COMPLETE or t.values is None:
            continue
        for k, rec in tr.rung_records(t.user_attrs).items():
            if rec["names"] and rec["names"][0] == ACCURACY:
                xs, ys = pairs.setdefault((k, _bracket(rec)), ([], []))
                xs.append(float(rec["values"][0]))
                ys.append(float(t.values[acc_i]))
    lines = {key: _fit_line(np.array(xs), np.array(ys)) for key, (xs, ys) in pairs.items()
             if len(xs) >= min_observations and all(map(math.isfinite, xs + ys))}
    out = []
    for t in trials:
        if t.state == TrialState.PRUNED:
            for k, rec in sorted(tr.rung_records(t.user_attrs).items(), reverse=True):
                line = lines.get((k, _bracket(rec)))
                x = float(rec["values"][0]) if rec["names"] and rec["names"][0] == ACCURACY else math.nan
                if line is None or not math.isfinite(x):
                    continue
                values = _vector(rec, metric_names, line[0] + line[1] * x)
                if values is not None:
                    t = _with(t, state=TrialState.COMPLETE, values=values)
                break
        out.append(t)
    return out


def _bohb(trials: list[FrozenTrial], metric_names: Sequence[str], min_observations: int) -> list[FrozenTrial]:
    at_rung: dict[int, dict[int, list[float]]] = {}  # rung -> trial number -> presented vector
    for t in trials:
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            continue
        for k, rec in tr.rung_records(t.user_attrs).items():
            if rec["names"] and rec["names"][0] == ACCURACY:
                v = _vector(rec, metric_names, float(rec["values"][0]))
                if v is not None:
                    at_rung.setdefault(k, {})[t.number] = v
    enough = [k for k, seen in at_rung.items() if len(seen) >= min_observations]
    if not enough:
        return trials
    chosen = at_rung[max(enough)]
    return [_with(t, state=TrialState.COMPLETE, values=chosen[t.number]) if t.number in chosen else t
            for t in trials]


def _rank(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    out = []
    for t in trials:
        ua = t.user_attrs
        stopped = (ua.get(tr.PRUNING) or {}).get("pruned_at") if isinstance(ua.get(tr.PRUNING), dict) else None
        if t.state == TrialState.PRUNED and isinstance(stopped, dict) and not t.intermediate_values:
            share = float(stopped["rank"]) / max(int(stopped["n_competitors"]), 1)
            t = _with(t, state=TrialState.PRUNED, values=None, intermediate={int(stopped["rung_index"]): share})
        out.append(t)
    return out


def present_trials(trials: list[FrozenTrial], mode: str, metric_names: Sequence[str] | None,
                   min_observations: int) -> list[FrozenTrial]:
    """``trials`` as :class:`RungTPESampler` shows them to TPE in ``mode`` (the module docstring).

    Unchanged when the study has no metric names or no ``val_accuracy`` objective (its rung
    vectors cannot be mapped onto its objectives).
    """
    if mode not in RUNG_MODES:
        raise ValueError(f"mode must be one of {RUNG_MODES}, not {mode!r}")
    if mode == "rank":
        return _rank(trials)
    if not metric_names or ACCURACY not in metric_names:
        return trials
    if mode == "impute":
        return _impute(trials, metric_names, min_observations)
    return _bohb(trials, metric_names, min_observations)


class RungStudyView:
    """The study as :class:`RungTPESampler`'s TPE sees it: every attribute is the study's, except
    ``_get_trials`` (PRUNED trials presented by :func:`present_trials`) and ``direction`` (for
    the ``rank`` mode: Optuna orders PRUNED trials by their last intermediate value through
    ``study.direction``, which a multi-objective study does not have; a rank share is minimised)."""

    def __init__(self, study: optuna.Study, mode: str, min_observations: int) -> None:
        self._study = study
        self._mode = mode
        self._min_observations = min_observations
        self.read: dict[str, Any] | None = None  # what the last _get_trials read (tr.SAMPLER_INPUT)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    @property
    def direction(self) -> StudyDirection:
        return StudyDirection.MINIMIZE if self._mode == "rank" else self._study.direction

    def _get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None,
                    use_cache: bool = False) -> list[FrozenTrial]:
        trials = list(self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache))
        shown = present_trials(trials, self._mode, self._study.metric_names, self._min_observations)
        pruned = [t.number for t in trials if t.state == TrialState.PRUNED]
        changed = {t.number for t, s in zip(trials, shown, strict=True) if s is not t}
        self.read = {
            "mode": self._mode,
            "complete": sum(t.state == TrialState.COMPLETE for t in trials),
            "pruned": len(pruned),
            "pruned_presented": sum(n in changed for n in pruned),
        }
        return shown


class RungTPESampler(optuna.samplers.TPESampler):
    """:class:`optuna.samplers.TPESampler` that sees the rung pruner's PRUNED trials through
    :class:`RungStudyView` (``mode``: one of :data:`RUNG_MODES`). ``min_observations``: COMPLETE
    trials at a rung before its rung-to-final line is used (``impute``), or trials at a rung
    before it is modelled (``bohb``). Every other argument is TPESampler's."""

    def __init__(self, *, mode: str = "impute", min_observations: int = 5, **tpe_kwargs: Any) -> None:
        if mode not in RUNG_MODES:
            raise ValueError(f"mode must be one of {RUNG_MODES}, not {mode!r}")
        if min_observations < 2:
            raise ValueError(f"min_observations must be >= 2, not {min_observations}")
        super().__init__(**tpe_kwargs)
        self.mode = mode
        self.min_observations = min_observations

    def _sample(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        view = RungStudyView(study, self.mode, self.min_observations)
        out = super()._sample(view, trial, search_space)  # type: ignore[arg-type]  # a view, not a Study
        if view.read is not None:  # stored on the proposed trial: what this proposal learned from
            study._storage.set_trial_user_attr(trial._trial_id, tr.SAMPLER_INPUT, view.read)
        return out
