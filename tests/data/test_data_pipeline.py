"""Batch sources: every index once per epoch, images with their labels, residency decisions."""

from __future__ import annotations

import pytest
import torch

from kdsearch.config import DataConfig
from kdsearch.data import ImageSplit, load_data, make_batch_source, should_be_resident
from kdsearch.data.pipeline import HostBatchSource, ResidentBatchSource


def _coded_split(n: int) -> ImageSplit:
    """Image i is filled with i % 256 and labelled i % 7, so a batch can be checked by content."""
    codes = torch.arange(n) % 256
    images = codes.to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    return ImageSplit(images, torch.arange(n) % 7)


@pytest.mark.parametrize("resident", [True, False])
def test_epoch_yields_every_index_once_with_matching_images(resident: bool) -> None:
    split = _coded_split(103)
    source = make_batch_source(split, torch.device("cpu"), resident=resident)
    assert isinstance(source, ResidentBatchSource if resident else HostBatchSource)
    assert source.num_images == 103
    seen: list[int] = []
    sizes: list[int] = []
    for idx, images, labels in source.epoch(
        16, torch.Generator().manual_seed(0), shuffle=True, drop_last=False
    ):
        assert idx.dtype == torch.int64 and images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert torch.equal(labels, idx % 7)
        assert torch.equal(images[:, :, 0, 0], (idx % 256).to(torch.uint8)[:, None].expand(-1, 3))
        seen += idx.tolist()
        sizes.append(len(idx))
    assert sorted(seen) == list(range(103))
    assert seen != list(range(103)), "shuffled"
    assert sizes == [16] * 6 + [7]


def test_epoch_order_is_seeded_and_drop_last_works() -> None:
    source = make_batch_source(_coded_split(50), "cpu", resident=True)
    a = [i.tolist() for i, _, _ in source.epoch(8, torch.Generator().manual_seed(3))]
    b = [i.tolist() for i, _, _ in source.epoch(8, torch.Generator().manual_seed(3))]
    assert a == b and len(a) == 6 and all(len(x) == 8 for x in a)
    in_order = [i.tolist() for i, _, _ in source.epoch(20, torch.Generator(), shuffle=False, drop_last=False)]
    assert in_order[0] == list(range(20)) and len(in_order[-1]) == 10
    # A split smaller than one batch still gives one batch, so a training loop never spins idle.
    tiny = make_batch_source(_coded_split(5), "cpu", resident=False)
    batches = list(tiny.epoch(64, torch.Generator().manual_seed(0), drop_last=True))
    assert len(batches) == 1 and len(batches[0][0]) == 5


def test_should_be_resident_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = load_data(DataConfig(dataset="synthetic", synthetic_train_size=100, synthetic_test_size=20))
    assert should_be_resident(bundle, torch.device("cpu"), "auto") is True
    assert should_be_resident(bundle, torch.device("cpu"), "false") is False
    assert should_be_resident(bundle, torch.device("cpu"), "true") is True
    need = sum(s.nbytes for s in (bundle.train, bundle.val, bundle.test))
    # On CUDA, auto compares the bytes with 40 % of the free memory (faked: no GPU needed).
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(need / 0.41), 10**12))
    assert should_be_resident(bundle, torch.device("cuda", 0), "auto") is False
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(need / 0.39), 10**12))
    assert should_be_resident(bundle, torch.device("cuda", 0), "auto") is True


@pytest.mark.gpu
@pytest.mark.parametrize("resident", [True, False])
def test_cuda_sources_deliver_on_device(resident: bool) -> None:
    split = _coded_split(300)
    source = make_batch_source(split, torch.device("cuda"), resident=resident)
    seen: list[int] = []
    for idx, images, labels in source.epoch(64, torch.Generator().manual_seed(0), drop_last=False):
        assert idx.is_cuda and images.is_cuda and labels.is_cuda
        assert torch.equal(labels, idx % 7)
        assert torch.equal(images[:, 0, 0, 0], (idx % 256).to(torch.uint8))
        seen += idx.tolist()
    assert sorted(seen) == list(range(300))


def test_a_worker_holds_one_host_copy_of_the_train_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 20 item 6: with a CUDA device and host data, the trial's source pins the train split
    once and the bundle keeps that copy; the teacher fit's and the cache build's sources (which call
    make_batch_source on bundle.train) reuse it. pin_memory needs CUDA, so it is emulated here by a
    pageable copy that is_pinned recognises: the copies counted are those the code makes."""
    from kdsearch.data import share_pinned_train

    pinned: set[int] = set()

    def pin_memory(t: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        c = t.clone()
        pinned.add(c.data_ptr())
        return c

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda t, *a, **k: t.data_ptr() in pinned)
    bundle = load_data(DataConfig(dataset="synthetic", synthetic_train_size=64, synthetic_test_size=16))
    cuda = torch.device("cuda")  # only constructed: building a host source makes no CUDA call
    trial = make_batch_source(bundle.train, cuda, resident=False)
    shared = share_pinned_train(bundle, trial)
    fit, cache = (make_batch_source(shared.train, cuda, resident=False) for _ in range(2))
    ptrs = {s.split.images.data_ptr() for s in (trial, fit, cache)} | {shared.train.images.data_ptr()}
    assert len(ptrs) == 1 and len(pinned) == 2  # one pinned copy of images, one of labels
    assert torch.equal(shared.train.images, bundle.train.images)
    # Without sharing (the code before), every source pinned a copy of its own.
    assert make_batch_source(bundle.train, cuda, resident=False).split.images.data_ptr() not in ptrs
    # A CPU worker (or a resident split) pins nothing: the bundle is returned as it was.
    assert share_pinned_train(bundle, make_batch_source(bundle.train, "cpu", resident=False)) is bundle
    assert share_pinned_train(bundle, make_batch_source(bundle.train, "cpu", resident=True)) is bundle
