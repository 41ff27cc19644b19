"""The Pareto toolkit (kdsearch.pareto): directions, dominance, sorting, hypervolume, removal order."""

from __future__ import annotations

import itertools

import numpy as np
import optuna
import pytest

from kdsearch.pareto import (
    HV_TIE_TOL,
    dominates,
    exclusive_contribution,
    hypervolume,
    hypervolume_contributions,
    is_maximize,
    non_dominated,
    non_dominated_sort,
    removal_order,
    removal_position,
    signs,
    to_loss,
    to_losses,
)


def test_directions_and_signs() -> None:
    assert is_maximize("maximize") and is_maximize(optuna.study.StudyDirection.MAXIMIZE)
    assert not is_maximize("min") and not is_maximize(optuna.study.StudyDirection.MINIMIZE)
    with pytest.raises(ValueError, match="direction"):
        is_maximize("up")
    assert signs(["maximize", "minimize"]).tolist() == [-1.0, 1.0]
    assert to_loss((0.5, 1e5), ("maximize", "minimize"), ("linear", "log")).tolist() == pytest.approx([-0.5, 5.0])
    both = to_losses([[0.5, 1e5], [0.7, -1.0]], ("maximize", "minimize"), ("linear", "log"))
    assert both[0].tolist() == pytest.approx([-0.5, 5.0]) and both[1, 0] == -0.7 and np.isnan(both[1, 1])
    with pytest.raises(ValueError, match="values for"):
        to_loss((1.0,), ("maximize", "minimize"))


def test_dominance_and_the_non_dominated_mask() -> None:
    assert dominates((0.0, 1.0), (0.0, 2.0)) and not dominates((0.0, 1.0), (0.0, 1.0))
    assert not dominates((0.0, 2.0), (1.0, 1.0)) and not dominates((1.0, 1.0), (0.0, 2.0))
    pts = np.array([[1, 1], [0, 1], [1, 0], [1, 0], [2, 2]], dtype=float)
    assert non_dominated(pts).tolist() == [False, True, True, True, False]  # copies are all kept
    assert non_dominated(np.zeros((0, 2))).tolist() == []


def test_non_dominated_sort_on_a_known_set() -> None:
    # minimise both; fronts by hand: {a, b, c} | {d, e} | {f}; g equals a (shares its front)
    pts = np.array([
        [0.0, 3.0],  # a
        [1.0, 1.0],  # b
        [3.0, 0.0],  # c
        [1.0, 3.0],  # d: dominated by a
        [2.0, 2.0],  # e: dominated by b
        [3.0, 3.0],  # f: dominated by d and e
        [0.0, 3.0],  # g: a copy of a
    ])
    assert non_dominated_sort(pts).tolist() == [0, 0, 0, 1, 1, 2, 0]
    # three objectives: nobody dominates a trade-off, a strictly worse point is one front down
    pts3 = np.array([[1, 2, 3], [3, 2, 1], [2, 2, 2], [2, 3, 3], [4, 4, 4]], dtype=float)
    assert non_dominated_sort(pts3).tolist() == [0, 0, 0, 1, 2]
    assert non_dominated_sort(np.zeros((0, 2))).tolist() == []


def test_hypervolume_and_contributions_on_a_known_2d_example() -> None:
    # Staircase with reference (4, 4): a=(1,3), b=(2,2), c=(3,1).
    # HV = 3*1 + 2*1 + 1*1 + (cells under b and c) = 6; each point owns exactly one unit cell.
    pts = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])
    assert hypervolume(pts, (4.0, 4.0)) == pytest.approx(6.0)
    assert hypervolume_contributions(pts, (4.0, 4.0)) == pytest.approx([1.0, 1.0, 1.0])
    # Move b in to (1.5, 1.5): its exclusive box is 1.5 x 1.5 = 2.25, a's and c's 0.5 x 1 each.
    pts[1] = (1.5, 1.5)
    assert hypervolume_contributions(pts, (4.0, 4.0)) == pytest.approx([0.5, 2.25, 0.5])
    # a point outside the reference box adds nothing; 3-D: a unit cube and a cube sharing half
    assert hypervolume(np.array([[5.0, 0.0]]), (4.0, 4.0)) == 0.0
    assert hypervolume(np.array([[0, 0, 0], [0, 0, 0.5]], dtype=float), (1, 1, 1)) == pytest.approx(1.0)
    assert hypervolume(np.array([[0, 0.5, 0], [0.5, 0, 0]], dtype=float), (1, 1, 1)) == pytest.approx(0.75)


