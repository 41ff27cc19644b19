"""Batches for training: from tensors already on the device, from pinned host memory, or streamed.

Every source yields ``(idx, images, labels)`` with all three on the training device: ``idx``
int64 positions in the split (the teacher cache is indexed by them), ``images`` uint8
``[B, 3, S, S]`` (augmentation happens later, on the device), ``labels`` int64 ``[B]``.

* :class:`ResidentBatchSource`  -- the split lives on the device; a batch is one ``index_select``:
  no DataLoader, no host-to-device copy per step (the airbench approach).
* :class:`HostBatchSource`      -- the split stays in host memory (pinned on CUDA); each batch is
  gathered into one of two pinned buffers and copied with ``non_blocking=True``. A worker pins
  its train split once (:func:`share_pinned_train`): one host copy, shared by every source.
* :class:`StreamingBatchSource` -- a :class:`StreamingImageFolder` (imagenet) decoded by
  DataLoader workers, pinned, then copied.

The order of an epoch comes from ``torch.randperm`` on the caller's generator only, so two sources
over the same split with the same generator state yield the same indices.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import torch
from torch.utils.data import DataLoader

from kdsearch.data.imagefolder import StreamingImageFolder
from kdsearch.data.splits import DataBundle, ImageSplit
from kdsearch.errors import DataError

__all__ = [
    "Batch",
    "BatchSource",
    "ResidentBatchSource",
    "HostBatchSource",
    "StreamingBatchSource",
    "make_batch_source",
    "share_pinned_train",
    "should_be_resident",
    "RESIDENT_FREE_MEMORY_SHARE",
]

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

# "auto" keeps the data on the GPU when its uint8 bytes use less than this share of free memory.
RESIDENT_FREE_MEMORY_SHARE = 0.4


class BatchSource:
    """Base class: ``num_images`` and ``epoch(...)``; see the module docstring."""

    num_images: int
    device: torch.device

    def epoch(
        self, batch_size: int, generator: torch.Generator, shuffle: bool = True, drop_last: bool = True
    ) -> Iterator[Batch]:
        """One pass over the split in batches of ``batch_size`` images.

        ``shuffle`` orders it by ``torch.randperm(num_images, generator=generator)``, else in
        index order. ``drop_last`` drops a final partial batch, except when the split is smaller
        than one batch: then the single partial batch is kept, so an epoch is never empty.
        """
        raise NotImplementedError

    def _order(self, generator: torch.Generator, shuffle: bool) -> torch.Tensor:
        n = self.num_images
        if shuffle:
            return torch.randperm(n, generator=generator, device=generator.device)
        return torch.arange(n, device=generator.device)

    def _bounds(self, batch_size: int, drop_last: bool) -> list[tuple[int, int]]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = self.num_images
        stops = list(range(0, n, batch_size))
        bounds = [(s, min(s + batch_size, n)) for s in stops]
        if drop_last and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < batch_size:
            bounds.pop()
        return bounds


class ResidentBatchSource(BatchSource):
    """Batches sliced from a split that already lives on ``device``."""

    def __init__(self, split: ImageSplit, device: torch.device) -> None:
        self.device = torch.device(device)
        self.split = split.to(self.device)
        self.num_images = len(split)

    def epoch(
        self, batch_size: int, generator: torch.Generator, shuffle: bool = True, drop_last: bool = True
    ) -> Iterator[Batch]:
        order = self._order(generator, shuffle).to(self.device)
        images, labels = self.split.images, self.split.labels
        for start, stop in self._bounds(batch_size, drop_last):
            idx = order[start:stop]
            yield idx, images.index_select(0, idx), labels.index_select(0, idx)


class HostBatchSource(BatchSource):
    """Batches gathered from host memory and copied to ``device`` (pinned + non-blocking on CUDA)."""

    def __init__(self, split: ImageSplit, device: torch.device) -> None:
        self.device = torch.device(device)
        self.num_images = len(split)
        host = split.to("cpu")
        self._cuda = self.device.type == "cuda"
        if self._cuda:  # a split pinned already (the worker's one copy, see share_pinned_train) is reused
            host = ImageSplit(_pinned(host.images), _pinned(host.labels))
        self.split = host

    def epoch(
        self, batch_size: int, generator: torch.Generator, shuffle: bool = True, drop_last: bool = True
    ) -> Iterator[Batch]:
        order = self._order(generator, shuffle).cpu()
        images, labels = self.split.images, self.split.labels
        bounds = self._bounds(batch_size, drop_last)
        if not self._cuda:
            for start, stop in bounds:
                idx = order[start:stop]
                yield idx, images.index_select(0, idx), labels.index_select(0, idx)
            return
        # Two pinned staging buffers: gather batch k+1 on the host while batch k is in flight;
        # an event per buffer says when its copy has finished and it may be overwritten.
        b = max(stop - start for start, stop in bounds) if bounds else 0
        bufs = [
            (
                torch.empty((b, *images.shape[1:]), dtype=torch.uint8).pin_memory(),
                torch.empty((b,), dtype=torch.int64).pin_memory(),
                torch.empty((b,), dtype=torch.int64).pin_memory(),
            )
            for _ in range(2)
        ]
        events: list[torch.cuda.Event | None] = [None, None]
        for k, (start, stop) in enumerate(bounds):
            slot = k % 2
            if events[slot] is not None:
                events[slot].synchronize()  # type: ignore[union-attr]
            n = stop - start
            img_buf, lab_buf, idx_buf = (t[:n] for t in bufs[slot])
            idx = order[start:stop]
            idx_buf.copy_(idx)
            torch.index_select(images, 0, idx, out=img_buf)
            torch.index_select(labels, 0, idx, out=lab_buf)
            out = (
                idx_buf.to(self.device, non_blocking=True),
                img_buf.to(self.device, non_blocking=True),
                lab_buf.to(self.device, non_blocking=True),
            )
            ev = torch.cuda.Event()
            ev.record()
            events[slot] = ev
            yield out


class StreamingBatchSource(BatchSource):
    """Batches decoded from disk by ``num_workers`` DataLoader workers (a new pool per epoch)."""

    def __init__(self, dataset: StreamingImageFolder, device: torch.device, num_workers: int = 2) -> None:
        self.device = torch.device(device)
        self.dataset = dataset
        self.num_images = len(dataset)
        self.num_workers = int(num_workers)

    def epoch(
        self, batch_size: int, generator: torch.Generator, shuffle: bool = True, drop_last: bool = True
    ) -> Iterator[Batch]:
        order = self._order(generator, shuffle).cpu()
        batches = [order[s:e].tolist() for s, e in self._bounds(batch_size, drop_last)]
        loader = DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if self.num_workers > 0 else None,
        )
        for idx, images, labels, errors in loader:
            bad = [e for e in errors if e]
            if bad:
                raise DataError(
                    f"data.root: cannot decode {len(bad)} image file(s), e.g. {bad[0]}; remove or replace them"
                )
            yield (
                idx.to(self.device, non_blocking=True),
                images.to(self.device, non_blocking=True),
                labels.to(self.device, non_blocking=True),
            )


def _pinned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is in pinned memory already, else a pinned copy."""
    return t if t.is_pinned() else t.pin_memory()


