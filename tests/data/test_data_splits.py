"""Seeded stratified splits and the data fingerprint."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kdsearch.config import DataConfig
from kdsearch.data import ImageSplit, carve_splits, load_data, stratified_split, stratified_subset
from kdsearch.data.splits import stratified_counts


def _labels(sizes: list[int], seed: int = 0) -> torch.Tensor:
    """Shuffled labels with ``sizes[c]`` images of class c (unbalanced on purpose)."""
    y = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(sizes)])
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))]


SIZES = [100, 50, 30, 7, 3]


def test_stratified_split_is_seeded() -> None:
    y = _labels(SIZES)
    (a,), ra = stratified_split(y, [0.2], seed=3)
    (b,), rb = stratified_split(y, [0.2], seed=3)
    (c,), _ = stratified_split(y, [0.2], seed=4)
    assert torch.equal(a, b) and torch.equal(ra, rb)
    assert not torch.equal(a, c)


def test_stratified_split_is_disjoint_complete_and_proportional() -> None:
    y = _labels(SIZES)
    (val, ft), rest = stratified_split(y, [0.2, 0.1], seed=0)
    all_idx = torch.cat([val, ft, rest])
    assert len(all_idx) == len(y)
    assert torch.equal(torch.sort(all_idx)[0], torch.arange(len(y)))  # disjoint and covering
    for share, frac in ((val, 0.2), (ft, 0.1)):
        counts = torch.bincount(y[share], minlength=len(SIZES)).tolist()
        for c, n in enumerate(SIZES):
            assert counts[c] >= 1, "every class with >= 2 images appears in every share"
            assert abs(counts[c] - frac * n) <= 1.0, (c, counts[c], frac * n)
    # The rest keeps at least one image of every class.
    assert set(y[rest].tolist()) == set(range(len(SIZES)))
    # Indices come back sorted (a split is a set, its order is the pool's).
    assert torch.equal(val, torch.sort(val)[0])


def test_stratified_counts_hit_the_total_and_follow_proportions() -> None:
    counts = stratified_counts([500, 300, 200], fraction=0.1)
    assert counts == [50, 30, 20]
    counts = stratified_counts([5, 5, 5, 5], total=6)
    assert sum(counts) == 6 and max(counts) - min(counts) <= 1
    # Tiny classes still get one image, and keep one back.
    assert stratified_counts([1000, 2], fraction=0.01) == [10, 1]
    assert stratified_counts([1, 40], fraction=0.5) == [0, 20]


def test_stratified_subset_size_and_balance() -> None:
    y = _labels([60, 30, 10])
    idx = stratified_subset(y, 20, seed=1)
    assert len(idx) == 20 and len(set(idx.tolist())) == 20
    assert torch.bincount(y[idx], minlength=3).tolist() == [12, 6, 2]
    assert torch.equal(stratified_subset(y, 500, seed=1), torch.arange(len(y)))


def test_carve_splits_caps_train_and_test() -> None:
    pool = _labels([200, 200, 200])
    test = _labels([50, 50, 50], seed=1)
    s = carve_splits(
        pool,
        test,
        3,
        val_fraction=0.1,
        finetune_fraction=0.2,
        seed=0,
        max_train_samples=30,
        max_test_samples=15,
    )
    assert len(s.val) == 60 and s.finetune is not None and len(s.finetune) == 120
    assert len(s.train) == 30 and torch.bincount(pool[s.train]).tolist() == [10, 10, 10]
    assert len(s.test) == 15 and torch.bincount(test[s.test]).tolist() == [5, 5, 5]
    sets = [set(s.train.tolist()), set(s.val.tolist()), set(s.finetune.tolist())]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    # Capping train does not move val: the caps use their own sub-seeds.
    s2 = carve_splits(pool, test, 3, val_fraction=0.1, finetune_fraction=0.2, seed=0)
    assert torch.equal(s.val, s2.val) and len(s2.train) == 420


def test_fingerprint_follows_seed_fraction_size_and_content() -> None:
    base = DataConfig(dataset="synthetic", synthetic_train_size=60, synthetic_test_size=20)
    fp = load_data(base).fingerprint
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert load_data(base).fingerprint == fp, "same config, same fingerprint"
    for change in (
        {"seed": 1},
        {"val_fraction": 0.2},
        {"image_size": 16},
        {"finetune_fraction": 0.1},
        {"max_train_samples": 20},
    ):
        other = load_data(dataclasses.replace(base, **change)).fingerprint
        assert other != fp, change


def test_image_split_checks_types_and_moves() -> None:
    x = torch.zeros((4, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(4)
    split = ImageSplit(x, y)
    assert len(split) == 4 and split.nbytes == 4 * 3 * 64 + 4 * 8
    assert split.to("cpu").images.device.type == "cpu"
    sub = split.subset(torch.tensor([3, 1]))
    assert sub.labels.tolist() == [3, 1]
    with pytest.raises(ValueError):
        ImageSplit(x.float(), y)
    with pytest.raises(ValueError):
        ImageSplit(x, y[:3])
