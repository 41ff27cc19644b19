"""Issue 19: the cost of one rung decision against the number of competitors, and proof that the
fast ranking decides exactly as the one it replaced.

A decision is :func:`kdsearch.search.pruning.decide_at_rung`: non-dominated sorting of the rung's
vectors, the greedy hypervolume removal order inside the trial's own front, top ``1/eta``. Before
issue 19 the front was ordered by recomputing every exact hypervolume after every removal
(:func:`reference_rank_of`, kept here, and only here, as the reference): about n^4.4, 23.8 s for
120 mutually non-dominated trials with 4 objectives.

Rung sets come from the replay table (``benchmarks/search_table/``): each competitor is a random
row (its validation accuracy at the rung, on the table's 500-image subset, plus seed noise rounded
to that subset's 1/500 grid, so exact ties occur as they do live) with its fixed costs jittered by
5% (a continuous space: a new proposal is a new student). Objectives: 3 = (accuracy, params log,
MACs log), 4 = the same plus batch-1 latency (linear), as the objective ranks them live. The
adversarial case is a set of mutually non-dominated vectors (one front holds everyone).

A decision orders a front of more than ``EXACT_RANK_FRONT`` trials only as far as its decision
needs, so its stored rank may be a range (``rank`` to ``rank_max``); the checks require the same
front and prune-or-continue and the reference's rank inside that range (equal when exact), and
the timings count the decisions that stored an exact rank.

    python benchmarks/bench_rung_ranking.py                 # timings (p50, p99 per size)
    python benchmarks/bench_rung_ranking.py --check         # decisions equal to the reference
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
TABLES = (HERE / "search_table" / "table.jsonl", HERE / "search_table" / "wsd.jsonl")
DIRECTIONS = {
    2: ("maximize", "minimize"),
    3: ("maximize", "minimize", "minimize"),
    4: ("maximize", "minimize", "minimize", "minimize"),
}
SCALES = {2: ("linear", "log"), 3: ("linear", "log", "log"), 4: ("linear", "log", "log", "linear")}
RUNG_EVALS = {0: 3, 1: 9}  # rung index -> the table's evaluation (k/27) at 1/9 and 1/3 of the box


# ----------------------------------------------------------------------------------------------
# The reference: the ranking as it was before issue 19 (commit dd09f73), verbatim but for names.


def _ref_non_dominated_sort(losses: np.ndarray) -> np.ndarray:
    pts = np.asarray(losses, dtype=float)
    n = pts.shape[0]
    if n == 0:
        return np.zeros(0, dtype=int)
    le = np.all(pts[:, None, :] <= pts[None, :, :], axis=2)
    lt = np.any(pts[:, None, :] < pts[None, :, :], axis=2)
    dominates = le & lt
    n_dominators = dominates.sum(axis=0)
    fronts = np.full(n, -1, dtype=int)
    current = np.flatnonzero(n_dominators == 0)
    k = 0
    while current.size:
        fronts[current] = k
        n_dominators = n_dominators - dominates[current].sum(axis=0)
        n_dominators[fronts >= 0] = -1
        current = np.flatnonzero(n_dominators == 0)
        k += 1
    return fronts


def _ref_hypervolume(losses: np.ndarray, reference: Sequence[float]) -> float:
    ref = np.asarray(reference, dtype=float)
    pts = np.asarray(losses, dtype=float).reshape(-1, ref.size)
    pts = pts[np.all(pts < ref, axis=1)]
    if pts.shape[0] == 0:
        return 0.0
    return _ref_hv(pts, ref)


def _ref_hv(pts: np.ndarray, ref: np.ndarray) -> float:
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
            vol += width * _ref_hv(pts[: i + 1, 1:], ref[1:])
    return float(vol)


def _ref_contributions(losses: np.ndarray, reference: Sequence[float]) -> np.ndarray:
    pts = np.asarray(losses, dtype=float)
    total = _ref_hypervolume(pts, reference)
    out = np.empty(pts.shape[0])
    for i in range(pts.shape[0]):
        out[i] = total - _ref_hypervolume(np.delete(pts, i, axis=0), reference)
    return out


def _ref_order_front(norm: np.ndarray, keys: np.ndarray) -> list[int]:
    remaining = list(range(norm.shape[0]))
    dropped: list[int] = []
    ref = np.full(norm.shape[1], 1.1)
    while len(remaining) > 1:
        contrib = _ref_contributions(norm[remaining], ref)
        worst = min(range(len(remaining)), key=lambda j: (contrib[j], -keys[remaining[j]]))
        dropped.append(remaining.pop(worst))
    return remaining + dropped[::-1]


def reference_rank_of(key: int, entries: Sequence, directions: Sequence[str],
                      scales: Sequence[str] | None) -> tuple[int, int]:
    """(rank, front) of ``key`` among ``entries`` as the ranking before issue 19 computed it."""
    from kdsearch.search.pruning import _normalise, _split_finite  # noqa: PLC0415

    finite, losses, broken = _split_finite(entries, directions, scales)
    keys_broken = [e.key for e in broken]
    if key in keys_broken:
        n_fronts = int(_ref_non_dominated_sort(losses).max()) + 1 if finite else 0
        return len(finite) + keys_broken.index(key), n_fronts
    fronts = _ref_non_dominated_sort(losses)
    i = next(j for j, e in enumerate(finite) if e.key == key)
    f = int(fronts[i])
    idx = np.flatnonzero(fronts == f)
    keys = np.array([e.key for e in finite])
    order = _ref_order_front(_normalise(losses)[idx], keys[idx])
    pos = next(p for p, j in enumerate(order) if idx[j] == i)
    return int((fronts < f).sum()) + pos, f


# ----------------------------------------------------------------------------------------------
# Rung sets


def load_rows() -> list[dict]:
    return [json.loads(line) for path in TABLES for line in path.read_text().splitlines() if line.strip()]


def table_rung_set(rows: list[dict], n: int, m: int, rung_index: int, rng: np.random.Generator,
                   jitter: bool = True) -> list:
    """``n`` competitors at rung ``rung_index`` with ``m`` objectives, drawn from the table;
    without ``jitter`` the costs are the table's own and the rows come from a few students (the
    same student twice has the same costs), so copies and shared coordinates abound."""
    from kdsearch.search.pruning import RungEntry  # noqa: PLC0415

    pool = rows if jitter else rows[: max(6, n // 4)]
    out = []
    for key in range(n):
        r = pool[int(rng.integers(len(pool)))]
        acc = r["curve"][RUNG_EVALS[rung_index] - 1][1] + rng.normal(0.0, 0.01)
        acc = min(1.0, max(0.0, round(acc * 500) / 500))
        costs = [float(r[c]) * (math.exp(rng.normal(0.0, 0.05)) if jitter else 1.0)
                 for c in ("params", "macs", "latency_ms_b1")]
        out.append(RungEntry(key, (acc, *costs[: m - 1]) if m > 2 else (acc, costs[1])))
    return out


def front_rung_set(n: int, m: int, rng: np.random.Generator) -> list:
    """``n`` mutually non-dominated vectors (accuracy maximised, m - 1 costs minimised)."""
    from kdsearch.pareto import non_dominated  # noqa: PLC0415
    from kdsearch.search.pruning import RungEntry  # noqa: PLC0415

    pts = np.zeros((0, m))
    while pts.shape[0] < n:
        x = rng.random((4 * n, m))
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        pts = x[non_dominated(x)]
    return [RungEntry(k, (1.0 - p[0], *(1.0 + p[1:]))) for k, p in enumerate(pts[:n])]


# ----------------------------------------------------------------------------------------------
# Checks


def agrees(live: Any, rank: int, front: int, n: int, cfg: Any) -> bool:
    """``live`` (a RungDecision) decides as the reference's (rank, front) among ``n`` competitors:
    the same front, the reference's rank inside the live one's range (equal when the live rank is
    exact), and the same prune-or-continue."""
    n_keep = math.ceil(n / cfg.eta)
    prune = n >= cfg.competitors_needed and rank >= n_keep
    rank_max = live.rank if live.rank_max is None else live.rank_max
    return live.front == front and live.rank <= rank <= rank_max and live.prune == prune


def check_rung_sets(n_sets: int, seed: int = 0) -> dict[str, int]:
    """Decisions of the live code and of the reference on table-drawn rung sets; every field
    but the digest (which the reference did not have) must be equal. Returns counts."""
    from kdsearch.config import PruningConfig  # noqa: PLC0415
    from kdsearch.search import pruning  # noqa: PLC0415

    rows = load_rows()
    rng = np.random.default_rng(seed)
    cfg = PruningConfig()
    counts = {"sets": 0, "decisions": 0, "pruned": 0, "copies": 0}
    for _ in range(n_sets):
        m = int(rng.integers(2, 5))
        n = int(rng.integers(3, 61))
        k = int(rng.integers(0, 2))
        entries = table_rung_set(rows, n, m, k, rng, jitter=bool(counts["sets"] % 2))
        values = [e.values for e in entries]
        counts["copies"] += len(values) - len(set(values))  # vectors equal to an earlier one
        for mine in entries:
            live = pruning.decide_at_rung(mine, entries, DIRECTIONS[m], cfg, k, SCALES[m])
            rank, front = reference_rank_of(mine.key, entries, DIRECTIONS[m], SCALES[m])
            if not agrees(live, rank, front, len(entries), cfg):
                raise AssertionError(f"set {counts['sets']} (n {n}, m {m}), trial {mine.key}: live "
                                     f"rank/front {(live.rank, live.rank_max, live.front)} != reference {(rank, front)}")
            counts["decisions"] += 1
            counts["pruned"] += live.prune
        counts["sets"] += 1
    return counts


def check_replays(seeds: Sequence[int], budget: float) -> dict[str, int]:
    """``bench_search.py``'s early-stopped strategies replayed through the live RungPruner, once
    with today's ranking and once with the reference swapped in: every decision of every trial
    must be equal (the runs then stay identical: the samplers see the same outcomes)."""
    import bench_search  # noqa: PLC0415

    from kdsearch.search import pruning  # noqa: PLC0415

    table = bench_search.load_table(TABLES[0])
    real_decide, real_place = pruning.decide_at_rung, pruning._place
    counts = {"runs": 0, "decisions": 0, "pruned": 0}

    def reference_place(key: int, entries: Sequence, directions: Sequence[str], scales: Sequence[str] | None,
                        n_keep: int) -> tuple[int, int, int]:
        rank, front = reference_rank_of(key, entries, directions, scales)
        return rank, rank, front

    def run(strategy: str, seed: int, place: object) -> list[tuple]:
        seen: list[tuple] = []

        def recording(*args: object, **kw: object) -> pruning.RungDecision:
            d = real_decide(*args, **kw)
            seen.append((args[0].key, d.rung_index, d.prune, d.front, d.n_competitors, d.n_keep, d.rank, d.rank_max))
            return d

        pruning.decide_at_rung, pruning._place = recording, place
        try:
            bench_search.run_optuna(strategy, table, seed, budget, None)
        finally:
            pruning.decide_at_rung, pruning._place = real_decide, real_place
        return seen

    def same(a: tuple, b: tuple) -> bool:  # b: the reference's (exact rank)
        return a[:6] == b[:6] and a[6] <= b[6] <= a[7]

    for strategy in ("random+es", "tpe+es"):
        for seed in seeds:
            live = run(strategy, seed, real_place)
            ref = run(strategy, seed, reference_place)
            if len(live) != len(ref) or not all(same(a, b) for a, b in zip(live, ref, strict=False)):
                first = next((i for i, (a, b) in enumerate(zip(live, ref, strict=False)) if not same(a, b)),
                             min(len(live), len(ref)))
                raise AssertionError(f"{strategy} seed {seed}: decision {first} differs: "
                                     f"{live[first:first + 1]} != {ref[first:first + 1]}")
            counts["runs"] += 1
            counts["decisions"] += len(live)
            counts["pruned"] += sum(d[2] for d in live)
    return counts


# ----------------------------------------------------------------------------------------------
# Timings


def time_decisions(entries: list, m: int, n_decisions: int, rng: np.random.Generator) -> tuple[list[float], int]:
    """Wall seconds of ``n_decisions`` decisions of random trials of the rung, and how many of
    them stored an exact rank (the others a range: their front was decided without its order)."""
    from kdsearch.config import PruningConfig  # noqa: PLC0415
    from kdsearch.search.pruning import decide_at_rung  # noqa: PLC0415

    cfg = PruningConfig()
    out, exact = [], 0
    for i in rng.choice(len(entries), size=min(n_decisions, len(entries)), replace=False):
        t0 = time.perf_counter()
        d = decide_at_rung(entries[int(i)], entries, DIRECTIONS[m], cfg, 0, SCALES[m])
        out.append(time.perf_counter() - t0)
        exact += getattr(d, "rank_max", d.rank) in (None, d.rank)
    return out, exact


def p99(xs: list[float]) -> float:
    return float(np.percentile(xs, 99))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare decisions with the reference ranking")
    ap.add_argument("--sets", type=int, default=300, help="table rung sets for --check")
    ap.add_argument("--replay-seeds", type=int, default=3, help="bench_search replay seeds per strategy for --check")
    ap.add_argument("--budget", type=float, default=30.0, help="replay budget in boxes for --check")
    ap.add_argument("--sizes", default="30,100,300,1000,3000", help="competitors per rung")
    ap.add_argument("--decisions", type=int, default=40, help="timed decisions per size (random trials of the rung)")
    ap.add_argument("--front-sizes", default="30,100,300,1000", help="sizes of the adversarial one-front sets")
    ap.add_argument("--objectives", default="3,4", help="numbers of objectives to time (comma list of 3, 4)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    print(f"# {platform.node()} {platform.machine()}, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if args.check:
        t0 = time.perf_counter()
        print("rung sets:", check_rung_sets(args.sets, args.seed))
        print("replays:", check_replays(range(args.replay_seeds), args.budget))
        print(f"all decisions equal to the reference ({time.perf_counter() - t0:.0f} s)")
        return 0
    rows = load_rows()
    rng = np.random.default_rng(args.seed)
    print("| rung set | objectives | competitors | largest front | decisions | p50 (s) | p99 (s) | max (s) | exact ranks |")
    print("|---|---|---|---|---|---|---|---|---|")
    from kdsearch.pareto import non_dominated_sort, to_losses  # noqa: PLC0415

    ms = [int(m) for m in args.objectives.split(",")]
    cases = [("table", m, int(n)) for m in ms for n in args.sizes.split(",") if n]
    cases += [("one front", m, int(n)) for m in ms for n in args.front_sizes.split(",") if n]
    for kind, m, n in cases:
        entries = table_rung_set(rows, n, m, 0, rng) if kind == "table" else front_rung_set(n, m, rng)
        fronts = non_dominated_sort(to_losses([e.values for e in entries], DIRECTIONS[m], SCALES[m]))
        largest = int(np.bincount(fronts).max())
        k = args.decisions if kind == "table" else max(3, args.decisions // max(1, n // 100))
        times, exact = time_decisions(entries, m, k, rng)
        print(f"| {kind} | {m} | {n} | {largest} | {len(times)} | {statistics.median(times):.3f} | "
              f"{p99(times):.3f} | {max(times):.3f} | {exact} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
