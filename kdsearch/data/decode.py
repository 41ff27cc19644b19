"""Decoding image files to uint8 tensors at the stored size, in parallel, with an on-disk cache.

Decoding is done with Pillow by the worker processes of a :class:`torch.utils.data.DataLoader`
(each worker runs one single-threaded decode at a time). Large JPEGs are decoded in *draft* mode,
which lets libjpeg decode at 1/2, 1/4 or 1/8 scale when the stored size is much smaller (several
times faster for ImageNet-sized photos).

Decoded sets are cached under ``$KDSEARCH_DATA_CACHE`` (default ``~/.cache/kdsearch/data``),
keyed by the files' absolute paths, byte sizes and modification times and the requested size, and
written atomically (temporary file + :func:`os.replace`), so a second load of the same folder
reads one file instead of decoding again, and a crashed write never leaves a half file behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kdsearch.data.resize import resize_square_u8
from kdsearch.data.splits import content_digest
from kdsearch.errors import DataError

__all__ = [
    "DEFAULT_STORED_SIZE",
    "MAX_NATIVE_SIZE",
    "DecodedImages",
    "data_cache_dir",
    "decode_image_file",
    "decode_files",
    "load_decoded",
]

log = logging.getLogger(__name__)

DEFAULT_STORED_SIZE = 64  # px, stored side when the images do not all share one square size
MAX_NATIVE_SIZE = 256  # px, largest native side kept as the stored size when image_size is auto
_CACHE_VERSION = 1


def data_cache_dir() -> Path:
    """Where decoded data sets are cached: ``$KDSEARCH_DATA_CACHE`` or ``~/.cache/kdsearch/data``."""
    env = os.environ.get("KDSEARCH_DATA_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kdsearch" / "data"


def decode_image_file(path: str, size: int | None) -> torch.Tensor:
    """One image file as uint8 ``[3, h, w]`` RGB, at native size if ``size`` is None, else at
    ``size x size`` px (shorter side scaled to ``size``, centre crop). Raises on unreadable files.

    Pillow decodes every format (torchvision's decoders are deprecated since 0.29). A JPEG at
    least twice the stored size is decoded in draft mode: libjpeg scales by 1/2, 1/4 or 1/8 while
    decoding, keeping the shorter side >= ``size``, which is several times faster for photos.
    """
    from PIL import Image

    with Image.open(path) as im:
        if size is not None and im.format == "JPEG" and min(im.size) >= 2 * size:
            im.draft("RGB", (size, size))
        # One copy: HWC (read-only view of Pillow's buffer) -> CHW, writable and contiguous.
        arr = np.ascontiguousarray(np.asarray(im.convert("RGB")).transpose(2, 0, 1))
    img = torch.from_numpy(arr)
    return img if size is None else resize_square_u8(img, size)


class _DecodeDataset(Dataset):
    """Worker-side decoding. ``size`` None with ``native`` set keeps images of exactly
    ``native x native`` px as they are and stores every other image at the default size, flagged."""

    def __init__(self, files: Sequence[str], size: int | None, native: int | None) -> None:
        self.files = list(files)
        self.size = size
        self.native = native

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, bool, str]:
        # numpy, not torch: tensors would each travel through a shared-memory file descriptor,
        # and thousands of tiny images exhaust the descriptor limit; arrays are simply pickled.
        path = self.files[i]
        try:
            if self.size is not None:
                return i, decode_image_file(path, self.size).numpy(), False, ""
            img = decode_image_file(path, None)
            if img.shape[-2:] == (self.native, self.native):
                return i, img.numpy(), False, ""
            return i, resize_square_u8(img, DEFAULT_STORED_SIZE).numpy(), True, ""
        except Exception as exc:  # noqa: BLE001 - reported with the path in the main process
            return i, None, False, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def _collate_list(batch: list) -> list:
    return batch


def _decode_workers(n_files: int) -> int:
    if n_files < 256:
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        cpus = os.cpu_count() or 1
    return max(0, min(8, cpus))


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def _native_candidate(first_file: str) -> int | None:
    """The side of the first image if it is square and small enough to keep, else None."""
    from PIL import Image

    try:
        with Image.open(first_file) as im:
            w, h = im.size
    except Exception:  # noqa: BLE001 - the decode pass reports unreadable files with context
        return None
    return w if w == h and w <= MAX_NATIVE_SIZE else None


def decode_files(files: Sequence[str], size: int | None, what: str = "data.root") -> tuple[torch.Tensor, int]:
    """Decode ``files`` to uint8 ``[N, 3, S, S]`` and return it with the stored side S (px).

    ``size`` None means auto: the native side if every image is the same square size (at most
    :data:`MAX_NATIVE_SIZE` px), else :data:`DEFAULT_STORED_SIZE`. Unreadable files raise
    :class:`DataError` naming the first one. ``what`` names the config field in messages.
    """
    if not files:
        raise DataError(f"{what}: no images to decode; put image files in the class folders")
    native: int | None = None
    if size is None:
        native = _native_candidate(files[0])
        if native is None:
            size = DEFAULT_STORED_SIZE
    workers = _decode_workers(len(files))
    loader = DataLoader(
        _DecodeDataset(files, size, native),
        batch_size=64,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate_list,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
    )
    images: list[torch.Tensor | None] = [None] * len(files)
    flagged = False
    errors: list[tuple[str, str]] = []
    for batch in loader:
        for i, img, resized, err in batch:
            if err:
                errors.append((files[i], err))
                continue
            images[i] = torch.from_numpy(img)
            flagged |= resized
    if errors:
        path, err = errors[0]
        raise DataError(
            f"{what}: cannot decode {len(errors)} image file(s), e.g. {path} ({err}); remove or replace them"
        )
    if size is None:
        if flagged:
            # Not all one size: the ones kept native get the same resize the workers applied.
            images = [resize_square_u8(im, DEFAULT_STORED_SIZE) for im in images]  # type: ignore[arg-type]
            size = DEFAULT_STORED_SIZE
        else:
            size = native
    assert size is not None
    return torch.stack(images), size  # type: ignore[arg-type]


@dataclass
class DecodedImages:
    """A decoded, cached set of files: uint8 ``[N, 3, S, S]``, its side S (px) and its sha256."""

    images: torch.Tensor
    image_size: int
    digest: str
    from_cache: bool


def _cache_key(files: Sequence[str], size: int | None) -> str:
    h = hashlib.sha256(
        f"kdsearch-decode-v{_CACHE_VERSION};size={size if size is not None else 'auto'}".encode()
    )
    for f in files:
        st = os.stat(f)
        h.update(f"\n{os.path.abspath(f)}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _read_cache(path: Path, n_files: int) -> DecodedImages | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        images = blob["images"]
        if blob.get("version") != _CACHE_VERSION or images.dtype != torch.uint8 or images.shape[0] != n_files:
            return None
        return DecodedImages(images, int(blob["image_size"]), str(blob["digest"]), True)
    except Exception as exc:  # noqa: BLE001 - a broken cache file is rebuilt, never fatal
        log.warning("ignoring unreadable decode cache %s (%s)", path, exc)
        return None


def _write_cache(path: Path, decoded: DecodedImages) -> None:
    blob = {
        "version": _CACHE_VERSION,
        "images": decoded.images,
        "image_size": decoded.image_size,
        "digest": decoded.digest,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(blob, fh)
            # mkstemp creates 0600; a shared cache folder should follow the umask like any file.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        # A read-only or full cache folder costs time on the next load, not correctness.
        log.warning(
            "could not write decode cache %s (%s); set KDSEARCH_DATA_CACHE to a writable folder", path, exc
        )


def load_decoded(
    files: Sequence[str], size: int | None, what: str = "data.root", use_cache: bool = True
) -> DecodedImages:
    """:func:`decode_files` through the on-disk cache (see the module docstring)."""
    path = data_cache_dir() / f"decoded-{_cache_key(files, size)[:40]}.pt" if use_cache else None
    if path is not None:
        hit = _read_cache(path, len(files))
        if hit is not None:
            return hit
    images, stored = decode_files(files, size, what)
    decoded = DecodedImages(images, stored, content_digest(images), False)
    if path is not None:
        _write_cache(path, decoded)
    return decoded
