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
