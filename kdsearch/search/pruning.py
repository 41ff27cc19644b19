"""Multi-objective early stopping at rungs of the KD box (asynchronous successive halving).

Optuna's core cannot prune a multi-objective study (``Trial.report`` and ``should_prune`` raise
with more than one direction), so kdsearch decides itself, with nothing but the study storage
shared between workers (no scheduler of its own):

* **Rungs** sit at fractions of the box: ``min_fraction * eta**k`` for k = 0, 1, ... while the
  fraction is below 1 (eta 3, min 1/9: rungs at 1/9 and 1/3; the box end is not a rung).
* **At a rung** a trial's vector (validation accuracy at that fraction, maximised, plus its
  fixed-cost objectives such as params or MACs, measured before training) is ranked against the
  vectors of every other trial of the study that reached the same rung: RUNNING, COMPLETE and
  PRUNED trials, from this worker or any other.
* **Ranking**: non-dominated sorting gives each vector its front (0 = Pareto-optimal); inside a
  front, vectors are ordered by greedy hypervolume contribution (the least contributor is
  removed first, as in SMS-EMOA), on objectives normalised to [0, 1] over the rung's
  competitors, with the reference point at 1.1 on every axis. Exact ties go to the lower key
  (the earlier trial), so a decision never depends on the order the competitors were read in.
* **Rule**: with ``n`` competitors (this trial included) the trial continues iff its rank is
  below ``ceil(n / eta)``; below ``min_competitors`` nothing is pruned (the first trials of a
  study have nobody to lose to). This is ASHA's stopping variant: the decision is taken once,
  when the trial reaches the rung, against whoever reached it before.

The same code decides in a live study (:class:`OptunaRungStore` over the study storage) and in
the replay benchmark (:class:`ListRungStore`): :class:`RungPruner` is the ``on_eval`` hook of
:func:`kdsearch.distill.distill` either way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import optuna
from optuna.trial import TrialState

from kdsearch import trial_record as tr
from kdsearch.config.sections import RUNG_END_MARGIN, PruningSection

__all__ = [
    "PruningConfig",
    "RungEntry",
    "RungDecision",
    "RungStore",
    "ListRungStore",
    "OptunaRungStore",
    "RungPruner",
    "RUNG_ATTR_PREFIX",
    "COMPETING_STATES",
    "non_dominated_sort",
    "hypervolume",
    "hypervolume_contributions",
    "rank_at_rung",
    "decide_at_rung",
    "to_loss",
]

RUNG_ATTR_PREFIX = tr.RUNG_PREFIX
"""User attr ``rung_<k>`` holds ``{"fraction", "values", "names", "train_s"}`` of rung k."""

COMPETING_STATES: tuple[TrialState, ...] = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
"""Trial states whose rung values count; FAIL and WAITING trials never compete."""

REFERENCE = 1.1  # reference point on every normalised loss axis (the worst value maps to 1.0)
_FRACTION_TOL = 1e-9  # an evaluation at fraction >= rung * (1 - tol) has reached the rung


@dataclass(frozen=True, kw_only=True)
class PruningConfig:
    """Where the rungs are and how hard they cut (``study.pruning`` in the study file).

    ``eta`` (>= 2): 1/eta of the competitors at a rung continue, and rung k sits at
    ``min_fraction * eta**k`` of the box. ``min_fraction`` in (0, 1): the first rung, as a
    fraction of the box. ``min_competitors`` (>= 1, default ``eta``): the fewest trials at a
    rung, this one included, before anything there is pruned.
    """

    eta: int = 3
    min_fraction: float = 1.0 / 9.0
    min_competitors: int | None = None

    def __post_init__(self) -> None:
        # The study file's rules (study.pruning), one-line ConfigErrors naming the key.
        PruningSection(eta=self.eta, min_fraction=self.min_fraction, min_competitors=self.min_competitors)

    @property
    def competitors_needed(self) -> int:
        """``min_competitors``, or ``eta`` when it is not set."""
        return self.eta if self.min_competitors is None else self.min_competitors

    @property
    def rungs(self) -> tuple[float, ...]:
        """Rung fractions of the box, increasing, all below ``1 - RUNG_END_MARGIN`` (0.95): a rung at
        the end of the box would discard a fully trained student to save nothing."""
        out: list[float] = []
        r = float(self.min_fraction)
        while r < 1.0 - RUNG_END_MARGIN:
            out.append(r)
            r *= self.eta
        return tuple(out)


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
    rank: int  # 0 = best of the rung's competitors
    front: int  # 0 = non-dominated
    n_competitors: int  # trials at this rung, this one included
    n_keep: int  # ceil(n / eta); every trial is kept below min_competitors
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# Pareto ranking


def to_loss(values: Sequence[float], directions: Sequence[str], scales: Sequence[str] | None = None) -> np.ndarray:
    """``values`` turned into losses (every objective minimised): maximised ones are negated.

    ``directions`` are ``"maximize"``/``"minimize"`` (or :class:`optuna.study.StudyDirection`).
    ``scales`` (default all ``"linear"``): ``"log"`` ranks that objective by its log10, for costs
    that span decades (params, MACs), so the hypervolume tie-break is not decided by the
    largest models alone; a value <= 0 on a log axis becomes NaN (ranked last).
    """
    if len(values) != len(directions):
        raise ValueError(f"{len(values)} values for {len(directions)} directions")
    v = np.asarray(values, dtype=float).copy()
    for i, sc in enumerate(scales or ()):
        if sc == "log":
            v[i] = math.log10(v[i]) if v[i] > 0 else math.nan
        elif sc != "linear":
            raise ValueError(f"scale must be linear or log, got {sc!r}")
    signs = np.array([-1.0 if _is_max(d) else 1.0 for d in directions])
    return v * signs


def _is_max(direction: Any) -> bool:
    if isinstance(direction, optuna.study.StudyDirection):
        return direction == optuna.study.StudyDirection.MAXIMIZE
    if direction in ("maximize", "max"):
        return True
    if direction in ("minimize", "min"):
        return False
    raise ValueError(f"direction must be maximize or minimize, got {direction!r}")


def non_dominated_sort(losses: np.ndarray) -> np.ndarray:
    """Front index (0 = non-dominated) of each row of ``losses`` ``[n, m]``, all minimised.

    A row dominates another when it is <= on every objective and < on one. Equal rows share a
    front. O(n^2 m) with numpy, which is plenty for the few hundred trials at a rung.
    """
    pts = np.asarray(losses, dtype=float)
    n = pts.shape[0]
    if n == 0:
        return np.zeros(0, dtype=int)
    le = np.all(pts[:, None, :] <= pts[None, :, :], axis=2)
    lt = np.any(pts[:, None, :] < pts[None, :, :], axis=2)
    dominates = le & lt  # dominates[i, j]: i dominates j
    n_dominators = dominates.sum(axis=0)
    fronts = np.full(n, -1, dtype=int)
    current = np.flatnonzero(n_dominators == 0)
    k = 0
    while current.size:
        fronts[current] = k
        n_dominators = n_dominators - dominates[current].sum(axis=0)
        n_dominators[fronts >= 0] = -1  # already placed
        current = np.flatnonzero(n_dominators == 0)
        k += 1
    return fronts


def hypervolume(losses: np.ndarray, reference: Sequence[float]) -> float:
    """Volume dominated by the rows of ``losses`` ``[n, m]`` and bounded by ``reference``.

    Exact, by slicing along the first objective (recursive in m); rows not strictly better than
    the reference on every axis add nothing. Meant for the small sets of a rung or a replay
    (m <= 4, n up to a few hundred).
    """
    ref = np.asarray(reference, dtype=float)
    pts = np.asarray(losses, dtype=float).reshape(-1, ref.size)
    pts = pts[np.all(pts < ref, axis=1)]
    if pts.shape[0] == 0:
        return 0.0
    return _hv(pts, ref)


def _hv(pts: np.ndarray, ref: np.ndarray) -> float:
    m = ref.size
    if m == 1:
        return float(ref[0] - pts[:, 0].min())
    if m == 2:
        order = np.lexsort((pts[:, 1], pts[:, 0]))
        vol, best_y = 0.0, ref[1]
        for x, y in pts[order]:
            if y < best_y:
                vol += (ref[0] - x) * (best_y - y)
                best_y = y
        return float(vol)
    order = np.argsort(pts[:, 0], kind="stable")
    pts = pts[order]
    vol = 0.0
    for i in range(pts.shape[0]):
        x_next = pts[i + 1, 0] if i + 1 < pts.shape[0] else ref[0]
        width = x_next - pts[i, 0]
        if width > 0:
            vol += width * _hv(pts[: i + 1, 1:], ref[1:])
    return float(vol)


def hypervolume_contributions(losses: np.ndarray, reference: Sequence[float]) -> np.ndarray:
    """Exclusive hypervolume of each row: HV(all) - HV(all but that row)."""
    pts = np.asarray(losses, dtype=float)
    total = hypervolume(pts, reference)
    out = np.empty(pts.shape[0])
    for i in range(pts.shape[0]):
        out[i] = total - hypervolume(np.delete(pts, i, axis=0), reference)
    return out


def _normalise(losses: np.ndarray) -> np.ndarray:
    """Each objective min-max scaled to [0, 1] over the rows (a constant objective becomes 0)."""
    lo = losses.min(axis=0)
    span = losses.max(axis=0) - lo
    span[span <= 0] = 1.0
    return (losses - lo) / span


def _order_front(norm: np.ndarray, keys: np.ndarray) -> list[int]:
    """Indices of one front, best first: repeatedly drop the least HV contributor (lower key wins)."""
    remaining = list(range(norm.shape[0]))
    dropped: list[int] = []
    ref = np.full(norm.shape[1], REFERENCE)
    while len(remaining) > 1:
        contrib = hypervolume_contributions(norm[remaining], ref)
        # least contribution first; among equals, the higher key (the later trial) goes first
        worst = min(range(len(remaining)), key=lambda j: (contrib[j], -keys[remaining[j]]))
        dropped.append(remaining.pop(worst))
    return remaining + dropped[::-1]


def _split_finite(
    entries: Sequence[RungEntry], directions: Sequence[str], scales: Sequence[str] | None
) -> tuple[list[RungEntry], np.ndarray, list[RungEntry]]:
    """(finite entries, their losses [n, m], the other entries in key order)."""
    finite, losses, broken = [], [], []
    for e in entries:
        loss = to_loss(e.values, directions, scales)
        if np.all(np.isfinite(loss)):
            finite.append(e)
            losses.append(loss)
        else:
            broken.append(e)
    arr = np.stack(losses) if losses else np.zeros((0, len(directions)))
    return finite, arr, sorted(broken, key=lambda e: e.key)


def rank_at_rung(
    entries: Sequence[RungEntry], directions: Sequence[str], scales: Sequence[str] | None = None
) -> list[tuple[RungEntry, int]]:
    """The rung's entries best first, each with its front index (``scales``: see :func:`to_loss`).

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
        n_fronts = int(fronts.max()) + 1
        for f in range(n_fronts):
            idx = np.flatnonzero(fronts == f)
            for j in _order_front(norm[idx], keys[idx]):
                out.append((finite[idx[j]], f))
    out.extend((e, n_fronts) for e in broken)
    return out