def _brute_force_order(pts: np.ndarray, keys: list[int], ref: np.ndarray) -> list[int]:
    """Greedy least-contributor removal, every contribution recomputed at every step from two
    exact hypervolumes (the definition), ties within HV_TIE_TOL to the higher key."""
    remaining = list(range(len(pts)))
    dropped: list[int] = []
    while len(remaining) > 1:
        total = hypervolume(pts[remaining], ref)
        contrib = [total - hypervolume(pts[[r for r in remaining if r != j]], ref) for j in remaining]
        least = min(contrib)
        ties = [j for j, c in zip(remaining, contrib, strict=True) if c <= least + HV_TIE_TOL]
        worst = max(ties, key=lambda j: keys[j])
        dropped.append(worst)
        remaining.remove(worst)
    return remaining + dropped[::-1]


def _front(n: int, m: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.random((4 * n, m))
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x[non_dominated(x)][:n]


@pytest.mark.parametrize("m", [2, 3, 4, 5])
def test_the_removal_order_is_greedy_least_contributor_removal(m: int) -> None:
    """Lazy recomputation, the wall filter and moocore's 2-3-D contributions give exactly the
    order of recomputing every contribution at every step; removal_position agrees with it."""
    rng = np.random.default_rng(m)
    ref = np.full(m, 1.1)
    for _ in range(6):
        pts = _front(int(rng.integers(2, 14)), m, rng)
        keys = [int(k) for k in rng.permutation(len(pts))]
        order = removal_order(pts, keys, ref)
        assert order == _brute_force_order(pts, keys, ref)
        for i in range(len(pts)):
            assert removal_position(pts, keys, ref, i) == order.index(i)


def test_contributions_match_their_definition_on_sets_with_copies_and_dominated_rows() -> None:
    rng = np.random.default_rng(0)
    for m in (2, 3, 4):
        pts = np.round(rng.random((12, m)) * 4) / 4  # a grid: copies, dominated rows, shared coordinates
        ref = np.full(m, 1.1)
        total = hypervolume(pts, ref)
        want = [total - hypervolume(np.delete(pts, i, axis=0), ref) for i in range(len(pts))]
        assert hypervolume_contributions(pts, ref) == pytest.approx(want, abs=1e-12)
    assert exclusive_contribution((0.5, 0.5), np.zeros((0, 2)), (1.0, 1.0)) == pytest.approx(0.25)
    assert exclusive_contribution((0.5, 0.5), [[0.5, 0.5]], (1.0, 1.0)) == 0.0  # a copy owns nothing


def test_ties_go_to_the_lower_key_whatever_the_input_order() -> None:
    # Mirror images: (0, 1) and (1, 0) own the same volume; so do the two copies of (0.5, 0.5).
    pts = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [0.5, 0.5]])
    ref = np.array([1.1, 1.1])
    for perm in itertools.permutations(range(4)):
        keys = [10, 11, 12, 13]
        order = removal_order(pts[list(perm)], [keys[p] for p in perm], ref)
        assert [keys[perm[i]] for i in order] == [12, 10, 11, 13]


def test_a_weak_point_of_a_big_front_costs_a_few_removals_only() -> None:
    """removal_position stops when its point leaves: the least contributor of a 500-point
    4-objective front is last, found at the first removal."""
    rng = np.random.default_rng(1)
    pts = _front(500, 4, rng)
    ref = np.full(4, 1.1)
    contrib = hypervolume_contributions(pts, ref)
    weakest = int(np.argmin(contrib))
    assert removal_position(pts, list(range(len(pts))), ref, weakest) == len(pts) - 1
