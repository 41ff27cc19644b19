"""Image-folder data sets: ``root/train/<class>/*`` plus ``root/test/`` (or ``root/val/``).

``imagefolder`` decodes everything into memory once (cached on disk, see
:mod:`kdsearch.data.decode`). ``imagenet`` uses the same layout (ILSVRC ``train/`` and ``val/``,
both sorted into class folders) but is too large for memory: its training images are a
:class:`StreamingImageFolder`, decoded by DataLoader workers while training, and only the val
share carved from train and the test split are decoded into memory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from kdsearch.data.decode import decode_image_file
from kdsearch.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "FolderListing",
    "StreamingImageFolder",
    "find_split_dirs",
    "list_image_folder",
    "list_train_test",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class FolderListing:
    """The image files of one split folder: absolute paths, int labels, and the class names."""

    def __init__(self, files: list[str], labels: torch.Tensor, class_names: list[str], root: str) -> None:
        self.files = files
        self.labels = labels
        self.class_names = class_names
        self.root = root

    def __len__(self) -> int:
        return len(self.files)

    def digest(self) -> str:
        """sha256 over the relative paths and byte sizes (not the absolute root or mtimes), so a
        copy of the folder on another host has the same identity."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{os.path.relpath(f, self.root)}\t{os.path.getsize(f)}\n".encode())
        return h.hexdigest()


def find_split_dirs(root: str | os.PathLike[str], dataset: str = "imagefolder") -> tuple[Path, Path]:
    """``(root/train, root/test)``, or ``root/val`` when there is no ``test/``; DataError otherwise."""
    r = Path(root).expanduser()
    if not r.is_dir():
        raise DataError(
            f"data.root: folder {str(r)!r} does not exist; point data.root at a folder with train/ and val/ or test/ "
            f"class folders (dataset: {dataset})"
        )
    train = r / "train"
    if not train.is_dir():
        raise DataError(
            f"data.root: {str(r)!r} has no train/ folder; expected train/<class>/<image> and val/ or test/"
        )
    for name in ("test", "val"):
        if (r / name).is_dir():
            return train, r / name
    raise DataError(
        f"data.root: {str(r)!r} has train/ but neither test/ nor val/; add one with the same class folders"
    )


def list_image_folder(split_dir: Path, class_names: Sequence[str] | None = None) -> FolderListing:
    """List ``split_dir/<class>/**/<image>`` (sorted). Classes are the sorted sub-folder names,
    or ``class_names`` when given (then the folders must be exactly those classes)."""
    found = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not found:
        loose = [
            e.name for e in os.scandir(split_dir) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
        ]
        hint = " (its images are not sorted into class folders)" if loose else ""
        raise DataError(
            f"data.root: {str(split_dir)!r} has no class folders{hint}; put images in {split_dir}/<class>/"
        )
    if class_names is not None and list(class_names) != found:
        missing = sorted(set(class_names) - set(found))
        extra = sorted(set(found) - set(class_names))
        raise DataError(
            f"data.root: the classes of {str(split_dir)!r} differ from train/ (missing {missing[:5]}, extra {extra[:5]}); "
            f"use the same class folders in every split"
        )
    names = list(class_names) if class_names is not None else found
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        folder = split_dir / name
        members: list[str] = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames.sort()
            members += [os.path.join(dirpath, f) for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not members:
            raise DataError(
                f"data.root: class folder {str(folder)!r} has no images ({', '.join(IMAGE_EXTENSIONS)}); add images or remove it"
            )
        members.sort()
        files += members
        labels += [label] * len(members)
    return FolderListing(
        [os.path.abspath(f) for f in files],
        torch.tensor(labels, dtype=torch.int64),
        names,
        str(split_dir.parent.resolve()),
    )


def list_train_test(
    root: str | os.PathLike[str], dataset: str = "imagefolder"
) -> tuple[FolderListing, FolderListing]:
    """The train and test listings of ``root``, with matching class folders."""
    train_dir, test_dir = find_split_dirs(root, dataset)
    train = list_image_folder(train_dir)
    test = list_image_folder(test_dir, train.class_names)
    return train, test


class StreamingImageFolder(Dataset):
    """A split that stays on disk: item ``i`` is ``(i, uint8 [3, S, S], label, error)``.

    Used for the ``imagenet`` train (and finetune) split. It has ``labels`` (int64, CPU) and
    ``image_size`` like an :class:`~kdsearch.data.splits.ImageSplit`, but no ``images`` tensor:
    read it through :func:`~kdsearch.data.pipeline.make_batch_source`, which decodes in workers.
    ``error`` is "" or the reason a file could not be decoded (the batch source raises it).
    """

    def __init__(self, files: Sequence[str], labels: torch.Tensor, image_size: int) -> None:
        if len(files) != int(labels.shape[0]):
            raise ValueError("files and labels differ in length")
        self.files = list(files)
        self.labels = labels.to(torch.int64).cpu()
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, int, str]:
        try:
            img = decode_image_file(self.files[i], self.image_size)
            err = ""
        except Exception as exc:  # noqa: BLE001 - reported with the path by the batch source
            img = torch.zeros((3, self.image_size, self.image_size), dtype=torch.uint8)
            err = f"{self.files[i]} ({type(exc).__name__}: {exc})".splitlines()[0][:300]
        return i, img, int(self.labels[i]), err

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def images(self) -> torch.Tensor:
        raise AttributeError(
            "StreamingImageFolder has no in-memory images (imagenet train is streamed); use make_batch_source()"
        )

    def subset(self, indices: torch.Tensor) -> StreamingImageFolder:
        idx = indices.cpu().tolist()
        return StreamingImageFolder([self.files[i] for i in idx], self.labels[indices.cpu()], self.image_size)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> StreamingImageFolder:
        """Streaming data cannot move to a device; returns itself (batches arrive on the device)."""
        return self
