"""TeacherCache: build once, load after, key changes, corruption, online equivalence, two processes."""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing as mp
from itertools import pairwise
from pathlib import Path

import pytest
import torch

from kdsearch.config import TeacherCacheConfig, load_config
from kdsearch.data import ViewSpec
from kdsearch.distill import OnlineTeacher, build_or_load_cache, cache_key, kd_loss, kd_loss_topk
from kdsearch.distill.cache_size import (
    check_caches_fit,
    choose_placement,
    estimate_cache_size,
    host_available_bytes,
)
from kdsearch.distill.teacher_cache import DATA_FILE, MANIFEST_FILE
from kdsearch.errors import ConfigError

from distill_helpers import build_in_child, perturbed, tiny_bundle, tiny_teacher


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
    ["weights", "padding", "flip", "views", "topk", "input_size", "mean", "std", "interpolation"],
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
        t = dataclasses.replace(teacher, input_size=48)  # timm ViT with dynamic size would differ; key only
    elif change == "mean":
        t = dataclasses.replace(teacher, mean=(0.1, 0.2, 0.3))
    elif change == "std":
        t = dataclasses.replace(teacher, std=(0.1, 0.2, 0.3))
    elif change == "interpolation":
        t = dataclasses.replace(teacher, interpolation="bicubic")
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


# ----------------------------------------------------------------------------------------------
# Size, top-k default, placement, refusal

IMAGENET_TRAIN = 1_281_167


def test_imagenet_defaults_estimate_and_refusal() -> None:
    dense = estimate_cache_size(IMAGENET_TRAIN, 32, 1000, None)
    assert dense.logits_bytes == IMAGENET_TRAIN * 32 * 1000 * 2  # ~82 GB
    assert 81.9e9 < dense.logits_bytes < 82.1e9
    assert dense.views_bytes == IMAGENET_TRAIN * 32 * 3 * 2
    assert dense.build_peak_bytes == 2 * dense.total_bytes
    assert dense.describe().startswith("82.2 GB (1,281,167 images x 32 views x 1000 logits x 2 B")
    # All logits (topk: null) on a 256 GB host: the build needs 164 GB -> fits; on 128 GB: refused.
    full = TeacherCacheConfig(topk=None)
    assert check_caches_fit([full], IMAGENET_TRAIN, 1000, host_bytes=256 * 10**9)[0] == dense
    with pytest.raises(ConfigError) as info:
        check_caches_fit([full], IMAGENET_TRAIN, 1000, host_bytes=128 * 10**9)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("teacher.cache: the teacher-logit cache needs 82.2 GB")
    assert "164 GB of host memory, but 128 GB is available" in msg
    assert "teacher.cache.views (now 32)" in msg and "teacher.cache.topk (e.g. 20)" in msg


def test_topk_defaults_to_20_for_large_label_spaces(caplog: pytest.LogCaptureFixture) -> None:
    auto = TeacherCacheConfig()
    assert auto.topk == "auto"
    assert auto.resolved_topk(1000) == 20
    assert auto.resolved_topk(100) is None and auto.resolved_topk(10) is None  # CIFAR: all logits
    assert TeacherCacheConfig(topk=50).resolved_topk(10) == 10 and TeacherCacheConfig(topk=None).resolved_topk(1000) is None
    with caplog.at_level(logging.INFO, logger="kdsearch.distill.cache_size"):
        (size,) = check_caches_fit([auto], IMAGENET_TRAIN, 1000, host_bytes=128 * 10**9)
    assert size.topk == 20
    # 20 fp16 values + 20 int16 indices + one fp32 rest logit per view and image.
    assert size.logits_bytes == IMAGENET_TRAIN * 32 * (20 * 4 + 4)
    assert 3.4e9 < size.total_bytes < 3.8e9
    assert any("storing the top 20 of 1000 logits" in r.getMessage() and "82.2 GB" in r.getMessage()
               for r in caplog.records)


def test_the_estimate_is_the_size_of_a_real_cache(tmp_path: Path, bundle, teacher) -> None:
    n, c = len(bundle.train), bundle.num_classes
    for cfg in (TeacherCacheConfig(views=2, batch_size=64), TeacherCacheConfig(views=2, topk=3, batch_size=64)):
        cache = build_or_load_cache(teacher, bundle, cfg, tmp_path, "cpu")
        est = estimate_cache_size(n, cfg.views, c, cfg.resolved_topk(c))
        assert cache.nbytes() == est.total_bytes
        assert cache.logits_nbytes() == est.logits_bytes
        assert (cache.placement, cache.logits_device.type) == ("device", "cpu")


def test_topk_auto_keeps_the_keys_of_all_logit_caches(bundle, teacher) -> None:
    spec = ViewSpec(bundle.image_size, 4, True)
    auto = cache_key(teacher, bundle, TeacherCacheConfig(views=3), spec)
    assert auto == cache_key(teacher, bundle, TeacherCacheConfig(views=3, topk=None), spec)
    assert auto != cache_key(teacher, bundle, TeacherCacheConfig(views=3, topk=20), spec)


