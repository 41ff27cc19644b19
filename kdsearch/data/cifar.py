"""CIFAR-10 and CIFAR-100 through torchvision, read from ``data.root`` (downloaded when allowed)."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdsearch.errors import DataError

__all__ = ["CIFAR_STATS", "CifarArrays", "default_data_root", "load_cifar"]

# Per-channel mean and standard deviation of the training images, 0..1 scale (computed over all
# 50,000 training images; the often-quoted 0.2023/0.1994/0.2010 is a per-image average instead).
CIFAR_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


def default_data_root() -> Path:
    """``$KDSEARCH_DATA_ROOT`` or ``~/.cache/kdsearch/datasets``: where data.root points when unset."""
    env = os.environ.get("KDSEARCH_DATA_ROOT")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kdsearch" / "datasets"


@dataclass
class CifarArrays:
    """Both official splits as uint8 ``[N, 3, 32, 32]`` with int64 labels, and the class names."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str]


_FILES = {
    "cifar10": (
        ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"),
        ("test_batch",),
        "batches.meta",
        "labels",
        "label_names",
    ),
    "cifar100": (("train",), ("test",), "meta", "fine_labels", "fine_label_names"),
}


def _unpickle(path: Path) -> dict[str, object]:
    with open(path, "rb") as fh:
        entry = pickle.load(fh, encoding="latin1")
    # Files written by Python 2 pickle have bytes keys; normalise to str.
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in entry.items()}


def _read_batches(folder: Path, names: tuple[str, ...], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    images: list[np.ndarray] = []
    labels: list[int] = []
    for n in names:
        entry = _unpickle(folder / n)
        data = np.asarray(entry["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{n}: 'data' must be uint8 [N, 3072], got {data.shape}")
        lab = list(entry[label_key])  # type: ignore[call-overload]
        if len(lab) != data.shape[0]:
            raise ValueError(f"{n}: {len(lab)} labels for {data.shape[0]} images")
        images.append(data)
        labels += lab
    # The files store each image as 1024 R, then G, then B values, row-major: exactly [3, 32, 32].
    arr = torch.from_numpy(np.concatenate(images)).reshape(-1, 3, 32, 32).contiguous()
    return arr, torch.tensor(labels, dtype=torch.int64)


def load_cifar(name: str, root: str | None, download: bool) -> CifarArrays:
    """Read CIFAR-10/100 from ``root`` (``data.root``; default :func:`default_data_root`).

    The extracted folder (``cifar-10-batches-py`` / ``cifar-100-python``, the python-pickle
    release that torchvision downloads) under the root is read as is, offline. When it is
    missing, torchvision downloads it if ``download`` is true; every failure (no network, disk,
    corrupt file) becomes a one-line :class:`DataError` that names the path and the fix.
    """
    train_names, test_names, meta_name, label_key, names_key = _FILES[name]
    base = Path(root).expanduser() if root else default_data_root()
    folder = base / _FOLDERS[name]
    title = _TITLES[name]
    fix = (
        f"put the extracted {_FOLDERS[name]} folder at {folder}, set data.root to the folder that holds it, "
        f"or use dataset: imagefolder with a local copy"
    )
    if base.exists() and not base.is_dir():
        raise DataError(f"data.root: {str(base)!r} is a file, not a folder; {fix}")
    missing = [n for n in (*train_names, *test_names, meta_name) if not (folder / n).is_file()]
    if missing:
        if not download:
            raise DataError(
                f"data.root: {title} is not at {folder} (missing {', '.join(missing)}) and data.download is false; {fix}"
            )
        from torchvision.datasets import CIFAR10, CIFAR100

        try:
            (CIFAR10 if name == "cifar10" else CIFAR100)(str(base), train=True, download=True)
        except Exception as exc:  # noqa: BLE001 - network and disk failures all get one line
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
            raise DataError(
                f"data.root: {title} is not at {folder} and the download failed ({reason}); {fix}"
            ) from None
    try:
        train_images, train_labels = _read_batches(folder, train_names, label_key)
        test_images, test_labels = _read_batches(folder, test_names, label_key)
        raw_names = _unpickle(folder / meta_name)[names_key]
        class_names = [c.decode("latin1") if isinstance(c, bytes) else str(c) for c in raw_names]  # type: ignore[union-attr]
    except Exception as exc:  # noqa: BLE001 - unreadable pickles get one line
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
        raise DataError(
            f"data.root: {title} at {folder} is unreadable ({reason}); delete it to download again, or {fix}"
        ) from None
    n_classes = len(class_names)
    for lab in (train_labels, test_labels):
        if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= n_classes):
            raise DataError(f"data.root: {title} at {folder} has labels outside 0..{n_classes - 1}; {fix}")
    return CifarArrays(train_images, train_labels, test_images, test_labels, class_names)
