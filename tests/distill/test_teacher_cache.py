"""TeacherCache: build once, load after, key changes, corruption, online equivalence, two processes."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from distill_helpers import build_in_child, perturbed, tiny_bundle, tiny_teacher

from kdsearch.config import TeacherCacheConfig
from kdsearch.data import ViewSpec
from kdsearch.distill import OnlineTeacher, build_or_load_cache, kd_loss, kd_loss_topk
from kdsearch.distill.teacher_cache import DATA_FILE, MANIFEST_FILE


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle(train_size=128)


@pytest.fixture(scope="module")
def teacher(bundle):
    return tiny_teacher(bundle.num_classes, seed=0)


CFG = TeacherCacheConfig(views=3, batch_size=64)


def test_build_then_load_same_content(tmp_path: Path, bundle, teacher) -> None:
    calls: list[tuple[int, int]] = []
    built = build_or_load_cache(
        teacher, bundle, CFG, tmp_path, "cpu", progress=lambda d, t: calls.append((d, t))
    )
    n = len(bundle.train)
    assert built.built and built.rebuild_reason is None
    assert built.views.shape == (3, n, 3) and built.views.dtype == torch.int16
    assert built.logits is not None and built.logits.shape == (3, n, bundle.num_classes)
    assert built.logits.dtype == torch.float16
    assert built.build_forward_count == 3 * -(-n // 64)  # K views x image batches
    assert calls[-1] == (3 * n, 3 * n) and all(a <= b for (a, _), (b, _) in pairwise(calls))
    manifest = json.loads((tmp_path / built.key[:16] / MANIFEST_FILE).read_text())
    assert manifest["key"] == built.key and manifest["teacher"]["label"] == "tinyvit"
    assert manifest["tensors"]["logits"] == {"shape": [3, n, bundle.num_classes], "dtype": "float16"}

    loaded = build_or_load_cache(teacher, bundle, CFG, tmp_path, "cpu")
    assert not loaded.built and loaded.build_forward_count == 0
    assert loaded.build_id == built.build_id
    assert torch.equal(loaded.views, built.views) and torch.equal(loaded.logits, built.logits)
    # Views lie inside the padded image; both flips occur.
    assert int(loaded.views[..., :2].min()) >= 0 and int(loaded.views[..., :2].max()) <= 2 * CFG.crop_padding
    assert set(loaded.views[..., 2].unique().tolist()) == {0, 1}


def test_cached_logits_equal_online_teacher_on_the_stored_views(tmp_path: Path, bundle, teacher) -> None:
    cache = build_or_load_cache(teacher, bundle, CFG, tmp_path, "cpu")
    online = OnlineTeacher(teacher, cache.view_spec)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(bundle.train), generator=g)[:40]
    vid = torch.randint(0, cache.num_views, (40,), generator=g)
    cached = cache.teacher_logits(vid, idx)
    live = online.teacher_logits(cache.views[vid, idx], bundle.train.images[idx])
    assert online.teacher_forward_count == 1 and cache.teacher_forward_count == 0
    assert cached.dtype == live.dtype == torch.float32
    torch.testing.assert_close(cached, live, rtol=2e-3, atol=2e-3)  # fp16 storage
    # A different view gives different logits (the views matter).
    other = online.teacher_logits(cache.views[(vid + 1) % cache.num_views, idx], bundle.train.images[idx])
    assert not torch.allclose(other, live, atol=1e-3)
    student = torch.randn(40, bundle.num_classes, generator=g)
    y = bundle.train.labels[idx]
    assert kd_loss(student, cached, y, 4.0, 0.9).item() == pytest.approx(
        kd_loss(student, live, y, 4.0, 0.9).item(), rel=1e-3
    )


def test_topk_cache_matches_online_teacher(tmp_path: Path, bundle, teacher) -> None:
    c = bundle.num_classes
    for k in (3, c):
        cache = build_or_load_cache(
            teacher, bundle, TeacherCacheConfig(views=2, topk=k, batch_size=64), tmp_path, "cpu"
        )
        assert cache.is_topk and cache.topk_values.shape == (2, len(bundle.train), k)
        assert cache.topk_indices.dtype == torch.int16 and cache.rest_logit.dtype == torch.float32
        idx = torch.arange(32)
        vid = torch.randint(0, 2, (32,))
        live = OnlineTeacher(teacher, cache.view_spec).teacher_logits(
            cache.views[vid, idx], bundle.train.images[idx]
        )
        t = cache.teacher_targets(vid, idx)
        student = torch.randn(32, c)
        y = bundle.train.labels[idx]
        sparse = kd_loss_topk(student, t.values, t.indices, t.rest_logit, y, 1.0, 0.9)
        if k == c:  # no approximation at all: equals the dense loss on the live logits
            assert sparse.item() == pytest.approx(kd_loss(student, live, y, 1.0, 0.9).item(), rel=1e-3)
        # The stored top-k are the live top-k, and the dense reconstruction keeps the softmax mass at T = 1.
        torch.testing.assert_close(t.values, live.topk(k, 1).values, rtol=2e-3, atol=2e-3)
        recon = cache.teacher_logits(vid, idx)
        torch.testing.assert_close(torch.logsumexp(recon, 1), torch.logsumexp(live, 1), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize(
    "change",
    ["weights", "padding", "flip", "views", "topk", "input_size"],
)
def test_key_changes_trigger_a_new_build(tmp_path: Path, bundle, teacher, change: str) -> None:
    base = build_or_load_cache(teacher, bundle, CFG, tmp_path, "cpu")
    t, cfg = teacher, CFG
    if change == "weights":
        t = perturbed(teacher)
    elif change == "padding":
        cfg = TeacherCacheConfig(views=3, batch_size=64, crop_padding=2)
    elif change == "flip":
        cfg = TeacherCacheConfig(views=3, batch_size=64, flip=False)
    elif change == "views":
        cfg = TeacherCacheConfig(views=2, batch_size=64)
    elif change == "topk":
        cfg = TeacherCacheConfig(views=3, batch_size=64, topk=4)
    elif change == "input_size":
        import dataclasses

        t = dataclasses.replace(teacher, input_size=48)  # timm ViT with dynamic size would differ; key only
    other_key = __import__("kdsearch.distill", fromlist=["cache_key"]).cache_key(
        t, bundle, cfg, ViewSpec(bundle.image_size, cfg.crop_padding, cfg.flip)
    )
    assert other_key != base.key
    if change == "input_size":
        return  # the tiny ViT cannot run at 48 px; the key is what matters
    again = build_or_load_cache(t, bundle, cfg, tmp_path, "cpu")
    assert again.built and again.key == other_key
    if change == "flip":
        assert int(again.views[..., 2].max()) == 0
    if change == "padding":
        assert int(again.views[..., :2].max()) <= 4
    # The first cache is untouched and still loads.
    assert not build_or_load_cache(teacher, bundle, CFG, tmp_path, "cpu").built


def test_corrupt_data_file_is_detected_and_rebuilt(tmp_path: Path, bundle, teacher, caplog) -> None:
    first = build_or_load_cache(teacher, bundle, CFG, tmp_path, "cpu")
    data = tmp_path / first.key[:16] / DATA_FILE
    raw = bytearray(data.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 8] = bytes(b ^ 0xFF for b in raw[mid : mid + 8])
    data.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="kdsearch.distill.teacher_cache"):
        again = build_or_load_cache(teacher, bundle, CFG, tmp_path, "cpu")
    assert again.built and "sha256" in (again.rebuild_reason or "")
    assert any("rebuilding" in r.message for r in caplog.records)
    assert again.build_id != first.build_id
    torch.testing.assert_close(again.logits, first.logits)  # deterministic rebuild
    assert not build_or_load_cache(teacher, bundle, CFG, tmp_path, "cpu").built


def test_stale_manifest_is_rebuilt(tmp_path: Path, bundle, teacher) -> None:
    first = build_or_load_cache(teacher, bundle, CFG, tmp_path, "cpu")
    mpath = tmp_path / first.key[:16] / MANIFEST_FILE
    manifest = json.loads(mpath.read_text())
    manifest["key"] = "0" * 64
    mpath.write_text(json.dumps(manifest))
    again = build_or_load_cache(teacher, bundle, CFG, tmp_path, "cpu")
    assert again.built and "key" in (again.rebuild_reason or "")
    (tmp_path / first.key[:16] / DATA_FILE).unlink()
    assert "missing" in (build_or_load_cache(teacher, bundle, CFG, tmp_path, "cpu").rebuild_reason or "")


def test_two_processes_build_once(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=build_in_child, args=(str(tmp_path), barrier, queue, 0.05)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    built = [r[0] for r in results]
    assert sorted(built) == [False, True], results  # exactly one process ran the teacher
    assert results[0][1] == results[1][1]  # both hold the same build
    n = len(tiny_bundle(train_size=96).train)
    assert sum(r[2] for r in results) == 4 * -(-n // 32)  # the teacher batches of ONE build
    assert len(list(tmp_path.glob("*/manifest.json"))) == 1