def test_placement_rule() -> None:
    assert choose_placement(10**12, "cpu")[0] == "device"  # the host is the device
    assert choose_placement(4 * 10**9, "cuda", free_bytes=10 * 10**9)[0] == "device"
    where, why = choose_placement(6 * 10**9, "cuda", free_bytes=10 * 10**9)
    assert where == "host" and "pinned" in why
    avail = host_available_bytes()
    assert avail is None or avail > 0


def test_preflight_refuses_a_cache_that_fits_nowhere(monkeypatch: pytest.MonkeyPatch) -> None:
    from kdsearch.search.preflight import preflight

    cfg = load_config(Path(__file__).resolve().parents[2] / "studies" / "smoke.yaml")
    # The smoke cache: 256 train images x 4 views x 4 logits x 2 B + views.
    monkeypatch.setattr("kdsearch.distill.cache_size.host_available_bytes", lambda: 1000)
    with pytest.raises(ConfigError, match=r"teacher.cache: the teacher-logit cache needs .* but 1e-06 GB is available"):
        preflight(cfg)
    monkeypatch.setattr("kdsearch.distill.cache_size.host_available_bytes", lambda: 10**9)
    assert preflight(cfg) == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_pinned_cache_serves_the_same_targets_as_a_device_one(tmp_path: Path, bundle, teacher) -> None:
    dev = torch.device("cuda", 0)
    for cfg in (TeacherCacheConfig(views=2, batch_size=64), TeacherCacheConfig(views=2, topk=3, batch_size=64)):
        build_or_load_cache(teacher, bundle, cfg, tmp_path, "cpu")  # built with the CPU teacher
        on_device = build_or_load_cache(teacher, bundle, cfg, tmp_path, dev)  # loaded, placed on CUDA
        assert on_device.placement == "device" and on_device.logits_device.type == "cuda"
        on_host = build_or_load_cache(teacher, bundle, cfg, tmp_path, "cpu").place(dev, free_bytes=0)
        assert on_host.placement == "host" and on_host.pinned and on_host.logits_device.type == "cpu"
        assert on_host.views.device.type == "cuda"  # the loop indexes the views with device tensors
        idx = torch.randperm(len(bundle.train), device=dev)[:50]
        vid = torch.randint(0, 2, (50,), device=dev)
        a, b = on_device.teacher_targets(vid, idx), on_host.teacher_targets(vid, idx)
        pairs = [(a, b)] if isinstance(a, torch.Tensor) else [
            (getattr(a, f), getattr(b, f)) for f in ("values", "indices", "rest_logit")
        ]
        for x, y in pairs:
            assert x.device == y.device == idx.device and x.dtype == y.dtype and torch.equal(x, y)


def test_a_second_study_reuses_the_cache_and_says_so(tmp_path: Path, bundle, teacher, caplog) -> None:
    """Issue 22: one cache per content key, whichever study asks; the usage record names both."""
    from kdsearch.distill.teacher_cache import USAGE_FILE
    from kdsearch.storage import CACHE_MANIFEST_FILE, CACHE_USAGE_FILE, list_caches

    assert (CACHE_MANIFEST_FILE, CACHE_USAGE_FILE) == (MANIFEST_FILE, USAGE_FILE)  # storage reads what we write
    first = build_or_load_cache(teacher, bundle, CFG, tmp_path, "cpu", used_by="study-a")
    assert first.built and first.describe()["built_by"] == "study-a"
    with caplog.at_level(logging.INFO, logger="kdsearch.distill.teacher_cache"):
        second = build_or_load_cache(teacher, bundle, CFG, tmp_path, "cpu", used_by="study-b")
    d = second.describe()
    assert not second.built and second.build_forward_count == 0 and second.build_id == first.build_id
    assert d["built_by"] == "study-a" and d["used_by"] == ["study-a", "study-b"] and d["elapsed_s"] >= 0
    assert any("reused" in r.getMessage() and "by study study-a" in r.getMessage() for r in caplog.records)
    # kdsearch cache lists it once, with its key, size and both studies.
    (entry,) = list_caches(tmp_path)
    assert entry.key == first.key and entry.studies == ["study-a", "study-b"]
    assert entry.nbytes >= (tmp_path / first.key[:16] / DATA_FILE).stat().st_size
    assert entry.describe()["build_time_s"] == first.manifest["build_time_s"]
    # A rebuild (another key: more views) is another cache; the first keeps its record.
    other = build_or_load_cache(teacher, bundle, dataclasses.replace(CFG, views=2), tmp_path, "cpu", used_by="study-c")
    assert other.built and other.key != first.key
    assert sorted(e.studies for e in list_caches(tmp_path)) == [["study-a", "study-b"], ["study-c"]]
