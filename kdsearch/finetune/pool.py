"""The images ``kdsearch finetune`` trains and scores on: a user's data set, pooled.

``--data`` is ``imagefolder:PATH`` (``PATH/<class>/<image>`` or the ``PATH/train`` + ``val|test``
layout; a bare folder path works too), ``digits`` or ``synthetic``. Every image of it becomes one
pool; the holdout is carved from the pool by :func:`kdsearch.finetune.exported.finetune_checkpoint`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from kdsearch.distill.head import in_memory_split
from kdsearch.errors import ConfigError, DataError

__all__ = ["FinetunePool", "parse_data_spec", "load_finetune_pool", "indices_sha256"]


@dataclass
class FinetunePool:
    """Every image of a data set, with its normalisation (0..1 scale) and a description."""

    images: torch.Tensor  # uint8 [N, 3, S, S]
    labels: torch.Tensor  # int64 [N]
    class_names: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str


def indices_sha256(indices: torch.Tensor) -> str:
    """sha256 of sorted int64 little-endian indices: the identity of a holdout."""
    arr = torch.sort(indices.to(torch.int64).cpu())[0].numpy().astype("<i8")
    return hashlib.sha256(arr.tobytes()).hexdigest()


def parse_data_spec(data_spec: str) -> tuple[str, str | None]:
    """``--data`` -> (kind, root): ``("imagefolder", PATH)``, ``("digits", None)`` or ``("synthetic", None)``."""
    spec = (data_spec or "").strip()
    if spec in ("digits", "synthetic"):
        return spec, None
    if spec.startswith("imagefolder:") and spec.removeprefix("imagefolder:").strip():
        return "imagefolder", spec.removeprefix("imagefolder:").strip()
    if spec and Path(spec).expanduser().is_dir():
        return "imagefolder", spec  # a bare folder path is an image folder
    raise ConfigError("--data", "must be imagefolder:PATH, digits or synthetic", data_spec, "e.g. --data imagefolder:my_images/")


def load_finetune_pool(data_spec: str, image_size: int, num_classes: int) -> FinetunePool:
    """Every image of ``data_spec`` as one pool (train, val and test of the data set together).

    Images are stored at ``image_size`` px (the student's resolution); ``num_classes`` sizes a
    synthetic data set.
    """
    from kdsearch.config import DataConfig
    from kdsearch.data import channel_stats, load_data

    kind, root = parse_data_spec(data_spec)
    if kind == "imagefolder" and root is not None and not (Path(root).expanduser() / "train").is_dir():
        from kdsearch.data.decode import decode_files
        from kdsearch.data.imagefolder import list_image_folder

        folder = Path(root).expanduser()
        if not folder.is_dir():
            raise DataError(f"--data: folder {str(folder)!r} does not exist; give imagefolder:PATH with PATH/<class>/<image>")
        listing = list_image_folder(folder)
        images, _size = decode_files(listing.files, image_size, what="--data")
        mean, std = channel_stats(images)
        return FinetunePool(images, listing.labels, list(listing.class_names), mean, std, f"imagefolder {folder}")
    cfg = DataConfig(
        dataset=kind,
        root=root,
        download=False,
        image_size=image_size,
        num_classes=num_classes if kind == "synthetic" else 10,
    )
    bundle = load_data(cfg)
    splits = [s for s in (bundle.train, bundle.val, bundle.finetune, bundle.test) if s is not None]
    for s in splits:
        in_memory_split(s, "data")
    images = torch.cat([s.images.cpu() for s in splits])
    labels = torch.cat([s.labels.cpu() for s in splits])
    desc = f"{kind} {root}" if root else kind
    return FinetunePool(images, labels, list(bundle.class_names), tuple(bundle.mean), tuple(bundle.std), desc)  # type: ignore[arg-type]