def _rank_of(
    key: int, entries: Sequence[RungEntry], directions: Sequence[str], scales: Sequence[str] | None
) -> tuple[int, int]:
    """(rank, front) of the entry with ``key``: :func:`rank_at_rung`'s answer, ordering only the
    front that entry is in."""
    finite, losses, broken = _split_finite(entries, directions, scales)
    keys_broken = [e.key for e in broken]
    if key in keys_broken:
        n_fronts = int(non_dominated_sort(losses).max()) + 1 if finite else 0
        return len(finite) + keys_broken.index(key), n_fronts
    fronts = non_dominated_sort(losses)
    i = next(j for j, e in enumerate(finite) if e.key == key)
    f = int(fronts[i])
    idx = np.flatnonzero(fronts == f)
    keys = np.array([e.key for e in finite])
    order = _order_front(_normalise(losses)[idx], keys[idx])
    pos = next(p for p, j in enumerate(order) if idx[j] == i)
    return int((fronts < f).sum()) + pos, f


def decide_at_rung(
    mine: RungEntry,
    others: Iterable[RungEntry],
    directions: Sequence[str],
    config: PruningConfig,
    rung_index: int,
    scales: Sequence[str] | None = None,
) -> RungDecision:
    """Continue or prune ``mine`` at rung ``rung_index`` against ``others`` (entries with
    ``mine.key`` among them are ignored; ``scales``: see :func:`to_loss`). A pure function of
    its arguments.
    """
    rung = config.rungs[rung_index]
    competitors = {e.key: e for e in others if e.key != mine.key}
    entries = [mine, *sorted(competitors.values(), key=lambda e: e.key)]
    n = len(entries)
    rank, front = _rank_of(mine.key, entries, directions, scales)
    if n < config.competitors_needed:
        return RungDecision(rung_index, rung, False, rank, front, n, n, f"{n} < {config.competitors_needed} competitors")
    n_keep = math.ceil(n / config.eta)
    prune = rank >= n_keep
    reason = f"rank {rank + 1} of {n} (front {front}); the top {n_keep} continue"
    return RungDecision(rung_index, rung, prune, rank, front, n, n_keep, reason)


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


