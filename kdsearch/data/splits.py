"""In-memory splits, the data bundle, seeded stratified splitting and the data fingerprint.

Every data set ends up as a *pool* of training images and a test split. :func:`carve_splits`
turns that into the four splits a study uses:

* ``val``      -- ``data.val_fraction`` of every class of the pool (steers the search),
* ``finetune`` -- ``data.finetune_fraction`` of every class of the pool, disjoint from ``val``
  (fine-tuning after distillation; never seen by KD), or ``None`` when the fraction is 0,
* ``train``    -- the rest of the pool, optionally cut to ``data.max_train_samples``,
* ``test``     -- the given test split, optionally cut to ``data.max_test_samples``.

All cuts are stratified (each class keeps its share, every class with at least two images gets at
least one) and seeded by ``data.seed`` through a CPU :class:`torch.Generator`, whose stream does
not depend on the machine. Indices inside each split are sorted, so a split is a pure function of
(pool labels, fractions, seed).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kdsearch.data.imagefolder import StreamingImageFolder

__all__ = [
    "ImageSplit",
    "DataBundle",
    "SplitIndices",
    "stratified_counts",
    "stratified_split",
    "stratified_subset",
    "carve_splits",
    "content_digest",
    "data_fingerprint",
]


@dataclass
class ImageSplit:
    """Images held in memory as uint8 ``[N, 3, S, S]`` (S = stored side, pixels) with int64 labels.

    The tensors may live on the CPU or on the training device; :meth:`to` moves both.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(
                f"ImageSplit.images must be uint8 [N, 3, H, W], got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"ImageSplit.labels must be int64 [N], got {self.labels.dtype} {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def nbytes(self) -> int:
        """Bytes held by images and labels."""
        return self.images.numel() * self.images.element_size() + self.labels.numel() * 8

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ImageSplit:
        """The same split with both tensors on ``device`` (no copy if already there)."""
        return ImageSplit(
            self.images.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
        )

    def subset(self, indices: torch.Tensor) -> ImageSplit:
        """The images at ``indices`` (int64, any device), in that order."""
        idx = indices.to(self.images.device, torch.int64)
        return ImageSplit(self.images.index_select(0, idx), self.labels.index_select(0, idx))


@dataclass
class DataBundle:
    """Everything a study needs to know about its data. See docs/ARCHITECTURE.md ("data/").

    ``train`` (and ``finetune``) are :class:`ImageSplit` for every data set except ``imagenet``,
    where they are :class:`~kdsearch.data.imagefolder.StreamingImageFolder` (decoded from disk
    by :func:`~kdsearch.data.pipeline.make_batch_source`); ``val`` and ``test`` are always in memory.
    """

    name: str
    train: ImageSplit | StreamingImageFolder
    val: ImageSplit
    test: ImageSplit
    finetune: ImageSplit | StreamingImageFolder | None
    num_classes: int
    class_names: list[str]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fingerprint: str
    info: dict[str, object] = field(default_factory=dict)

    @property
    def streaming(self) -> bool:
        """True when ``train`` is streamed from disk rather than held in memory."""
        return not isinstance(self.train, ImageSplit)

    def to(self, device: torch.device | str) -> DataBundle:
        """The bundle with every in-memory split on ``device`` (streaming splits stay as they are)."""
        from dataclasses import replace

        def move(s: object) -> object:
            return s.to(device) if isinstance(s, ImageSplit) else s

        return replace(
            self,
            train=move(self.train),
            val=move(self.val),
            test=move(self.test),
            finetune=move(self.finetune) if self.finetune is not None else None,
        )


# ----------------------------------------------------------------------------------------------
# Stratified splitting


def stratified_counts(
    class_sizes: Sequence[int], fraction: float | None = None, total: int | None = None
) -> list[int]:
    """How many images to take from each class: ``fraction`` of each class, or ``total`` overall.

    Largest-remainder allocation, so the counts add up to ``round(fraction * N)`` (or ``total``)
    and follow the class proportions; every class with at least two images then gets at least one
    (which can add a few images to a very small total) and keeps at least one image back.
    """
    sizes = [int(s) for s in class_sizes]
    n = sum(sizes)
    if (fraction is None) == (total is None):
        raise ValueError("give exactly one of fraction and total")
    if n == 0:
        return [0 for _ in sizes]
    want = round(fraction * n) if fraction is not None else min(int(total), n)  # type: ignore[arg-type]
    share = want / n
    exact = [s * share for s in sizes]
    counts = [int(e) for e in exact]
    left = want - sum(counts)
    # Ties go to the lower class index: deterministic and independent of dict/hash order.
    order = sorted(range(len(sizes)), key=lambda c: (-(exact[c] - counts[c]), c))
    for c in order[:left]:
        counts[c] += 1
    if want > 0:
        for c, s in enumerate(sizes):
            if s >= 2:
                counts[c] = min(max(counts[c], 1), s - 1)
    return counts


def _class_members(labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Per class, the positions of its images in a seeded random order."""
    labels = labels.cpu()
    order = torch.argsort(labels, stable=True)
    sizes = torch.bincount(labels, minlength=num_classes).tolist()
    out: list[torch.Tensor] = []
    start = 0
    for s in sizes:
        members = order[start : start + s]
        out.append(members[torch.randperm(s, generator=generator)])
        start += s
    return out


def stratified_split(
    labels: torch.Tensor, fractions: Sequence[float], seed: int, num_classes: int | None = None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Carve disjoint stratified shares of ``labels`` (int64 [N]).

    Returns one sorted int64 index tensor per entry of ``fractions`` (each takes that fraction of
    every class, computed on the full class size) and the sorted indices of what is left.
    """
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.numel() else 0
    gen = torch.Generator().manual_seed(int(seed))
    members = _class_members(labels, num_classes, gen)
    sizes = [len(m) for m in members]
    per_share = [stratified_counts(sizes, fraction=f) if f > 0 else [0] * len(sizes) for f in fractions]
    taken: list[list[torch.Tensor]] = [[] for _ in fractions]
    rest: list[torch.Tensor] = []
    for c, m in enumerate(members):
        start = 0
        for k, counts in enumerate(per_share):
            # Later shares never take the last image of a class: the rest keeps at least one.
            n = max(0, min(counts[c], len(m) - start - 1)) if len(m) >= 2 else 0
            taken[k].append(m[start : start + n])
            start += n
        rest.append(m[start:])
    cat = lambda parts: torch.sort(torch.cat(parts))[0] if parts else torch.empty(0, dtype=torch.int64)  # noqa: E731
    return [cat(t) for t in taken], cat(rest)


def stratified_subset(
    labels: torch.Tensor, total: int, seed: int, num_classes: int | None = None
) -> torch.Tensor:
    """Sorted indices of a seeded stratified subset of ``total`` images (all of them if fewer)."""
    n = int(labels.shape[0])
    if total >= n:
        return torch.arange(n, dtype=torch.int64)
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    gen = torch.Generator().manual_seed(int(seed))
    members = _class_members(labels, num_classes, gen)
    counts = stratified_counts([len(m) for m in members], total=total)
    return torch.sort(torch.cat([m[:k] for m, k in zip(members, counts, strict=True)]))[0]


@dataclass(frozen=True)
class SplitIndices:
    """Positions of each split in its source: train/val/finetune index the pool, test the test set."""

    train: torch.Tensor
    val: torch.Tensor
    finetune: torch.Tensor | None
    test: torch.Tensor


# Sub-seeds so that changing one cut never reshuffles another.
_SUBSET_SEED_TRAIN = 1_000_003
_SUBSET_SEED_TEST = 2_000_003


def carve_splits(
    pool_labels: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    *,
    val_fraction: float,
    finetune_fraction: float,
    seed: int,
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
) -> SplitIndices:
    """Index the val, finetune, train and test splits (see the module docstring)."""
    fractions = [val_fraction] + ([finetune_fraction] if finetune_fraction > 0 else [])
    shares, train = stratified_split(pool_labels, fractions, seed, num_classes)
    val = shares[0]
    finetune = shares[1] if finetune_fraction > 0 else None
    if max_train_samples is not None and max_train_samples < len(train):
        keep = stratified_subset(
            pool_labels[train], max_train_samples, seed + _SUBSET_SEED_TRAIN, num_classes
        )
        train = train[keep]
    test = torch.arange(int(test_labels.shape[0]), dtype=torch.int64)
    if max_test_samples is not None and max_test_samples < len(test):
        test = stratified_subset(test_labels, max_test_samples, seed + _SUBSET_SEED_TEST, num_classes)
    return SplitIndices(train=train, val=val, finetune=finetune, test=test)


# ----------------------------------------------------------------------------------------------
# Fingerprint


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().cpu().contiguous().numpy()).cast("B")


def content_digest(*tensors: torch.Tensor) -> str:
    """sha256 hex over the dtype, shape and bytes of each tensor (about 2 GB/s on one core).

    Used as the data set's identity in :func:`data_fingerprint`: it names the pixels, not the
    folder they came from, so the same data on two hosts with different paths gets one key.
    """
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def data_fingerprint(
    name: str,
    source_id: str,
    image_size: int,
    indices: SplitIndices | Mapping[str, torch.Tensor | None],
    labels: torch.Tensor,
    test_labels: torch.Tensor | None = None,
) -> str:
    """sha256 hex over (data set name, source identity, stored side in px, split indices, labels).

    ``source_id`` identifies the pool and test images (a :func:`content_digest`, or for streamed
    data a digest of the file listing); ``labels`` are the pool labels and ``test_labels`` those of
    the test set. Any change of seed, fractions or caps changes the split indices and so the
    fingerprint.
    """
    if isinstance(indices, SplitIndices):
        parts = {
            "train": indices.train,
            "val": indices.val,
            "finetune": indices.finetune,
            "test": indices.test,
        }
    else:
        parts = dict(indices)
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {"name": name, "source": source_id, "image_size": int(image_size)}, sort_keys=True
        ).encode()
    )
    named: list[tuple[str, torch.Tensor | None]] = sorted(parts.items())
    named += [("labels", labels), ("test_labels", test_labels)]
    for key, t in named:
        # Length-prefixed, so no two different inputs can concatenate to the same bytes.
        h.update(f"|{key}:{-1 if t is None else t.numel()}|".encode())
        if t is not None:
            h.update(_tensor_bytes(t.to(torch.int64)))
    return h.hexdigest()
