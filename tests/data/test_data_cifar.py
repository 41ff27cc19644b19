"""CIFAR-10/100 from a local copy in the real pickle format, and the offline failure message."""

from __future__ import annotations

import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from kdsearch.config import DataConfig
from kdsearch.data import CIFAR_STATS, load_data
from kdsearch.errors import DataError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _dump(path: Path, entry: dict[str, object]) -> None:
    # The release was pickled by Python 2; read with encoding="latin1" its str keys and names come
    # back as str, which is what a protocol-2 pickle of Python 3 str gives too.
    with open(path, "wb") as fh:
        pickle.dump(entry, fh, protocol=2)


def _images(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_fake_cifar10(root: Path, per_batch: int = 20, n_test: int = 30) -> dict[str, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_data, train_labels = [], []
    for k in range(1, 6):
        data = _images(per_batch, rng)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        labels[:10] = list(range(10))  # every class in every batch
        _dump(
            folder / f"data_batch_{k}",
            {"batch_label": f"batch {k}", "labels": labels, "data": data, "filenames": ["x.png"] * per_batch},
        )
        train_data.append(data)
        train_labels += labels
    test = _images(n_test, rng)
    test_labels = [i % 10 for i in range(n_test)]
    _dump(
        folder / "test_batch",
        {"batch_label": "test", "labels": test_labels, "data": test, "filenames": ["x.png"] * n_test},
    )
    _dump(
        folder / "batches.meta",
        {"label_names": list(CIFAR10_CLASSES), "num_cases_per_batch": per_batch, "num_vis": 3072},
    )
    return {"train": np.concatenate(train_data), "train_labels": np.array(train_labels), "test": test}


def test_cifar10_reads_a_local_copy_offline(tmp_path: Path) -> None:
    arrays = write_fake_cifar10(tmp_path)
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path), download=False, val_fraction=0.1)
    b = load_data(cfg)
    assert b.class_names == CIFAR10_CLASSES and b.num_classes == 10 and b.image_size == 32
    assert len(b.train) + len(b.val) == 100 and len(b.test) == 30
    assert (b.mean, b.std) == CIFAR_STATS["cifar10"]
    # Row layout of the files is 1024 R, 1024 G, 1024 B values: test image 7 must be that row.
    expected = torch.from_numpy(arrays["test"][7].reshape(3, 32, 32))
    assert torch.equal(b.test.images[7], expected) and int(b.test.labels[7]) == 7
    # Train images keep their labels through the split.
    pool = torch.from_numpy(arrays["train"]).reshape(-1, 3, 32, 32)
    first = b.train.images[0]
    match = (pool == first).flatten(1).all(1).nonzero().flatten()
    assert len(match) == 1 and int(b.train.labels[0]) == int(arrays["train_labels"][int(match)])


def test_cifar100_reads_a_local_copy(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    names = [f"c{i}" for i in range(100)]
    _dump(
        folder / "train",
        {"data": _images(300, rng), "fine_labels": [i % 100 for i in range(300)], "coarse_labels": [0] * 300},
    )
    _dump(
        folder / "test",
        {"data": _images(100, rng), "fine_labels": list(range(100)), "coarse_labels": [0] * 100},
    )
    _dump(folder / "meta", {"fine_label_names": names, "coarse_label_names": ["x"]})
    b = load_data(DataConfig(dataset="cifar100", root=str(tmp_path), download=False, val_fraction=0.34))
    assert b.num_classes == 100 and b.class_names == names
    assert len(b.val) == round(0.34 * 300) and set(b.val.labels.tolist()) == set(range(100))
    assert (b.mean, b.std) == CIFAR_STATS["cifar100"]


def test_cifar10_offline_without_local_copy_is_one_data_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.utils as tv_utils

    def no_network(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    # Both entry points, so no test ever reaches the network whatever torchvision calls.
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", no_network)
    monkeypatch.setattr(tv_utils, "download_url", no_network)
    root = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load_data(DataConfig(dataset="cifar10", root=str(root), download=True))
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("data.root:")
    assert str(root / "cifar-10-batches-py") in msg
    assert "download failed" in msg and "URLError" in msg
    assert "dataset: imagefolder" in msg  # the fix


def test_cifar10_missing_with_download_off(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.root: .*data\.download is false"):
        load_data(DataConfig(dataset="cifar10", root=str(tmp_path), download=False))


def test_cifar10_corrupt_copy_is_a_data_error(tmp_path: Path) -> None:
    write_fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=r"data_batch_3|unreadable"):
        load_data(DataConfig(dataset="cifar10", root=str(tmp_path), download=False))
