"""Image-folder trees: decoding, the on-disk decode cache, layout errors, and imagenet streaming."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import kdsearch.data.decode as decode_mod
from kdsearch.config import DataConfig
from kdsearch.data import ImageSplit, StreamingImageFolder, load_data, make_batch_source, should_be_resident
from kdsearch.data.decode import DEFAULT_STORED_SIZE, decode_files
from kdsearch.data.pipeline import StreamingBatchSource
from kdsearch.errors import DataError

from data_helpers import CLASS_COLOURS, MakeTree, write_png


def _folder(root: Path, **kw: object) -> DataConfig:
    return DataConfig(dataset="imagefolder", root=str(root), **kw)  # type: ignore[arg-type]


def _forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(decode_mod, "decode_files", boom)


def test_imagefolder_decodes_pixels_labels_and_native_size(make_tree: MakeTree) -> None:
    root = make_tree(splits={"train": 8, "test": 3})
    b = load_data(_folder(root, val_fraction=0.25))
    assert b.class_names == ["ant", "bee", "cat"] and b.num_classes == 3
    assert b.image_size == 12, "all images 12x12 -> stored at the native size"
    assert len(b.train) == 18 and len(b.val) == 6 and len(b.test) == 9
    assert b.info["from_cache"] is False
    # PNG is lossless: the green and blue channels are exactly the class colour.
    for split in (b.train, b.val, b.test):
        for img, label in zip(split.images, split.labels, strict=True):
            colour = CLASS_COLOURS[b.class_names[int(label)]]
            assert int(img[1].unique().item()) == colour[1] and int(img[2].unique().item()) == colour[2]
    # Mean/std come from the train split.
    assert b.mean[1] == pytest.approx(float(b.train.images[:, 1].double().mean() / 255), abs=1e-9)


def test_decode_cache_is_reused_and_invalidated(
    make_tree: MakeTree, monkeypatch: pytest.MonkeyPatch, private_data_cache: Path
) -> None:
    root = make_tree()
    first = load_data(_folder(root))
    assert any(private_data_cache.glob("decoded-*.pt")), "the first load writes the cache"
    assert not list(private_data_cache.glob("*.tmp")), "no temporary file is left behind"
    with monkeypatch.context() as m:
        _forbid_decoding(m)
        second = load_data(_folder(root))
    assert second.info["from_cache"] is True
    assert torch.equal(first.train.images, second.train.images) and first.fingerprint == second.fingerprint
    # Rewriting one file (new size/mtime) changes the key: that split is decoded again.
    target = root / "test" / "bee" / "0000.png"
    write_png(target, (1, 2, 3), (12, 12), seed=99)
    os.utime(target, ns=(1, 1))
    calls: list[int] = []
    real = decode_mod.decode_files

    def counting(files: list[str], size: int | None, what: str = "data.root") -> tuple[torch.Tensor, int]:
        calls.append(len(files))
        return real(files, size, what)

    monkeypatch.setattr(decode_mod, "decode_files", counting)
    third = load_data(_folder(root))
    assert calls == [9], "only the changed test split is decoded again"
    assert third.fingerprint != first.fingerprint


def test_mismatched_classes_are_a_data_error(make_tree: MakeTree) -> None:
    root = make_tree(test_classes=["ant", "bee", "dog"])
    with pytest.raises(
        DataError,
        match=r"data\.root: the classes of .*test.* differ from train/ \(missing \['cat'\], extra \['dog'\]\)",
    ):
        load_data(_folder(root))


def test_layout_errors_name_the_path(tmp_path: Path, make_tree: MakeTree) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_data(_folder(tmp_path / "missing"))
    root = make_tree(name="no-test", splits={"train": 2})
    with pytest.raises(DataError, match="neither test/ nor val/"):
        load_data(_folder(root))
    (root / "test").mkdir()
    write_png(root / "test" / "loose.png", (0, 0, 0), (12, 12), 0)
    with pytest.raises(DataError, match="not sorted into class folders"):
        load_data(_folder(root))


def test_val_folder_stands_in_for_test_and_sizes_are_unified(make_tree: MakeTree) -> None:
    root = make_tree(splits={"train": 4, "val": 2}, sizes=((12, 12), (20, 14)))
    b = load_data(_folder(root, val_fraction=0.25))
    assert len(b.test) == 6
    assert b.image_size == DEFAULT_STORED_SIZE, "mixed sizes -> the default stored size"
    assert b.train.images.shape[1:] == (3, DEFAULT_STORED_SIZE, DEFAULT_STORED_SIZE)
    small = load_data(_folder(root, image_size=8))
    assert small.image_size == 8 and small.test.images.shape[1:] == (3, 8, 8)


def test_unreadable_image_is_named(make_tree: MakeTree) -> None:
    root = make_tree()
    bad = root / "train" / "cat" / "0001.png"
    bad.write_bytes(b"this is no image")
    with pytest.raises(DataError, match=r"cannot decode 1 image file\(s\), e\.g\. .*0001\.png"):
        load_data(_folder(root))


def test_parallel_decode_keeps_file_order(tmp_path: Path) -> None:
    # >= 256 files takes the worker-process path; each file has its own colour to check order.
    files = []
    for i in range(260):
        p = tmp_path / "many" / f"{i:04d}.png"
        write_png(p, (i % 256, (i * 7) % 256, 5), (6, 6), i)
        files.append(str(p))
    images, size = decode_files(files, None)
    assert size == 6 and images.shape == (260, 3, 6, 6)
    assert images[:, 1, 0, 0].tolist() == [(i * 7) % 256 for i in range(260)]


def test_imagenet_streams_train_and_holds_val_test(make_tree: MakeTree) -> None:
    root = make_tree(name="ilsvrc", splits={"train": 10, "val": 2}, sizes=((24, 24),))
    b = load_data(
        DataConfig(dataset="imagenet", root=str(root), image_size=16, val_fraction=0.2, finetune_fraction=0.1)
    )
    assert isinstance(b.train, StreamingImageFolder) and isinstance(b.finetune, StreamingImageFolder)
    assert isinstance(b.val, ImageSplit) and isinstance(b.test, ImageSplit)
    assert (
        b.streaming and b.image_size == 16 and len(b.val) == 6 and len(b.test) == 6 and len(b.finetune) == 3
    )
    assert len(b.train) == 21
    assert not should_be_resident(b, torch.device("cpu"), "auto")
    with pytest.raises(DataError, match="device_resident"):
        should_be_resident(b, torch.device("cpu"), "true")
    source = make_batch_source(b.train, torch.device("cpu"), resident=True, num_workers=0)
    assert isinstance(source, StreamingBatchSource)
    seen = []
    for idx, images, labels in source.epoch(8, torch.Generator().manual_seed(0), drop_last=False):
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 16, 16)
        assert torch.equal(labels, b.train.labels[idx])
        for i, img in zip(idx.tolist(), images, strict=True):
            colour = CLASS_COLOURS[b.class_names[int(b.train.labels[i])]]
            assert int(img[2, 8, 8]) == colour[2]
        seen += idx.tolist()
    assert sorted(seen) == list(range(len(b.train)))
    # moving a streaming bundle leaves train on disk and moves val/test
    moved = b.to("cpu")
    assert moved.train is b.train
