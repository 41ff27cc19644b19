"""The glue between a trial and the rung pruner, moved as-is out of ``search/objective.py``.

:func:`rung_pruner` builds the ``on_eval`` hook of ``study.pruning`` for one trial,
:func:`pruning_record` is the ``pruning`` user attr (every decision with the competitors it was
taken against), :func:`store_pruned` stores a trial stopped at a rung. (Pending: these fold into
:mod:`kdsearch.search.pruning`, where ``OptunaRungStore`` can remember its competitors itself.)
"""

from __future__ import annotations

import math
from typing import Any

import optuna

from kdsearch import trial_record as tr
from kdsearch.config import StudyConfig
from kdsearch.measure import Measurements
from kdsearch.metrics import is_fixed_cost, metric_unit
from kdsearch.search.pruning import OptunaRungStore, PruningConfig, RungEntry, RungPruner
from kdsearch.search.screening import known_verdict

__all__ = ["pruning_record", "rung_pruner", "store_pruned"]


class RecordingStore:
    """An :class:`OptunaRungStore` that remembers the competitors each decision was taken against."""

    def __init__(self, inner: OptunaRungStore) -> None:
        self.inner = inner
        self.seen: dict[int, list[RungEntry]] = {}

    def record(self, key: int, rung_index: int, fraction: float, values: Any, train_s: float) -> None:
        self.inner.record(key, rung_index, fraction, values, train_s)

    def competitors(self, key: int, rung_index: int) -> list[RungEntry]:
        found = self.inner.competitors(key, rung_index)
        self.seen[rung_index] = list(found)
        return found


def rung_pruner(trial: optuna.Trial, cfg: StudyConfig, fixed: Measurements, box_s: float) -> RungPruner | None:
    """The ``on_eval`` hook of ``study.pruning`` (None when it is off): rung vectors are the
    validation accuracy and the fixed-cost objectives (log scale for counts and MACs). With a
    searched box (``study.trial_time`` a list) a trial competes only with trials of its own box:
    a rung is a fraction of the box and the LR schedule follows it, so the accuracy at 1/9 of a
    2-minute box and at 1/9 of a 10-minute one are not comparable (one bracket per box)."""
    p = cfg.study.pruning
    if not p.enabled:
        return None
    names = [n for n in cfg.metric_names if n != "val_accuracy" and is_fixed_cost(n)]
    values = [fixed.values.get(n) for n in names]
    return RungPruner(
        key=trial.number,
        store=RecordingStore(OptunaRungStore(
            trial, ["val_accuracy", *names], bracket={"box_s": box_s} if cfg.study.box_searched else None)),
        config=PruningConfig(eta=p.eta, min_fraction=p.min_fraction, min_competitors=p.min_competitors),
        fixed_values=[math.nan if v is None else float(v) for v in values],
        directions=["maximize", *(cfg.objectives[n] for n in names)],
        scales=["linear", *("log" if metric_unit(n) in ("count", "MACs") else "linear" for n in names)],
    )


def pruning_record(pruner: RungPruner, eval_every_fraction: float) -> dict[str, Any]:
    """User attr ``pruning``: the decisions, the curve, and what each decision was taken against
    (the rule's settings and the competitors' rung vectors), so :func:`decide_at_rung` can
    recompute it from storage alone."""
    store = pruner.store
    seen = store.seen if isinstance(store, RecordingStore) else {}
    names = store.inner.names if isinstance(store, RecordingStore) else []
    c = pruner.config
    return {
        **pruner.summary(),
        "eta": c.eta, "min_fraction": c.min_fraction, "min_competitors": c.min_competitors,
        "rungs": list(c.rungs), "names": names, "directions": list(pruner.directions),
        "bracket": store.inner.bracket if isinstance(store, RecordingStore) else None,
        "scales": list(pruner.scales or ()), "eval_every_fraction": eval_every_fraction,
        "competitors": {str(k): [[e.key, list(e.values)] for e in v] for k, v in seen.items()},
    }


def store_pruned(
    trial: optuna.Trial, cfg: StudyConfig, m: Measurements, fixed: Measurements, pruner: RungPruner
) -> None:
    """Store a trial stopped at a rung (its figures so far, the rung, rank and front, its known
    constraint violations) and raise :class:`optuna.TrialPruned`. The caller drops its own
    reference to the student first: only then can the allocator's cache be freed."""
    d = pruner.pruned_at
    assert d is not None
    m.update(fixed)
    tr.write(trial, m.to_user_attrs())
    tr.write(trial, tr.pruned_attrs(d.rung, d.rung_index, d.rank, d.front, d.reason))
    cons = known_verdict(cfg, m).violations
    for metric, violation in cons.items():
        trial.set_constraint(metric, violation)
    trial.set_user_attr(tr.CONSTRAINT_VIOLATIONS, cons)
    raise optuna.TrialPruned(f"pruned at rung {d.rung:.3g} of the box: {d.reason}")
