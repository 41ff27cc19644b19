"""Issue 19: the rung ranking decides as before at a cost that stays small at any front size.

The reference (the ranking before issue 19, which recomputed every exact hypervolume after every
removal) lives in ``benchmarks/bench_rung_ranking.py``, with the rung sets drawn from the replay
table; that script's ``--check`` runs the full comparison (300 rung sets and the replays of
``bench_search.py``), this test a sample of it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from bench_rung_ranking import (  # noqa: E402
    DIRECTIONS,
    SCALES,
    check_replays,
    check_rung_sets,
    front_rung_set,
    load_rows,
    reference_rank_of,
    table_rung_set,
)

from kdsearch.config import PruningConfig  # noqa: E402
from kdsearch.search.pruning import decide_at_rung, rank_at_rung  # noqa: E402


def test_decisions_equal_the_reference_on_rung_sets_from_the_replay_table() -> None:
    """Every trial of 12 rung sets drawn from the table (2-4 objectives, 3-60 competitors, half
    of them with copies and shared coordinates): the same rank and front as the reference."""
    counts = check_rung_sets(12, seed=1)
    assert counts["sets"] == 12 and counts["decisions"] > 100
    assert 0 < counts["pruned"] < counts["decisions"] and counts["copies"] > 0  # both outcomes, and ties


@pytest.mark.slow
def test_the_replayed_searches_decide_exactly_as_with_the_reference() -> None:
    """bench_search.py's random+es and tpe+es on the table, through the live RungPruner: every
    decision equal with today's ranking and with the reference swapped in."""
    counts = check_replays([0], budget=30.0)
    assert counts["runs"] == 2 and counts["pruned"] > 0


def test_the_full_order_equals_the_reference_too() -> None:
    rng = np.random.default_rng(7)
    rows = load_rows()
    for m in (2, 3, 4):
        entries = table_rung_set(rows, 40, m, 1, rng, jitter=False)
        ranked = rank_at_rung(entries, DIRECTIONS[m], SCALES[m])
        for rank, (e, front) in enumerate(ranked):
            assert reference_rank_of(e.key, entries, DIRECTIONS[m], SCALES[m]) == (rank, front)


@pytest.mark.timeout(120)
def test_a_decision_on_a_front_of_500_four_objective_trials_takes_seconds_not_hours() -> None:
    """500 mutually non-dominated 4-objective vectors, one front: the trial that holds out longest
    makes the ranking order the whole front. The ranking before issue 19 (about n^4.4: 23.8 s at
    120) would take hours; the bound is generous for a loaded 2-core machine (it takes about 1 s
    on a quiet one)."""
    entries = front_rung_set(500, 4, np.random.default_rng(0))
    cfg = PruningConfig()
    d = decide_at_rung(entries[0], entries, DIRECTIONS[4], cfg, 0, ("linear",) * 4)
    assert d.front == 0 and d.n_competitors == 500 and 0 <= d.rank < 500
    ranked = [e.key for e, _ in rank_at_rung(entries[:60], DIRECTIONS[4], ("linear",) * 4)]
    best = decide_at_rung(entries[ranked[0]], entries[:60], DIRECTIONS[4], cfg, 0, ("linear",) * 4)
    assert best.rank == 0 and not best.prune


def _fronts(sizes: list[int], m: int, seed: int) -> list:
    """Stacked fronts: front k is a fresh set of mutually non-dominated vectors moved 1.0 worse on
    every axis per k, so each of its vectors is dominated by every vector of the fronts before."""
    from kdsearch.search.pruning import RungEntry  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    out: list = []
    for k, size in enumerate(sizes):
        for e in front_rung_set(size, m, rng):
            out.append(RungEntry(len(out), (e.values[0] - k, *(v + k for v in e.values[1:]))))
    return out


@pytest.mark.parametrize(("m", "eta", "sizes"), [(4, 3, [70, 70, 70]), (4, 2, [70, 70, 70]), (3, 3, [100])])
def test_decisions_in_fronts_too_big_to_order_fully_equal_the_full_order(m: int, eta: int, sizes: list[int]) -> None:
    """Fronts above EXACT_RANK_FRONT are ordered only as far as the decision needs: the whole front
    above the threshold (eta 3: front 0 is exactly the top 70), the whole front below it, or the
    front the threshold cuts (eta 2: front 1; one front of 100: front 0). Every sampled decision
    is the full order's (rank_at_rung: the complete greedy removal of every front): the same front
    and prune-or-continue, and the full order's rank inside the decision's [rank, rank_max]."""
    from kdsearch.search.pruning import EXACT_RANK_FRONT  # noqa: PLC0415

    assert all(s > EXACT_RANK_FRONT for s in sizes)
    entries = _fronts(sizes, m, seed=m + eta)
    scales = ("linear",) * m
    full = {e.key: (rank, front) for rank, (e, front) in enumerate(rank_at_rung(entries, DIRECTIONS[m], scales))}
    cfg = PruningConfig(eta=eta)
    n_keep = -(-len(entries) // eta)
    exact = ranged = 0
    for i in np.random.default_rng(0).choice(len(entries), size=24, replace=False):
        mine = entries[int(i)]
        d = decide_at_rung(mine, entries, DIRECTIONS[m], cfg, 0, scales)
        rank, front = full[mine.key]
        assert d.front == front and d.rank <= rank <= d.rank_max, (mine.key, d, rank, front)
        assert d.prune == (rank >= n_keep) and d.n_keep == n_keep
        exact += d.rank == d.rank_max
        ranged += d.rank < d.rank_max
    assert ranged > 0  # the shortcut was taken
    if len(sizes) == 1 or eta == 2:
        assert exact > 0  # some trial of the cut front left it before the threshold: exact rank
