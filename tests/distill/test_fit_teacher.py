"""fit_teacher: trains for the box or to a target (val accuracy, epochs) under a cap, stores the weights, and a second call loads them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from kdsearch.config import TeacherFitConfig
from kdsearch.data import ImageSplit
from kdsearch.distill import fit_key, fit_teacher
from kdsearch.distill.fit import fit_key_config
from kdsearch.measure import evaluate_accuracy
from kdsearch.models import state_dict_sha256

from distill_helpers import tiny_bundle, tiny_teacher


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


def test_fit_stops_at_its_target_accuracy_well_inside_the_cap(tmp_path: Path) -> None:
    bundle = tiny_bundle(train_size=512, num_classes=4)
    target = 0.6
    cfg = TeacherFitConfig(time_s=60.0, lr=2e-3, batch_size=64, target_accuracy=target, eval_every_epochs=0.5)
    fitted, info = fit_teacher(tiny_teacher(bundle.num_classes, seed=3), bundle, cfg, tmp_path, "cpu")
    assert info["stop_reason"] == "target_accuracy" and info["target_reached"] is True
    assert info["fit_time_s"] < 0.5 * cfg.time_s  # stopped by the target, far from the cap
    history = info["val_history"]
    assert history[-1][1] >= target and all(acc < target for _, acc in history[:-1])
    assert [e for e, _ in history] == sorted(e for e, _ in history) and history[0][0] >= 0.5
    # The recorded figure is the one the search reports for the teacher.
    assert evaluate_accuracy(fitted.model, bundle.val, 32, fitted.mean, fitted.std, "cpu") == pytest.approx(history[-1][1])
    again, info2 = fit_teacher(tiny_teacher(bundle.num_classes, seed=5), bundle, cfg, tmp_path, "cpu")
    assert info2["from_cache"] and info2["stop_reason"] == "target_accuracy"
    assert again.weights_sha256 == fitted.weights_sha256


def test_fit_stops_after_max_epochs_or_at_the_cap(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bundle = tiny_bundle(train_size=256, num_classes=4)
    by_epochs = TeacherFitConfig(time_s=60.0, lr=2e-3, batch_size=64, max_epochs=2)
    _, info = fit_teacher(tiny_teacher(bundle.num_classes), bundle, by_epochs, tmp_path, "cpu")
    assert info["stop_reason"] == "max_epochs" and info["epochs"] == pytest.approx(2.0, abs=0.3)
    assert info["fit_time_s"] < 30 and "val_history" not in info

    # Truly unreachable: val labels shuffled (class counts kept), so no fit can score 100 % on
    # them (the tiny synthetic set is otherwise learnable to 100 % within the cap on a quiet CPU).
    shuffled = torch.Generator().manual_seed(0)
    val = ImageSplit(bundle.val.images, bundle.val.labels[torch.randperm(len(bundle.val), generator=shuffled)])
    assert not torch.equal(val.labels, bundle.val.labels)
    unreachable = TeacherFitConfig(time_s=1.0, lr=2e-3, batch_size=64, target_accuracy=1.0, eval_every_epochs=0.25)
    with caplog.at_level("WARNING", logger="kdsearch.distill.fit"):
        _, info = fit_teacher(tiny_teacher(bundle.num_classes), dataclasses.replace(bundle, val=val), unreachable,
                              tmp_path / "unreachable", "cpu")
    assert info["stop_reason"] == "time_cap" and info["target_reached"] is False
    assert 1.0 <= info["fit_time_s"] < 3.0 and info["val_history"]
    assert "below teacher.fit.target_accuracy 100%" in caplog.text


def test_target_keys_are_in_the_fit_key_and_leave_old_keys_alone() -> None:
    bundle = tiny_bundle(train_size=64)
    teacher = tiny_teacher(bundle.num_classes)
    plain = TeacherFitConfig(time_s=60.0)
    assert set(fit_key_config(plain)) == {"enabled", "time_s", "lr", "weight_decay", "batch_size"}
    assert "flip" in fit_key_config(dataclasses.replace(plain, flip=False))
    # eval_every_epochs changes nothing without a target: the key stays the time box's.
    assert fit_key(teacher, bundle, dataclasses.replace(plain, eval_every_epochs=0.5)) == fit_key(teacher, bundle, plain)
    keys = {
        fit_key(teacher, bundle, c)
        for c in (
            plain,
            dataclasses.replace(plain, target_accuracy=0.9),
            dataclasses.replace(plain, target_accuracy=0.95),
            dataclasses.replace(plain, target_accuracy=0.9, eval_every_epochs=0.5),
            dataclasses.replace(plain, max_epochs=10),
            dataclasses.replace(plain, target_accuracy=0.9, max_epochs=10),
        )
    }
    assert len(keys) == 6


@pytest.mark.parametrize(
    ("fit", "message"),
    [
        ({"target_accuracy": 90}, "teacher.fit.target_accuracy: must be in (0, 1] (a fraction of the val split)"),
        ({"max_epochs": 0}, "teacher.fit.max_epochs: must be in (0, 100000]"),
        ({"eval_every_epochs": -1}, "teacher.fit.eval_every_epochs: must be in (0, 1000]"),
        ({"flip": "no"}, "teacher.fit.flip: must be true or false"),
    ],
)
def test_bad_fit_targets_are_one_line_errors(fit: dict, message: str) -> None:
    from kdsearch.config import config_from_dict
    from kdsearch.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        config_from_dict({"teacher": {"name": "vit_tiny_patch16_224", "fit": fit}})
    assert message in str(err.value) and "\n" not in str(err.value)
    ok = config_from_dict({"teacher": {"name": "vit_tiny_patch16_224", "fit": {
        "target_accuracy": 0.95, "max_epochs": 40, "time": "150s", "flip": False}}})
    assert ok.teacher.fit.describe() == "to 95% val, at most 40 epochs, cap 150s" and ok.teacher.fit.time_is_cap
    assert TeacherFitConfig(time_s=60).describe() == "for 60s" and not TeacherFitConfig().time_is_cap