def share_pinned_train(bundle: DataBundle, source: BatchSource) -> DataBundle:
    """The bundle with its train split replaced by ``source``'s pinned host copy, so the worker
    holds **one** host copy of the train split when it is not device-resident: the pageable
    original is dropped, and every later source over it (the teacher fit, the cache build) reuses
    the pinned tensors instead of pinning a copy of its own. Pinned memory is kept by CUDA's
    host allocator for the life of the process, so pinning once matters. The bundle unchanged
    for any other source (resident, streamed, or a CPU worker, which pins nothing)."""
    if not isinstance(source, HostBatchSource) or not source._cuda:
        return bundle
    return replace(bundle, train=source.split)


def make_batch_source(
    split: ImageSplit | StreamingImageFolder, device: torch.device | str, resident: bool, num_workers: int = 2
) -> BatchSource:
    """The right :class:`BatchSource` for ``split``: streamed (``StreamingImageFolder``, whatever
    ``resident`` says), resident on ``device``, or copied from host memory per batch."""
    dev = torch.device(device)
    if isinstance(split, StreamingImageFolder):
        return StreamingBatchSource(split, dev, num_workers)
    if resident:
        return ResidentBatchSource(split, dev)
    return HostBatchSource(split, dev)


def _split_bytes(split: object) -> int:
    return split.nbytes if isinstance(split, ImageSplit) else 0


def should_be_resident(bundle: DataBundle, device: torch.device | str, setting: str) -> bool:
    """Whether to keep the data on ``device`` (``data.device_resident``: auto | true | false).

    ``auto``: always on the CPU (the data is in RAM already); on CUDA when the uint8 train, val,
    test and finetune bytes are below :data:`RESIDENT_FREE_MEMORY_SHARE` of the free device
    memory; never for streamed (imagenet) data.
    """
    dev = torch.device(device)
    if setting not in ("auto", "true", "false"):
        raise DataError(f"data.device_resident: must be auto, true or false (got {setting!r})")
    if setting == "false":
        return False
    if bundle.streaming:
        if setting == "true":
            raise DataError(
                f"data.device_resident: true is impossible for {bundle.name!r}, whose train split is streamed "
                "from disk; set it to auto or false"
            )
        return False
    if setting == "true":
        return True
    if dev.type != "cuda":
        return True
    free_bytes, _total = torch.cuda.mem_get_info(dev)
    need = sum(_split_bytes(s) for s in (bundle.train, bundle.val, bundle.test, bundle.finetune))
    return need < RESIDENT_FREE_MEMORY_SHARE * free_bytes
