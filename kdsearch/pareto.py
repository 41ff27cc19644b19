"""The one Pareto toolkit: directions and signs, dominance, non-dominated sorting, hypervolume.

Everything here works on *losses*: arrays ``[n, m]`` in which every objective is minimised
(:func:`to_loss` turns values and their directions into losses). The rung pruner
(:mod:`kdsearch.search.pruning`) and the report (:mod:`kdsearch.report.pareto`) both use it, so a
trial is on the front, or dominated, by one definition only: ``a`` dominates ``b`` when ``a`` is
``<=`` on every objective and ``<`` on one; equal vectors dominate neither and share a front.

Non-dominated sorting, the non-dominated filter and the hypervolume are moocore's
(``moocore.pareto_rank``, ``moocore.is_nondominated``, ``moocore.hypervolume``, in C). The
exclusive hypervolume contribution of one point and the greedy removal order built on it are
here: moocore's ``hv_contributions`` recomputes the whole hypervolume once per point from four
objectives up, and rounds contributions under 1.5e-8 to zero, which would change which point goes
first.

**Greedy removal order** (:func:`removal_order`, SMS-EMOA's): repeatedly remove the point with the
least exclusive hypervolume contribution; the last one standing is the best. Contributions only
grow as points are removed (a point's exclusive region can only widen), so a contribution computed
earlier is a lower bound of the current one, and the removal keeps stale values in a heap and
recomputes only the point on top (lazy greedy): the order is exactly that of recomputing every
contribution at every step, at a fraction of the cost. Contributions within :data:`HV_TIE_TOL` of
the least are a tie, and a tie goes to the higher key (the later trial is removed first), so the
order never depends on rounding or on the order the points were given in.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any

import moocore
import numpy as np

__all__ = [
    "HV_TIE_TOL",
    "is_maximize",
    "signs",
    "to_loss",
    "to_losses",
    "dominates",
    "non_dominated",
    "non_dominated_sort",
    "hypervolume",
    "exclusive_contribution",
    "hypervolume_contributions",
    "removal_order",
    "removal_position",
    "removal_step",
]

HV_TIE_TOL = 1e-12
"""Exclusive contributions closer than this are a tie (in the units of the losses; the rung
ranking normalises every objective to [0, 1], so it is 1e-12 of the unit box). Rounding in a
contribution is about 1e-16 times the point's own box; two contributions that differ by less than
this are equal as far as the arithmetic can tell."""


# ----------------------------------------------------------------------------------------------
# Directions


def is_maximize(direction: Any) -> bool:
    """True for ``"maximize"``/``"max"`` (or Optuna's ``StudyDirection.MAXIMIZE``), False for
    ``"minimize"``/``"min"``; anything else is a ValueError."""
    name = getattr(direction, "name", direction)  # an Optuna StudyDirection has a name
    if isinstance(name, str) and name.lower() in ("maximize", "max"):
        return True
    if isinstance(name, str) and name.lower() in ("minimize", "min"):
        return False
    raise ValueError(f"direction must be maximize or minimize, got {direction!r}")


def signs(directions: Sequence[Any]) -> np.ndarray:
    """``+1`` for each minimised objective and ``-1`` for each maximised one: ``value * sign`` is
    a loss."""
    return np.array([-1.0 if is_maximize(d) else 1.0 for d in directions])


def to_loss(values: Sequence[float], directions: Sequence[Any], scales: Sequence[str] | None = None) -> np.ndarray:
    """``values`` turned into losses (every objective minimised): maximised ones are negated.

    ``scales`` (default all ``"linear"``): ``"log"`` ranks that objective by its log10, for costs
    that span decades (params, MACs), so a hypervolume is not decided by the largest models alone;
    a value <= 0 on a log axis becomes NaN.
    """
    if len(values) != len(directions):
        raise ValueError(f"{len(values)} values for {len(directions)} directions")
    return to_losses(np.asarray(values, dtype=float).reshape(1, -1), directions, scales)[0]


def to_losses(values: Any, directions: Sequence[Any], scales: Sequence[str] | None = None) -> np.ndarray:
    """:func:`to_loss` of every row of ``values`` ``[n, m]`` at once."""
    v = np.array(values, dtype=float).reshape(-1, len(directions))
    for i, sc in enumerate(scales or ()):
        if sc == "log":
            col = v[:, i]
            with np.errstate(divide="ignore", invalid="ignore"):
                v[:, i] = np.where(col > 0, np.log10(np.where(col > 0, col, 1.0)), np.nan)
        elif sc != "linear":
            raise ValueError(f"scale must be linear or log, got {sc!r}")
    return v * signs(directions)


# ----------------------------------------------------------------------------------------------
# Dominance and sorting


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """Loss vector ``a`` dominates ``b``: ``<=`` on every objective and ``<`` on one."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return bool(np.all(x <= y) and np.any(x < y))


def _as_losses(losses: Any) -> np.ndarray:
    pts = np.asarray(losses, dtype=float)
    if pts.ndim != 2:
        raise ValueError(f"losses must be an [n, m] array, got shape {pts.shape}")
    return pts


def non_dominated(losses: Any) -> np.ndarray:
    """Boolean mask of the rows of ``losses`` ``[n, m]`` that no other row dominates (copies of a
    non-dominated row are all kept)."""
    pts = _as_losses(losses)
    if pts.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    return np.asarray(moocore.is_nondominated(pts, keep_weakly=True), dtype=bool)


def non_dominated_sort(losses: Any) -> np.ndarray:
    """Front index (0 = non-dominated) of each row of ``losses`` ``[n, m]``: front k is what is
    non-dominated once fronts 0..k-1 are taken out. Equal rows share a front."""
    pts = _as_losses(losses)
    if pts.shape[0] == 0:
        return np.zeros(0, dtype=int)
    return np.asarray(moocore.pareto_rank(pts), dtype=int)


# ----------------------------------------------------------------------------------------------
# Hypervolume


def hypervolume(losses: Any, reference: Sequence[float]) -> float:
    """Volume dominated by the rows of ``losses`` and bounded by ``reference`` (rows not strictly
    better than the reference on every axis add nothing)."""
    ref = np.asarray(reference, dtype=float)
    pts = np.asarray(losses, dtype=float).reshape(-1, ref.size)
    pts = pts[np.all(pts < ref, axis=1)]
    if pts.shape[0] == 0:
        return 0.0
    if ref.size == 1:
        return float(ref[0] - pts[:, 0].min())
    return float(moocore.hypervolume(pts, ref=ref))


def _contributions(live: np.ndarray, rows: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Exclusive contribution of each ``live[rows]`` against every other row of ``live`` (a row
    of +inf is a removed point: it covers nothing), and for each the rows that bound it.

    Each point's box is cut by the other rows clipped to it (``max(q, point)``). A clipped row
    worse than the point on one axis only is an axis-aligned wall; the nearest wall per axis
    covers every clipped row that reaches as far on that axis, so only the rows in front of
    every wall, plus the walls, go to the hypervolume: a handful of rows, not the whole set.
    The non-dominated ones among them bound the point's exclusive region: while none of them is
    removed, the contribution does not change.
    """
    out = np.zeros(rows.size)
    bounds: list[np.ndarray] = []
    m = ref.size
    for start in range(0, rows.size, _CHUNK):
        idx = rows[start:start + _CHUNK]
        here = np.arange(idx.size)
        p = live[idx][:, None, :]  # [b, 1, m]
        worse = live[None, :, :] > p  # [b, n, m]
        n_worse = worse.sum(axis=2)
        n_worse[here, idx] = m + 1  # a point is not its own competitor
        covered = (n_worse == 0).any(axis=1)  # an equal or dominating row: nothing exclusive
        clipped = np.maximum(live[None, :, :], p)
        wall_at = np.where(((n_worse == 1)[:, :, None] & worse), clipped, np.inf)  # [b, n, m]
        wall_row = wall_at.argmin(axis=1)  # [b, m]
        walls = np.take_along_axis(wall_at, wall_row[:, None, :], axis=1)[:, 0, :]
        keep = (clipped < walls[:, None, :]).all(axis=2)
        keep[here, idx] = False
        for b in range(idx.size):
            pt = p[b, 0]
            if covered[b] or not np.all(pt < ref):
                bounds.append(np.flatnonzero(n_worse[b] == 0))
                continue
            axes = np.flatnonzero(np.isfinite(walls[b]))
            near = np.concatenate([np.flatnonzero(keep[b]), wall_row[b, axes]])
            wall_rows = np.repeat(pt[None, :], axes.size, axis=0)
            wall_rows[np.arange(axes.size), axes] = walls[b, axes]
            cover = np.vstack([clipped[b][keep[b]], wall_rows])
            front = non_dominated(cover) if cover.shape[0] else np.zeros(0, dtype=bool)
            bounds.append(near[front])
            box = float(np.prod(ref - pt))
            out[start + b] = max(box - hypervolume(cover[front], ref), 0.0)
    return out, bounds


_CHUNK = 64  # points per vectorised pass of :func:`_contributions` (memory: chunk x n x m floats)


def exclusive_contribution(point: Any, others: Any, reference: Sequence[float]) -> float:
    """Hypervolume that ``point`` alone adds to ``others``: HV(others + point) - HV(others); zero
    when another row equals or dominates ``point``."""
    ref = np.asarray(reference, dtype=float)
    live = np.vstack([np.asarray(point, dtype=float).reshape(1, ref.size),
                      np.asarray(others, dtype=float).reshape(-1, ref.size)])
    return float(_contributions(live, np.array([0]), ref)[0][0])


def hypervolume_contributions(losses: Any, reference: Sequence[float]) -> np.ndarray:
    """Exclusive hypervolume of each row: HV(all) - HV(all but that row) (0 for a dominated row
    or a copy)."""
    pts = _as_losses(losses)
    return _contributions(pts, np.arange(pts.shape[0]), np.asarray(reference, dtype=float))[0]


# ----------------------------------------------------------------------------------------------
# Greedy removal (SMS-EMOA)


def _removals(points: np.ndarray, keys: Sequence[int], reference: Sequence[float], stop: int | None,
              limit: int | None = None) -> list[int]:
    """Indices in the order they are removed (least contributor first), up to and including
    ``stop`` when given, else all but the last one standing; at most ``limit`` removals."""
    n, m = points.shape
    limit = n - 1 if limit is None else min(limit, n - 1)
    if limit <= 0:
        return []
    ref = np.asarray(reference, dtype=float)
    live = points.astype(float).copy()
    bounds: list[np.ndarray | None] = [None] * n  # rows that bound each point's region (None: unknown)
    if m in (2, 3) and np.all(non_dominated(points)):
        # moocore's exact O(n log n) contributions of a mutually non-dominated set (copies: 0)
        first = np.asarray(moocore.hv_contributions(points, ref=ref, ignore_dominated=True), dtype=float)
    else:
        first, found = _contributions(live, np.arange(n), ref)
        bounds = list(found)
    # heap of (contribution when computed, -key, index, removals when computed)
    heap = [(float(first[i]), -int(keys[i]), i, 0) for i in range(n)]
    heapq.heapify(heap)
    removed_at = np.full(n, n)  # the step at which each row was removed (n: still there)

    def fresh(i: int, neg_key: int, at: int, c: float, step: int) -> tuple[float, int, int, int]:
        """Today's contribution of i, computed at step ``at`` as ``c``: unchanged unless a row that
        bounded its region has gone since."""
        near = bounds[i]
        if near is not None and not np.any((removed_at[near] >= at) & (removed_at[near] < step)):
            return (c, neg_key, i, step)
        value, found = _contributions(live, np.array([i]), ref)
        bounds[i] = found[0]
        return (float(value[0]), neg_key, i, step)

    removed: list[int] = []
    while len(removed) < limit:
        step = len(removed)
        c, neg_key, i, at = heapq.heappop(heap)
        if at < step:  # stale: a lower bound of today's value
            heapq.heappush(heap, fresh(i, neg_key, at, c, step))
            continue
        # i holds the least contribution c; every entry within the tie tolerance joins it, fresh.
        ties = [(c, neg_key, i, at)]
        while heap and heap[0][0] <= c + HV_TIE_TOL:
            entry = heapq.heappop(heap)
            entry = entry if entry[3] == step else fresh(entry[2], entry[1], entry[3], entry[0], step)
            if entry[0] <= c + HV_TIE_TOL:
                ties.append(entry)
            else:
                heapq.heappush(heap, entry)
        out = min(ties, key=lambda t: t[1])  # the highest key goes first
        for t in ties:
            if t is not out:
                heapq.heappush(heap, t)
        removed.append(out[2])
        removed_at[out[2]] = step
        live[out[2]] = np.inf
        if out[2] == stop:
            break
    return removed


def removal_order(points: Any, keys: Sequence[int], reference: Sequence[float]) -> list[int]:
    """Row indices of ``points`` best first: the reverse of greedy least-contributor removal
    (see the module docstring). ``keys`` break ties (the higher key is removed first)."""
    pts = _as_losses(points)
    if pts.shape[0] == 0:
        return []
    removed = _removals(pts, keys, reference, None)
    last = [i for i in range(pts.shape[0]) if i not in set(removed)]
    return last + removed[::-1]


def removal_position(points: Any, keys: Sequence[int], reference: Sequence[float], index: int) -> int:
    """Position of row ``index`` in :func:`removal_order` (0 = best), removing only until that
    row goes: a weak point costs a few removals, not the whole front's."""
    pts = _as_losses(points)
    removed = _removals(pts, keys, reference, index)
    return pts.shape[0] - 1 - removed.index(index) if index in removed else 0


def removal_step(points: Any, keys: Sequence[int], reference: Sequence[float], index: int, within: int) -> int | None:
    """The step (0 = first) at which row ``index`` is removed by greedy least-contributor removal,
    or None when it survives the first ``within`` removals: whether a point is among the last
    ``n - within`` standing (the ones kept) costs at most ``within`` removals, not the whole order."""
    pts = _as_losses(points)
    removed = _removals(pts, keys, reference, index, within)
    return removed.index(index) if index in removed else None
