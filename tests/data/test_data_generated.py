"""The offline data sets: generated images and scikit-learn digits."""

from __future__ import annotations

import dataclasses

import torch

from kdsearch.config import DataConfig
from kdsearch.data import DataBundle, channel_stats, load_data


def _nearest_class_mean_accuracy(bundle: DataBundle) -> float:
    train = bundle.train.images.flatten(1).float()
    test = bundle.test.images.flatten(1).float()
    means = torch.stack([train[bundle.train.labels == c].mean(0) for c in range(bundle.num_classes)])
    pred = torch.cdist(test, means).argmin(1)
    return float((pred == bundle.test.labels).float().mean())


def test_synthetic_shapes_balance_and_learnability() -> None:
    cfg = DataConfig(
        dataset="synthetic", num_classes=10, synthetic_train_size=400, synthetic_test_size=200, seed=0
    )
    b = load_data(cfg)
    assert b.name == "synthetic" and b.num_classes == 10 and b.image_size == 32
    assert b.train.images.dtype == torch.uint8 and b.train.images.shape[1:] == (3, 32, 32)
    assert len(b.train) + len(b.val) == 400 and len(b.test) == 200 and b.finetune is None
    assert torch.bincount(b.test.labels, minlength=10).tolist() == [20] * 10
    # Real class structure: a nearest-class-mean classifier on raw pixels is far above 10 %.
    assert _nearest_class_mean_accuracy(b) > 0.6
    # ... but it is not trivial: the pixels vary within a class (noise, shifts, distractors).
    same_class = b.train.images[b.train.labels == 0].float()
    assert same_class.std(0).mean() > 20


def test_synthetic_is_deterministic_per_seed() -> None:
    cfg = DataConfig(
        dataset="synthetic", synthetic_train_size=100, synthetic_test_size=40, image_size=16, num_classes=4
    )
    a, b = load_data(cfg), load_data(cfg)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert a.fingerprint == b.fingerprint and a.mean == b.mean
    c = load_data(dataclasses.replace(cfg, seed=1))
    assert not torch.equal(a.test.images, c.test.images)
    assert a.train.images.shape[1:] == (3, 16, 16) and a.num_classes == 4


def test_digits_loads_offline_with_its_own_test_split() -> None:
    b = load_data(DataConfig(dataset="digits"))
    assert b.num_classes == 10 and b.class_names == [str(d) for d in range(10)]
    assert b.image_size == 32 and b.train.images.shape[1:] == (3, 32, 32)
    assert len(b.train) + len(b.val) + len(b.test) == 1797
    assert abs(len(b.test) - 0.2 * 1797) <= 10
    assert set(b.test.labels.tolist()) == set(range(10))
    # Grey replicated to three channels, full 0..255 range after scaling 0..16.
    assert torch.equal(b.train.images[:, 0], b.train.images[:, 2])
    assert int(b.train.images.max()) == 255 and int(b.train.images.min()) == 0
    # data.seed moves the val split but not the carved test split.
    other = load_data(DataConfig(dataset="digits", seed=5))
    assert torch.equal(other.test.images, b.test.images)
    assert not torch.equal(other.val.images, b.val.images)
    assert other.fingerprint != b.fingerprint


def test_digits_native_8px() -> None:
    b = load_data(DataConfig(dataset="digits", image_size=8))
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().images)
    assert b.train.images.shape[1:] == (3, 8, 8)
    # At 8 px the stored pixels are exactly round(v * 255 / 16) of sklearn's 0..16 values.
    levels = set(b.train.images.unique().tolist())
    assert levels <= {round(v * 255 / 16) for v in range(17)}
    assert len(raw) == 1797


def test_normalisation_stats_come_from_the_train_split() -> None:
    b = load_data(DataConfig(dataset="synthetic", synthetic_train_size=120, synthetic_test_size=30))
    x = b.train.images.double() / 255
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(torch.tensor(b.mean, dtype=torch.float64), mean, atol=1e-9)
    assert torch.allclose(torch.tensor(b.std, dtype=torch.float64), std, atol=1e-9)
    assert channel_stats(b.train.images) == (b.mean, b.std)
