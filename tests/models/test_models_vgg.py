"""VGG students: every depth at every resolution, widths, parameter targets, the contract attrs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdsearch.models import StudentSpec, build_student, family_names, param_groups, student_param_count
from kdsearch.models.families.vgg import (
    VGG_CFGS,
    VGG_DEPTHS,
    VGG_NUM_FC,
    ConvBlock,
    VGGArch,
    vgg_width_for_params,
)


def _spec(depth: int, width: float = 1 / 16, resolution: int = 32, num_classes: int = 10) -> StudentSpec:
    return StudentSpec("vgg", resolution, num_classes, VGGArch(depth, width))


def test_table_gives_the_depths_and_depth_counts_weight_layers() -> None:
    assert VGG_DEPTHS == (2, 3, 4, 5, 8, 11, 13, 16, 19) == tuple(sorted(VGG_CFGS))
    for depth in VGG_DEPTHS:
        model = build_student(_spec(depth))
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        assert len(convs) + len(linears) == depth, depth
        assert len(linears) == VGG_NUM_FC[depth]
        assert all(m.kernel_size == (3, 3) for m in convs)


@pytest.mark.parametrize("depth", VGG_DEPTHS)
@pytest.mark.parametrize("resolution", [16, 32, 65, 224])
def test_every_depth_runs_at_every_resolution(depth: int, resolution: int) -> None:
    torch.manual_seed(0)
    model = build_student(_spec(depth, width=1 / 32, resolution=resolution, num_classes=7)).eval()
    x = torch.randn(2, 3, resolution, resolution)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
        assert torch.equal(logits, model(x))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    assert feats.shape[-1] >= 1 and feats.shape[-2] >= 1
    assert feats.shape[1] == model.num_features


def test_training_mode_backward_at_smallest_resolution() -> None:
    model = build_student(_spec(19, width=1 / 64, resolution=16)).train()
    loss = model(torch.randn(4, 3, 16, 16)).logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_params_increase_with_width_and_depth() -> None:
    widths = [1 / 64, 1 / 16, 1 / 4, 1 / 2, 1.0]
    for depth in VGG_DEPTHS:
        counts = [student_param_count(_spec(depth, w)) for w in widths]
        assert counts == sorted(counts) and len(set(counts)) == len(counts), (depth, counts)
    for w in (1 / 64, 0.25, 1.0):
        counts = [student_param_count(_spec(d, w)) for d in VGG_DEPTHS]
        assert counts == sorted(counts) and len(set(counts)) == len(counts), (w, counts)


def test_param_count_matches_built_model_and_ignores_resolution() -> None:
    for depth in (2, 8, 19):
        spec = _spec(depth, 0.3)
        built = sum(p.numel() for p in build_student(spec).parameters())
        assert student_param_count(spec) == built
        assert student_param_count(_spec(depth, 0.3, resolution=224)) == built


def test_width_one_64th_gives_at_least_one_channel() -> None:
    model = build_student(_spec(2, 1 / 64))
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert conv.out_channels == 1
    model19 = build_student(_spec(19, 1 / 64))
    widths = [m.out_channels for m in model19.modules() if isinstance(m, nn.Conv2d)]
    assert min(widths) == 1 and max(widths) == 8
    assert model19.head.fc.in_features == 8  # FC hidden 512/64


def test_width_scales_channels_and_fc_hidden() -> None:
    model = build_student(_spec(11, 0.5))
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [32, 64, 128, 128, 256, 256, 256, 256]
    assert [m.out_features for m in model.head.modules() if isinstance(m, nn.Linear)] == [256, 256, 10]


def test_contract_attributes_and_state_dict_has_no_duplicates() -> None:
    model = build_student(_spec(8, 0.25))
    assert isinstance(model.features, nn.Sequential)
    assert isinstance(model.last_block, ConvBlock)
    assert model.last_block is [m for m in model.features if isinstance(m, ConvBlock)][-1]
    assert not any(k.startswith("last_block") for k in model.state_dict())
    head_params = {id(p) for p in model.head.parameters()}
    feat_params = {id(p) for p in model.features.parameters()}
    assert head_params and feat_params and not head_params & feat_params
    assert head_params | feat_params == {id(p) for p in model.parameters()}
    # Freeze everything except the head, as fine-tuning does.
    for p in model.parameters():
        p.requires_grad = False
    for p in model.head.parameters():
        p.requires_grad = True
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in model.features.parameters())
    assert all(p.grad is not None for p in model.head.parameters())


def test_build_is_deterministic_under_a_seed() -> None:
    torch.manual_seed(3)
    a = build_student(_spec(5, 0.1)).state_dict()
    torch.manual_seed(3)
    b = build_student(_spec(5, 0.1)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_depth_and_width_are_rejected() -> None:
    with pytest.raises(ValueError, match="depth"):
        build_student(_spec(6))
    with pytest.raises(ValueError, match="width"):
        build_student(_spec(8, 0.0))


def test_registry_knows_families_and_rejects_unknown() -> None:
    assert {"vgg", "vit"} <= set(family_names())
    with pytest.raises(ValueError, match="unknown student family 'resnet'"):
        build_student(StudentSpec("resnet", 32, 10, {"depth": 18}))


PAPER_TARGETS = [0.0042e6, 0.016e6, 0.062e6, 0.25e6, 0.98e6]


@pytest.mark.parametrize("depth", [3, 4, 5, 8])
def test_width_for_params_hits_the_paper_targets(depth: int) -> None:
    for target in PAPER_TARGETS:
        width = vgg_width_for_params(depth, target, num_classes=10)
        count = student_param_count(_spec(depth, width))
        assert abs(count - target) / target < 0.10, (depth, target, width, count)


def test_width_for_params_depth2_and_deep_and_unreachable() -> None:
    for target in PAPER_TARGETS[:2]:
        w = vgg_width_for_params(2, target)
        assert abs(student_param_count(_spec(2, w)) - target) / target < 0.10
    w = vgg_width_for_params(19, 0.98e6, num_classes=100)
    assert abs(student_param_count(_spec(19, w, num_classes=100)) - 0.98e6) / 0.98e6 < 0.10
    with pytest.raises(ValueError, match="cannot reach"):
        vgg_width_for_params(2, 0.98e6)  # one conv cannot hold ~1M weights at width <= 16


def test_label_and_param_groups() -> None:
    spec = _spec(8, 0.25)
    assert spec.label == "vgg8-w0.25@32"
    model = build_student(spec)
    groups = param_groups(model, 5e-4)
    by_decay = {g["weight_decay"]: g["params"] for g in groups}
    assert set(by_decay) == {0.0, 5e-4}
    assert all(p.ndim == 4 or p.ndim == 2 for p in by_decay[5e-4])  # conv and linear weights
    assert all(p.ndim == 1 for p in by_decay[0.0])  # BatchNorm weights and biases, linear biases
    assert sum(len(v) for v in by_decay.values()) == len(list(model.parameters()))
