"""MobileNetV3 students (timm's builder): resolutions, widths and depths, the contract attrs, the
study-file section, suggest from a real Optuna trial, and an ONNX round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from kdsearch.config import config_from_dict, config_to_dict
from kdsearch.errors import ConfigError
from kdsearch.models import StudentSpec, build_student, get_family, param_groups, student_param_count
from kdsearch.models.families.mobilenetv3 import TIMM_WIDTHS, MobileNetV3Arch, timm_name
from kdsearch.search.space import suggest


def _spec(width: float = 0.5, depth: float = 0.5, resolution: int = 32, size: str = "small",
          num_classes: int = 10) -> StudentSpec:
    return StudentSpec("mobilenetv3", resolution, num_classes, MobileNetV3Arch(size, width, depth))


def test_widths_are_timms_registered_ones() -> None:
    assert TIMM_WIDTHS["small"] == (0.5, 0.75, 1.0) and TIMM_WIDTHS["large"] == (0.75, 1.0)
    assert timm_name("small", 0.5) == "mobilenetv3_small_050"
    with pytest.raises(ValueError, match=r"mobilenetv3_large at channel multipliers \[0.75, 1.0\]"):
        MobileNetV3Arch("large", 0.5)
    with pytest.raises(ValueError, match="depth_multiplier: must be a positive number"):
        MobileNetV3Arch("small", 0.5, 0.0)


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_builds_and_runs_at_small_resolutions(resolution: int) -> None:
    torch.manual_seed(0)
    model = build_student(_spec(resolution=resolution, num_classes=7)).eval()
    x = torch.randn(2, 3, resolution, resolution)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
        assert torch.equal(logits, model(x))
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.head.in_features)
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    assert feats.shape[:2] == (2, model.num_features) and feats.shape[-1] == -(-resolution // 32)


def test_training_step_reaches_every_parameter() -> None:
    model = build_student(_spec(resolution=16)).train()
    model(torch.randn(4, 3, 16, 16)).logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_params_grow_with_width_and_depth_and_ignore_resolution() -> None:
    widths = [student_param_count(_spec(w, 0.5)) for w in TIMM_WIDTHS["small"]]
    assert widths == sorted(widths) and len(set(widths)) == 3, widths
    depths = [student_param_count(_spec(0.5, d)) for d in (0.25, 0.5, 1.0, 1.5)]
    assert depths == sorted(depths) and len(set(depths)) == 4, depths
    assert student_param_count(_spec(0.75, 0.5)) < student_param_count(_spec(0.75, 0.5, size="large"))
    spec = _spec(0.75, 0.75)
    built = sum(p.numel() for p in build_student(spec).parameters())
    assert student_param_count(spec) == built == student_param_count(_spec(0.75, 0.75, resolution=224))


def test_contract_label_and_param_groups() -> None:
    spec = _spec(0.75, 0.5, resolution=24)
    assert spec.label == "mnv3-small-w0.75-d0.5@24"
    assert StudentSpec.from_json(spec.to_json()) == spec
    model = build_student(spec)
    assert model.student_family == "mobilenetv3"
    assert model.last_block is model.features.blocks[-1]
    assert [k for k in model.state_dict() if not k.startswith("features.")] == ["head.weight", "head.bias"]
    head = {id(p) for p in model.head.parameters()}
    feats = {id(p) for p in model.features.parameters()}
    assert not head & feats and head | feats == {id(p) for p in model.parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: [names[id(p)] for p in g["params"]] for g in param_groups(model, 1e-4)}
    assert "features.bn1.weight" in groups[0.0] and "head.bias" in groups[0.0]
    assert "features.conv_stem.weight" in groups[1e-4] and "head.weight" in groups[1e-4]
    assert all(dict(model.named_parameters())[n].ndim > 1 for n in groups[1e-4])
    # Fine-tuning trains the head alone.
    for p in model.parameters():
        p.requires_grad = False
    for p in model.head.parameters():
        p.requires_grad = True
    model(torch.randn(2, 3, 24, 24)).sum().backward()
    assert all(p.grad is None for p in model.features.parameters())
    assert model.head.weight.grad is not None


def test_section_rules_and_round_trip() -> None:
    raw = {"family": ["vgg", "mobilenetv3"], "resolution": [16, 32],
           "mobilenetv3": {"size": ["small", "large"], "channel_multiplier": [0.75, 1.0], "depth_multiplier": [0.5]}}
    cfg = config_from_dict({"student": raw})
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert "mobilenetv3" in cfg.search_signature()["student"]
    for section, fragment in [
        ({"size": ["small", "large"]}, "student.mobilenetv3.channel_multiplier: timm registers mobilenetv3_large"),
        ({"channel_multiplier": {"low": 0.5, "high": 1.0}}, "student.mobilenetv3.channel_multiplier: must be a list"),
        ({"size": "tiny"}, "student.mobilenetv3.size: must be one of ['small', 'large']"),
        ({"depth_multiplier": [0.0]}, "student.mobilenetv3.depth_multiplier: must be >= 0.1"),
        ({"width": [0.5]}, "student.mobilenetv3.width: unknown key 'width'"),
    ]:
        with pytest.raises(ConfigError) as exc:
            config_from_dict({"student": {"mobilenetv3": section}})
        assert str(exc.value).startswith(fragment) and "\n" not in str(exc.value)


def test_suggest_from_a_real_optuna_trial() -> None:
    cfg = config_from_dict({"student": {"family": ["vgg", "mobilenetv3"], "resolution": [16, 32],
                                        "mobilenetv3": {"channel_multiplier": [0.5, 0.75],
                                                        "depth_multiplier": {"low": 0.25, "high": 1.0}}}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(16):
        trial = study.ask()
        spec = suggest(trial, cfg, 10).spec
        seen.add(spec.family)
        if spec.family == "mobilenetv3":
            assert set(trial.params) == {"family", "resolution", "mobilenetv3_channel_multiplier",
                                         "mobilenetv3_depth_multiplier"}  # size is fixed: not suggested
            a = spec.arch
            assert a.size == "small" and a.channel_multiplier in (0.5, 0.75) and 0.25 <= a.depth_multiplier <= 1.0
            assert spec.resolution in (16, 32)
        else:
            assert not any(k.startswith("mobilenetv3_") for k in trial.params)
        study.tell(trial, 0.0)
    assert seen == {"vgg", "mobilenetv3"}
    fixed = optuna.trial.FixedTrial({"family": "mobilenetv3", "resolution": 16,
                                     "mobilenetv3_channel_multiplier": 0.75, "mobilenetv3_depth_multiplier": 0.5})
    arch = get_family("mobilenetv3").suggest(fixed, cfg.student.section("mobilenetv3"), 16)
    assert arch == MobileNetV3Arch("small", 0.75, 0.5)


def test_onnx_export_round_trip(tmp_path: Path) -> None:
    """Exported as kdsearch export does (dynamo, a dynamic batch); onnxruntime gives the same logits."""
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = build_student(_spec(0.5, 0.5, resolution=32)).eval()
    path = tmp_path / "mnv3.onnx"
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(model, (torch.randn(2, 3, 32, 32),), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_shapes=({0: batch},), dynamo=True, external_data=False, verbose=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert not isinstance(sess.get_inputs()[0].shape[0], int)  # the batch stays dynamic
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert out.shape == (5, 10)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