@dataclass
class ListRungStore:
    """Rung vectors held in memory: the replay benchmark's store, and one process's tests."""

    rungs: dict[int, dict[int, RungEntry]] = field(default_factory=dict)

    def record(self, key: int, rung_index: int, fraction: float, values: Sequence[float], train_s: float) -> None:
        self.rungs.setdefault(rung_index, {})[key] = RungEntry(key, tuple(float(v) for v in values))

    def competitors(self, key: int, rung_index: int) -> list[RungEntry]:
        return [e for k, e in self.rungs.get(rung_index, {}).items() if k != key]


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
        self.trial.set_user_attr(f"{RUNG_ATTR_PREFIX}{rung_index}", {
            "fraction": float(fraction),
            "values": [float(v) for v in values],
            "names": self.names,
            "train_s": float(train_s),
            **({} if self.bracket is None else {"bracket": self.bracket}),
        })

    def competitors(self, key: int, rung_index: int) -> list[RungEntry]:
        attr = f"{RUNG_ATTR_PREFIX}{rung_index}"
        out = []
        for t in self.study.get_trials(deepcopy=False, states=COMPETING_STATES):
            rec = t.user_attrs.get(attr)
            if t.number == key or not isinstance(rec, dict) or rec.get("names") != self.names:
                continue
            if rec.get("bracket") != self.bracket:
                continue
            out.append(RungEntry(t.number, tuple(float(v) for v in rec["values"])))
        return out


# ----------------------------------------------------------------------------------------------
# The on_eval hook


class RungPruner:
    """The ``on_eval(train_s, fraction, val_accuracy) -> stop?`` hook of one trial.

    ``fixed_values`` are the trial's fixed-cost objective values (measured before training), in
    the order of ``directions[1:]``; ``directions[0]`` is the validation accuracy's
    (``"maximize"``); ``scales`` ranks an objective by its log10 (see :func:`to_loss`), e.g.
    ``("linear", "log")`` for (accuracy, MACs). At the first evaluation at or past a rung it records the vector in
    ``store``, then decides; an evaluation past several rungs records and decides each in turn.
    It remembers every evaluation (:attr:`curve`) and every decision (:attr:`decisions`);
    :attr:`pruned_at` is the decision that stopped the trial, if any.
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
