"""Multi-objective early stopping at rungs of the KD box (asynchronous successive halving).

Optuna's core cannot prune a multi-objective study (``Trial.report`` and ``should_prune`` raise
with more than one direction), so kdsearch decides itself, with nothing but the study storage
shared between workers (no scheduler of its own):

* **Rungs** sit at fractions of the box: ``min_fraction * eta**k`` for k = 0, 1, ... while the
  fraction is below 1 (eta 3, min 1/27, the default: rungs at 1/27, 1/9 and 1/3; the box end is not a rung).
* **At a rung** a trial's vector (validation accuracy at that fraction, maximised, plus its
  fixed-cost objectives such as params or MACs, measured before training) is ranked against the
  vectors of every other trial of the study that reached the same rung: RUNNING, COMPLETE and
  PRUNED trials, from this worker or any other.
* **Ranking**: non-dominated sorting gives each vector its front (0 = Pareto-optimal); inside a
  front, vectors are ordered by greedy hypervolume contribution (the least contributor is
  removed first, as in SMS-EMOA), on objectives normalised to [0, 1] over the rung's
  competitors, with the reference point at 1.1 on every axis. Ties (contributions within
  :data:`kdsearch.pareto.HV_TIE_TOL`) go to the lower key (the earlier trial), so a decision
  never depends on rounding or on the order the competitors were read in. The sorting and the
  removal order are :mod:`kdsearch.pareto`'s. A decision orders only its own trial's front, and
  only as far as the decision needs (:func:`_place`): a front of up to :data:`EXACT_RANK_FRONT`
  trials until its trial leaves it (an exact rank); a larger front not at all when it lies wholly
  above or below the threshold, else until its trial goes or only the places above the threshold
  are left. The stored rank is then a range (``rank`` to ``rank_max``); the decision is the full
  order's either way (p50 0.012 s, p99 0.04 s at a rung of 3,000 table-drawn trials with 4
  objectives on the shared 2-core VM: ``benchmarks/bench_rung_ranking.py``).
* **Rule**: with ``n`` competitors (this trial included) the trial continues iff its rank is
  below ``ceil(n / eta)``; below ``min_competitors`` nothing is pruned (the first trials of a
  study have nobody to lose to). This is ASHA's stopping variant: the decision is taken once,
  when the trial reaches the rung, against whoever reached it before.

The same code decides in a live study (:class:`OptunaRungStore` over the study storage) and in
the replay benchmark (:class:`ListRungStore`): :class:`RungPruner` is the ``on_eval`` hook of
:func:`kdsearch.distill.distill` either way. ``distill()`` shows the hook its in-box evaluations
only (never the final evaluation after a plateau stop), so a rung is scored only by an evaluation
taken at that rung. A trial stores what explains each decision (:func:`pruning_record`: rung,
rank, front, the number of competitors, the threshold and a digest of the competitors' keys),
not the competitors' vectors: those are in their own trials' ``rung_<k>`` attrs, so storage per
trial stays flat however many trials a rung holds.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import optuna
from optuna.trial import TrialState

from kdsearch import trial_record as tr
from kdsearch.config import PruningConfig
from kdsearch.metrics import is_fixed_cost, metric_unit
from kdsearch.pareto import non_dominated_sort, removal_order, removal_position, removal_step, to_losses

if TYPE_CHECKING:
    from kdsearch.config import StudyConfig
    from kdsearch.measure import Measurements

__all__ = [
    "PruningConfig",  # study.pruning, defined in kdsearch.config
    "RungEntry",
    "RungDecision",
    "RungStore",
    "ListRungStore",
    "OptunaRungStore",
    "RungPruner",
    "COMPETING_STATES",
    "rank_at_rung",
    "decide_at_rung",
    "competitors_digest",
    "rung_pruner",
    "pruning_record",
    "store_pruned",
]

COMPETING_STATES: tuple[TrialState, ...] = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
"""Trial states whose rung values count; FAIL and WAITING trials never compete."""

EXACT_RANK_FRONT = 64
"""A front of at most this many trials is ordered until the deciding trial leaves it, so the stored
rank is exact (milliseconds); a larger front only as far as the decision needs (:func:`_place`)."""
REFERENCE = 1.1  # reference point on every normalised loss axis (the worst value maps to 1.0)
_FRACTION_TOL = 1e-9  # an evaluation at fraction >= rung * (1 - tol) has reached the rung


@dataclass(frozen=True)
class RungEntry:
    """One trial's vector at one rung: ``values`` in the order of the study's ``directions``."""

    key: int  # trial number (ties go to the lower key)
    values: tuple[float, ...]


@dataclass(frozen=True)
class RungDecision:
    """What the rule decided for one trial at one rung (stored on the trial)."""

    rung_index: int
    rung: float  # fraction of the box
    prune: bool
    rank: int  # 0 = best of the rung's competitors (the best place it can hold when not exact)
    front: int  # 0 = non-dominated
    n_competitors: int  # trials at this rung, this one included
    n_keep: int  # ceil(n / eta); every trial is kept below min_competitors
    reason: str
    competitors_digest: str = ""  # competitors_digest() of the other trials' keys it was taken against
    rank_max: int | None = None  # the worst place it can hold (None or == rank: the rank is exact)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# Pareto ranking (the toolkit is kdsearch.pareto; what is rung-specific is here)


def _normalise(losses: np.ndarray) -> np.ndarray:
    """Each objective min-max scaled to [0, 1] over the rows (a constant objective becomes 0)."""
    lo = losses.min(axis=0)
    span = losses.max(axis=0) - lo
    span[span <= 0] = 1.0
    return (losses - lo) / span


def _split_finite(
    entries: Sequence[RungEntry], directions: Sequence[str], scales: Sequence[str] | None
) -> tuple[list[RungEntry], np.ndarray, list[RungEntry]]:
    """(finite entries, their losses [n, m], the other entries in key order)."""
    if scales is not None and len(scales) != len(directions):
        raise ValueError(f"{len(scales)} scales for {len(directions)} directions")
    if any(len(e.values) != len(directions) for e in entries):
        raise ValueError(f"every rung vector needs {len(directions)} values (one per direction)")
    losses = to_losses([e.values for e in entries], directions, scales)
    ok = np.all(np.isfinite(losses), axis=1)
    finite = [e for e, good in zip(entries, ok, strict=True) if good]
    broken = sorted((e for e, good in zip(entries, ok, strict=True) if not good), key=lambda e: e.key)
    return finite, losses[ok], broken


def rank_at_rung(
    entries: Sequence[RungEntry], directions: Sequence[str], scales: Sequence[str] | None = None
) -> list[tuple[RungEntry, int]]:
    """The rung's entries best first, each with its front index (``scales``: see :func:`kdsearch.pareto.to_loss`).

    Entries with a non-finite value (a diverged accuracy, a missing cost) rank after every
    finite one, in key order, in a front of their own.
    """
    finite, losses, broken = _split_finite(entries, directions, scales)
    out: list[tuple[RungEntry, int]] = []
    n_fronts = 0
    if finite:
        fronts = non_dominated_sort(losses)
        norm = _normalise(losses)
        keys = np.array([e.key for e in finite])
        ref = np.full(norm.shape[1], REFERENCE)
        n_fronts = int(fronts.max()) + 1
        for f in range(n_fronts):
            idx = np.flatnonzero(fronts == f)
            for j in removal_order(norm[idx], keys[idx], ref):
                out.append((finite[idx[j]], f))
    out.extend((e, n_fronts) for e in broken)
    return out


def _place(
    key: int, entries: Sequence[RungEntry], directions: Sequence[str], scales: Sequence[str] | None, n_keep: int
) -> tuple[int, int, int]:
    """(rank, rank_max, front) of the entry with ``key`` when the top ``n_keep`` continue: its rank
    in :func:`rank_at_rung`'s order is between ``rank`` and ``rank_max`` (equal: exact).

    Only the entry's own front is ordered, and only as far as needed. A front of at most
    :data:`EXACT_RANK_FRONT` entries is ordered until the entry leaves it (an exact rank, in
    milliseconds). In a larger one the decision needs no order when the whole front lies on one
    side of the threshold (the rank is then the front's span); when the threshold cuts it, greedy
    removal runs until the entry goes (pruned, exact rank) or until only the places left above
    the threshold remain (kept: its rank is in the front's part above the threshold).
    """
    finite, losses, broken = _split_finite(entries, directions, scales)
    fronts = non_dominated_sort(losses)
    keys_broken = [e.key for e in broken]
    if key in keys_broken:
        n_fronts = int(fronts.max()) + 1 if finite else 0
        rank = len(finite) + keys_broken.index(key)
        return rank, rank, n_fronts
    i = next(j for j, e in enumerate(finite) if e.key == key)
    f = int(fronts[i])
    idx = np.flatnonzero(fronts == f)
    ahead, n_f = int((fronts < f).sum()), int(idx.size)
    if n_f == 1:
        return ahead, ahead, f
    keys = np.array([e.key for e in finite])[idx]
    ref = np.full(losses.shape[1], REFERENCE)
    points = _normalise(losses)[idx]
    me = int(np.flatnonzero(idx == i)[0])
    if n_f <= EXACT_RANK_FRONT:
        pos = removal_position(points, keys, ref, me)
        return ahead + pos, ahead + pos, f
    room = n_keep - ahead  # places above the threshold left for this front
    if room <= 0 or room >= n_f:  # the whole front is pruned, or the whole front continues
        return ahead, ahead + n_f - 1, f
    step = removal_step(points, keys, ref, me, n_f - room)
    if step is None:  # still standing when only ``room`` are left: above the threshold
        return ahead, n_keep - 1, f
    pos = n_f - 1 - step
    return ahead + pos, ahead + pos, f


def competitors_digest(keys: Iterable[int]) -> str:
    """A short fingerprint of the set of competitor keys (order does not matter): with it a
    stored decision names exactly whom it was taken against, in 16 characters."""
    text = ",".join(str(k) for k in sorted(set(keys)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def decide_at_rung(
    mine: RungEntry,
    others: Iterable[RungEntry],
    directions: Sequence[str],
    config: PruningConfig,
    rung_index: int,
    scales: Sequence[str] | None = None,
) -> RungDecision:
    """Continue or prune ``mine`` at rung ``rung_index`` against ``others`` (entries with
    ``mine.key`` among them are ignored; ``scales``: see :func:`kdsearch.pareto.to_loss`). A pure function of
    its arguments.
    """
    rung = config.rungs[rung_index]
    competitors = {e.key: e for e in others if e.key != mine.key}
    entries = [mine, *sorted(competitors.values(), key=lambda e: e.key)]
    n = len(entries)
    digest = competitors_digest(competitors)
    below_min = n < config.competitors_needed
    n_keep = n if below_min else math.ceil(n / config.eta)
    rank, rank_max, front = _place(mine.key, entries, directions, scales, n_keep)
    where = f"rank {rank + 1}" if rank_max == rank else f"rank {rank + 1}-{rank_max + 1}"
    if below_min:
        return RungDecision(rung_index, rung, False, rank, front, n, n, f"{n} < {config.competitors_needed} competitors",
                            digest, rank_max)
    prune = rank >= n_keep
    reason = f"{where} of {n} (front {front}); the top {n_keep} continue"
    return RungDecision(rung_index, rung, prune, rank, front, n, n_keep, reason, digest, rank_max)


# ----------------------------------------------------------------------------------------------
# Where rung values live


class RungStore(Protocol):
    """Where a trial writes its rung vectors and reads everybody else's."""

    def record(self, key: int, rung_index: int, fraction: float, values: Sequence[float], train_s: float) -> None:
        """Store trial ``key``'s vector at rung ``rung_index`` (before any decision reads it)."""
        ...

    def competitors(self, key: int, rung_index: int) -> list[RungEntry]:
        """Every other trial's vector at rung ``rung_index``."""
        ...

    def describe(self) -> dict[str, Any]:
        """What a stored decision needs to say about where its competitors came from."""
        ...


@dataclass
class ListRungStore:
    """Rung vectors held in memory: the replay benchmark's store, and one process's tests."""

    rungs: dict[int, dict[int, RungEntry]] = field(default_factory=dict)

    def record(self, key: int, rung_index: int, fraction: float, values: Sequence[float], train_s: float) -> None:
        self.rungs.setdefault(rung_index, {})[key] = RungEntry(key, tuple(float(v) for v in values))

    def competitors(self, key: int, rung_index: int) -> list[RungEntry]:
        return [e for k, e in self.rungs.get(rung_index, {}).items() if k != key]

    def describe(self) -> dict[str, Any]:
        return {}


class OptunaRungStore:
    """Rung vectors in the Optuna study storage, so workers on other hosts count too.

    Writes user attr ``rung_<k>`` on ``trial`` (public ``Trial.set_user_attr``) and reads it back
    from every trial in :data:`COMPETING_STATES` (public ``Study.get_trials``). ``names`` (the
    objective names of the vector) is stored with it; a trial whose names differ does not compete.
    ``bracket`` (e.g. ``{"box_s": 120.0}`` when the box is searched) is stored too, and only
    trials of the same bracket compete; ``None`` (the default, and what rung records written
    before brackets existed hold) competes with ``None`` only.
    """

    def __init__(self, trial: optuna.Trial, names: Sequence[str], bracket: Mapping[str, Any] | None = None) -> None:
        self.trial = trial
        self.study = trial.study
        self.names = list(names)
        self.bracket = None if bracket is None else dict(bracket)

    def record(self, key: int, rung_index: int, fraction: float, values: Sequence[float], train_s: float) -> None:
        if key != self.trial.number:
            raise ValueError(f"this store writes trial {self.trial.number}, not {key}")
        self.trial.set_user_attr(tr.rung_key(rung_index), {
            "fraction": float(fraction),
            "values": [float(v) for v in values],
            "names": self.names,
            "train_s": float(train_s),
            "time_unix_s": time.time(),  # when it was written: the order in which trials reached the rung
            **({} if self.bracket is None else {"bracket": self.bracket}),
        })

    def competitors(self, key: int, rung_index: int) -> list[RungEntry]:
        attr = tr.rung_key(rung_index)
        out = []
        for t in self.study.get_trials(deepcopy=False, states=COMPETING_STATES):
            rec = t.user_attrs.get(attr)
            if t.number == key or not isinstance(rec, dict) or rec.get("names") != self.names:
                continue
            if rec.get("bracket") != self.bracket:
                continue
            out.append(RungEntry(t.number, tuple(float(v) for v in rec["values"])))
        return out

    def describe(self) -> dict[str, Any]:
        return {"names": self.names, "bracket": self.bracket}


# ----------------------------------------------------------------------------------------------
# The on_eval hook


class RungPruner:
    """The ``on_eval(train_s, fraction, val_accuracy) -> stop?`` hook of one trial.

    ``fixed_values`` are the trial's fixed-cost objective values (measured before training), in
    the order of ``directions[1:]``; ``directions[0]`` is the validation accuracy's
    (``"maximize"``); ``scales`` ranks an objective by its log10 (see :func:`kdsearch.pareto.to_loss`), e.g.
    ``("linear", "log")`` for (accuracy, MACs). At the first evaluation at or past a rung it records the vector in
    ``store``, then decides; an evaluation past several rungs records and decides each in turn.
    It remembers every evaluation (:attr:`curve`) and every decision (:attr:`decisions`);
    :attr:`pruned_at` is the decision that stopped the trial, if any. It relies on
    :func:`kdsearch.distill.distill` evaluating at every rung it is given in ``eval_at`` and showing
    the hook in-box evaluations only: the final evaluation after a plateau stop's cool-down never
    reaches it, so no rung is scored by an annealed model.
    """

    def __init__(
        self,
        *,
        key: int,
        store: RungStore,
        config: PruningConfig,
        fixed_values: Sequence[float] = (),
        directions: Sequence[str] = ("maximize",),
        scales: Sequence[str] | None = None,
    ) -> None:
        if len(directions) != 1 + len(fixed_values):
            raise ValueError(f"{len(directions)} directions for 1 accuracy + {len(fixed_values)} fixed values")
        if scales is not None and len(scales) != len(directions):
            raise ValueError(f"{len(scales)} scales for {len(directions)} directions")
        self.scales = None if scales is None else tuple(scales)
        self.key = key
        self.store = store
        self.config = config
        self.fixed_values = tuple(float(v) for v in fixed_values)
        self.directions = tuple(directions)
        self.curve: list[tuple[float, float, float]] = []  # (train_s, fraction, val_accuracy)
        self.decisions: list[RungDecision] = []
        self.pruned_at: RungDecision | None = None
        self._next = 0  # index of the next rung to reach

    def __call__(self, train_s: float, fraction: float, val_accuracy: float) -> bool:
        self.curve.append((float(train_s), float(fraction), float(val_accuracy)))
        if self.pruned_at is not None:
            return True
        rungs = self.config.rungs
        while self._next < len(rungs) and fraction >= rungs[self._next] * (1 - _FRACTION_TOL):
            k = self._next
            self._next += 1
            values = (float(val_accuracy), *self.fixed_values)
            self.store.record(self.key, k, fraction, values, train_s)  # visible before we decide
            decision = decide_at_rung(
                RungEntry(self.key, values), self.store.competitors(self.key, k), self.directions, self.config, k,
                self.scales,
            )
            self.decisions.append(decision)
            if decision.prune:
                self.pruned_at = decision
                return True
        return False

    def summary(self) -> dict[str, Any]:
        """What the objective stores on the trial: the decisions, the stop (if any), the curve."""
        return {
            "decisions": [d.to_dict() for d in self.decisions],
            "pruned_at": None if self.pruned_at is None else self.pruned_at.to_dict(),
            "curve": [[round(t, 4), round(f, 5), a] for t, f, a in self.curve],
        }


# ----------------------------------------------------------------------------------------------
# The objective's glue


def rung_pruner(trial: optuna.Trial, cfg: StudyConfig, fixed_values: Mapping[str, float | None],
                box_s: float) -> RungPruner | None:
    """The ``on_eval`` hook of ``study.pruning`` for one live trial (None when it is off).

    Rung vectors are the validation accuracy and the fixed-cost objectives (``fixed_values``, by
    name; a missing one is NaN, ranked last), on a log scale for counts and MACs. With a searched
    box (``study.trial_time`` a list) a trial competes only with trials of its own box: a rung is
    a fraction of the box and the LR schedule follows it, so the accuracy at 1/9 of a 2-minute box
    and at 1/9 of a 10-minute one are not comparable (one bracket per box).
    """
    p = cfg.study.pruning
    if not p.enabled:
        return None
    names = [n for n in cfg.metric_names if n != "val_accuracy" and is_fixed_cost(n)]
    values = [fixed_values.get(n) for n in names]
    return RungPruner(
        key=trial.number,
        store=OptunaRungStore(trial, ["val_accuracy", *names],
                              bracket={"box_s": box_s} if cfg.study.box_searched else None),
        config=p,
        fixed_values=[math.nan if v is None else float(v) for v in values],
        directions=["maximize", *(cfg.objectives[n] for n in names)],
        scales=["linear", *("log" if metric_unit(n) in ("count", "MACs") else "linear" for n in names)],
    )


def pruning_record(pruner: RungPruner, eval_every_fraction: float) -> dict[str, Any]:
    """User attr ``pruning``: every decision (rung, rank, front, the number of competitors, the
    threshold ``n_keep`` and the digest of the competitors' keys), the curve, and the rule's
    settings. Its size does not grow with the study: the competitors' vectors stay in their own
    trials' ``rung_<k>`` attrs, where a decision can be recomputed from (the trials that wrote
    rung k before this one, whose keys give ``competitors_digest``)."""
    c = pruner.config
    return {
        **pruner.summary(),
        "eta": c.eta, "min_fraction": c.min_fraction, "min_competitors": c.min_competitors,
        "rungs": list(c.rungs), "names": None, "bracket": None, **pruner.store.describe(),
        "directions": list(pruner.directions), "scales": list(pruner.scales or ()),
        "eval_every_fraction": eval_every_fraction,
    }


def store_pruned(
    trial: optuna.Trial, cfg: StudyConfig, m: Measurements, fixed: Measurements, pruner: RungPruner
) -> None:
    """Store a trial stopped at a rung (its figures so far, the rung, rank and front, its known
    constraint violations) and raise :class:`optuna.TrialPruned`. The caller drops its own
    reference to the student first: only then can the allocator's cache be freed."""
    # The verdict needs the fixed-cost screen (torch-side); the ranking above stays import-light
    # for the replay benchmarks, so it is read here, on first use.
    from kdsearch.search.screening import known_verdict  # noqa: PLC0415

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
