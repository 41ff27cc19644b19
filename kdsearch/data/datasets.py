"""``load_data``: one entry point from a :class:`~kdsearch.config.DataConfig` to a :class:`DataBundle`.

Stored sizes when ``data.image_size`` is unset: 32 px for CIFAR and digits (upsampled from 8),
32 px for synthetic, the native side for imagefolder when every image has the same square size
(else 64), and 64 px for imagenet. Normalisation: the published CIFAR statistics, the ImageNet
statistics for imagenet (its train split is never in memory), and for every other data set the
exact per-channel mean and standard deviation of the train split (integer sums, so deterministic).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field

import torch

from kdsearch.config import DataConfig
from kdsearch.data.cifar import CIFAR_STATS, load_cifar
from kdsearch.data.decode import load_decoded
from kdsearch.data.digits import DIGITS_TEST_FRACTION, DIGITS_TEST_SEED, load_digits_arrays
from kdsearch.data.imagefolder import StreamingImageFolder, list_train_test
from kdsearch.data.resize import resize_square_u8
from kdsearch.data.splits import (
    DataBundle,
    ImageSplit,
    SplitIndices,
    carve_splits,
    content_digest,
    data_fingerprint,
    stratified_split,
)
from kdsearch.data.synthetic import make_synthetic

__all__ = ["IMAGENET_STATS", "channel_stats", "load_data"]

log = logging.getLogger(__name__)

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_DEFAULT_SIZE = {"cifar10": 32, "cifar100": 32, "digits": 32, "synthetic": 32, "imagenet": 64}
_STATS_CHUNK = 8192  # images per step when summing pixels


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and (population) standard deviation of uint8 ``[N, 3, H, W]``, 0..1 scale.

    Sums are exact int64, so the result does not depend on chunking, device or thread count.
    """
    # A histogram of the 256 levels per channel gives exact sums without int64 copies of the data.
    hist = torch.zeros((3, 256), dtype=torch.int64)
    for start in range(0, images.shape[0], _STATS_CHUNK):
        x = images[start : start + _STATS_CHUNK]
        for ch in range(3):
            hist[ch] += torch.bincount(x[:, ch].reshape(-1), minlength=256).cpu()
    levels = torch.arange(256, dtype=torch.int64)
    s = (hist * levels).sum(dim=1)
    sq = (hist * levels * levels).sum(dim=1)
    n = images.shape[0] * images.shape[2] * images.shape[3]
    if n == 0:
        return (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    mean = [int(v) / n for v in s]
    var = [max(int(q) / n - m * m, 0.0) for q, m in zip(sq, mean, strict=True)]
    # A constant channel would divide by zero when normalising; 1/255 keeps it finite.
    std = [max(math.sqrt(v), 1.0) / 255.0 for v in var]
    return (mean[0] / 255.0, mean[1] / 255.0, mean[2] / 255.0), (std[0], std[1], std[2])


@dataclass
class _Pool:
    """A data set before splitting: the training pool and the test set, at the stored size."""

    images: torch.Tensor
    labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str]
    image_size: int
    source_id: str
    stats: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None
    info: dict[str, object] = field(default_factory=dict)


