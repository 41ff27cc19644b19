"""fit_teacher: trains for the box, stores the weights, and a second call loads them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from distill_helpers import tiny_bundle, tiny_teacher

from kdsearch.config import TeacherFitConfig
from kdsearch.distill import fit_key, fit_teacher
from kdsearch.measure import evaluate_accuracy
from kdsearch.models import state_dict_sha256


def test_fit_is_cached_and_reloaded(tmp_path: Path) -> None:
    bundle = tiny_bundle(train_size=512)
    cfg = TeacherFitConfig(time_s=1.5, lr=2e-3)
    original = tiny_teacher(bundle.num_classes, seed=3)
    before = evaluate_accuracy(original.model, bundle.val, 32, original.mean, original.std, "cpu")
    seen: list[tuple[float, float]] = []
    fitted, info = fit_teacher(
        original, bundle, cfg, tmp_path, "cpu", progress=lambda d, t: seen.append((d, t))
    )
    assert not info["from_cache"] and info["steps"] > 0
    assert 1.5 <= info["fit_time_s"] <= 2.5 and seen[-1] == (1.5, 1.5)
    assert fitted.weights_sha256 != original.weights_sha256  # the returned teacher carries the new hash
    assert fitted.weights_sha256 == state_dict_sha256(fitted.model) and not fitted.model.training
    after = evaluate_accuracy(fitted.model, bundle.val, 32, fitted.mean, fitted.std, "cpu")
    assert after > max(before, 0.1) + 0.1  # it learned the task

    # A fresh process creates the teacher from another random draw: it loads the fit instead of
    # training (a random init is not part of the key; real starting weights are).
    again_teacher = tiny_teacher(bundle.num_classes, seed=4)
    assert again_teacher.weights_sha256 != original.weights_sha256
    assert fit_key(again_teacher, bundle, cfg) == fit_key(original, bundle, cfg)
    real_a = dataclasses.replace(original, pretrained=True)
    real_b = dataclasses.replace(again_teacher, pretrained=True)
    assert fit_key(real_a, bundle, cfg) != fit_key(real_b, bundle, cfg)
    again, info2 = fit_teacher(again_teacher, bundle, cfg, tmp_path, "cpu")
    assert info2["from_cache"] and info2["fit_time_s"] == pytest.approx(info["fit_time_s"])
    assert again.weights_sha256 == fitted.weights_sha256
    for a, b in zip(again.model.state_dict().values(), fitted.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    # A different fit config (or teacher) is another fit; a corrupt file is refitted, not used.
    assert fit_key(again_teacher, bundle, TeacherFitConfig(time_s=1.0)) != fit_key(again_teacher, bundle, cfg)
    path = Path(info["path"])
    raw = bytearray(path.read_bytes())
    raw[-16:] = bytes(b ^ 0xFF for b in raw[-16:])
    path.write_bytes(bytes(raw))
    _, info3 = fit_teacher(
        tiny_teacher(bundle.num_classes, seed=3),
        bundle,
        TeacherFitConfig(time_s=0.3, lr=2e-3),
        tmp_path,
        "cpu",
    )
    assert not info3["from_cache"]  # other config: its own fit
    _, info4 = fit_teacher(tiny_teacher(bundle.num_classes, seed=3), bundle, cfg, tmp_path, "cpu")
    assert not info4["from_cache"]  # corrupt: fitted again


def test_a_reset_head_is_not_part_of_the_fit_key() -> None:
    bundle = tiny_bundle(train_size=64)
    cfg = TeacherFitConfig(time_s=1.0)
    base = dataclasses.replace(tiny_teacher(bundle.num_classes, seed=0), pretrained=True, head_reset=True)
    other_head = dataclasses.replace(tiny_teacher(bundle.num_classes, seed=0), pretrained=True, head_reset=True)
    with torch.no_grad():
        other_head.model.get_classifier().weight.add_(1.0)  # a different random head
    other_body = dataclasses.replace(tiny_teacher(bundle.num_classes, seed=0), pretrained=True, head_reset=True)
    with torch.no_grad():
        other_body.model.patch_embed.proj.weight.add_(1.0)  # a different backbone
    assert fit_key(other_head, bundle, cfg) == fit_key(base, bundle, cfg)
    assert fit_key(other_body, bundle, cfg) != fit_key(base, bundle, cfg)