def _resize_all(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return torch.cat([resize_square_u8(images[i : i + 4096], size) for i in range(0, images.shape[0], 4096)])


def _pool_cifar(cfg: DataConfig) -> _Pool:
    arr = load_cifar(cfg.dataset, cfg.root, cfg.download)
    size = cfg.image_size or 32
    x_train, x_test = _resize_all(arr.train_images, size), _resize_all(arr.test_images, size)
    return _Pool(
        x_train,
        arr.train_labels,
        x_test,
        arr.test_labels,
        arr.class_names,
        size,
        content_digest(x_train, arr.train_labels, x_test, arr.test_labels),
        CIFAR_STATS[cfg.dataset],
    )


def _pool_digits(cfg: DataConfig) -> _Pool:
    size = cfg.image_size or 32
    images, labels = load_digits_arrays(size)
    (test_idx,), pool_idx = stratified_split(labels, [DIGITS_TEST_FRACTION], DIGITS_TEST_SEED, 10)
    x, y = images[pool_idx], labels[pool_idx]
    xt, yt = images[test_idx], labels[test_idx]
    return _Pool(x, y, xt, yt, [str(d) for d in range(10)], size, content_digest(x, y, xt, yt))


def _pool_synthetic(cfg: DataConfig) -> _Pool:
    size = cfg.image_size or 32
    x, y, xt, yt = make_synthetic(
        cfg.num_classes, cfg.synthetic_train_size, cfg.synthetic_test_size, size, cfg.seed
    )
    names = [f"class_{c}" for c in range(cfg.num_classes)]
    return _Pool(x, y, xt, yt, names, size, content_digest(x, y, xt, yt))


def _pool_imagefolder(cfg: DataConfig) -> _Pool:
    assert cfg.root is not None  # DataConfig requires it
    t0 = time.perf_counter()
    train_l, test_l = list_train_test(cfg.root, "imagefolder")
    train = load_decoded(train_l.files, cfg.image_size)
    # The test split is stored at the train split's size, whatever its own native size.
    test = load_decoded(test_l.files, train.image_size)
    info = {
        "decode_s": round(time.perf_counter() - t0, 3),
        "from_cache": train.from_cache and test.from_cache,
    }
    log.info(
        "imagefolder %s: %d + %d images at %d px in %.1f s",
        cfg.root,
        len(train_l),
        len(test_l),
        train.image_size,
        info["decode_s"],
    )
    source = hashlib.sha256(f"{train.digest}{test.digest}".encode()).hexdigest()
    return _Pool(
        train.images,
        train_l.labels,
        test.images,
        test_l.labels,
        train_l.class_names,
        train.image_size,
        source,
        None,
        info,
    )


def _carve(cfg: DataConfig, train_labels: torch.Tensor, test_labels: torch.Tensor, num_classes: int) -> SplitIndices:
    """The seeded, stratified split indices that ``cfg`` asks for (val, finetune, caps)."""
    return carve_splits(
        train_labels,
        test_labels,
        num_classes,
        val_fraction=cfg.val_fraction,
        finetune_fraction=cfg.finetune_fraction,
        seed=cfg.seed,
        max_train_samples=cfg.max_train_samples,
        max_test_samples=cfg.max_test_samples,
    )


def _bundle_from_pool(cfg: DataConfig, pool: _Pool) -> DataBundle:
    num_classes = len(pool.class_names)
    idx = _carve(cfg, pool.labels, pool.test_labels, num_classes)
    full = ImageSplit(pool.images, pool.labels)
    train = full.subset(idx.train)
    val = full.subset(idx.val)
    finetune = full.subset(idx.finetune) if idx.finetune is not None else None
    test = ImageSplit(pool.test_images, pool.test_labels).subset(idx.test)
    mean, std = pool.stats if pool.stats is not None else channel_stats(train.images)
    info = dict(pool.info)
    info.update(
        {
            "sizes": {
                "train": len(train),
                "val": len(val),
                "test": len(test),
                "finetune": len(finetune) if finetune else 0,
            }
        }
    )
    return DataBundle(
        name=cfg.dataset,
        train=train,
        val=val,
        test=test,
        finetune=finetune,
        num_classes=num_classes,
        class_names=list(pool.class_names),
        image_size=pool.image_size,
        mean=mean,
        std=std,
        fingerprint=data_fingerprint(
            cfg.dataset, pool.source_id, pool.image_size, idx, pool.labels, pool.test_labels
        ),
        info=info,
    )


def _load_imagenet(cfg: DataConfig) -> DataBundle:
    """ILSVRC layout. Train (and finetune) stream from disk; val (carved from train) and test
    (``val/`` or ``test/``, capped by ``data.max_test_samples``) are decoded into memory."""
    assert cfg.root is not None
    size = cfg.image_size or _DEFAULT_SIZE["imagenet"]
    train_l, test_l = list_train_test(cfg.root, "imagenet")
    num_classes = len(train_l.class_names)
    idx = _carve(cfg, train_l.labels, test_l.labels, num_classes)

    def files(listing_files: list[str], ix: torch.Tensor) -> list[str]:
        return [listing_files[i] for i in ix.tolist()]

    t0 = time.perf_counter()
    val_dec = load_decoded(files(train_l.files, idx.val), size)
    test_dec = load_decoded(files(test_l.files, idx.test), size)
    val = ImageSplit(val_dec.images, train_l.labels[idx.val])
    test = ImageSplit(test_dec.images, test_l.labels[idx.test])
    train = StreamingImageFolder(files(train_l.files, idx.train), train_l.labels[idx.train], size)
    finetune = (
        StreamingImageFolder(files(train_l.files, idx.finetune), train_l.labels[idx.finetune], size)
        if idx.finetune is not None
        else None
    )
    source = hashlib.sha256(f"{train_l.digest()}{test_l.digest()}".encode()).hexdigest()
    info: dict[str, object] = {
        "decode_s": round(time.perf_counter() - t0, 3),
        "from_cache": val_dec.from_cache and test_dec.from_cache,
        "streaming": True,
        "sizes": {
            "train": len(train),
            "val": len(val),
            "test": len(test),
            "finetune": len(finetune) if finetune else 0,
        },
    }
    mean, std = IMAGENET_STATS
    return DataBundle(
        name=cfg.dataset,
        train=train,
        val=val,
        test=test,
        finetune=finetune,
        num_classes=num_classes,
        class_names=train_l.class_names,
        image_size=size,
        mean=mean,
        std=std,
        fingerprint=data_fingerprint(cfg.dataset, source, size, idx, train_l.labels, test_l.labels),
        info=info,
    )


def load_data(cfg: DataConfig) -> DataBundle:
    """Load ``cfg.dataset`` into a :class:`DataBundle` (splits on the CPU; move with ``.to``).

    Raises :class:`~kdsearch.errors.DataError` (one line: what, where, the fix) for anything a
    user can fix: a missing or unreadable folder, an offline download, mismatched class folders.
    """
    name = cfg.dataset
    if name == "imagenet":
        return _load_imagenet(cfg)
    if name in ("cifar10", "cifar100"):
        pool = _pool_cifar(cfg)
    elif name == "imagefolder":
        pool = _pool_imagefolder(cfg)
    elif name == "digits":
        pool = _pool_digits(cfg)
    elif name == "synthetic":
        pool = _pool_synthetic(cfg)
    else:  # pragma: no cover - DataConfig validates the name
        raise ValueError(f"unknown dataset {name!r}")
    return _bundle_from_pool(cfg, pool)
