"""ViT students: every spec of the default search space, validation, the contract attrs."""

from __future__ import annotations

import itertools

import pytest
import torch

from kdsearch.models import StudentSpec, build_student, param_groups, student_param_count
from kdsearch.models.families.vit import ViTArch, ViTConfig, vit_patch_size


def _spec(depth: int, embed_dim: int, num_heads: int, patch_size: int, resolution: int = 32) -> StudentSpec:
    return StudentSpec("vit", resolution, 10, ViTArch(depth, embed_dim, num_heads, patch_size))


def _default_space_specs(resolution: int) -> tuple[list[StudentSpec], list[dict[str, int]]]:
    """Valid specs, and the architectures (as dicts) whose width the heads do not divide."""
    space = ViTConfig()
    ok, bad = [], []
    for depth, dim, heads, pps in itertools.product(
        space.depth.values(),
        space.embed_dim.values(),
        space.num_heads.values(),
        space.patches_per_side.values(),
    ):
        arch = {"depth": depth, "embed_dim": dim, "num_heads": heads, "patch_size": vit_patch_size(resolution, pps)}
        if dim % heads == 0:
            ok.append(StudentSpec("vit", resolution, 10, arch))
        else:
            bad.append(arch)
    return ok, bad


@pytest.mark.parametrize("resolution", [32, 64, 224])
def test_every_default_space_spec_builds_or_is_rejected(resolution: int) -> None:
    ok, bad = _default_space_specs(resolution)
    assert ok and bad  # the default space mixes e.g. 64 dims with 3 heads
    # Forward only the smallest and largest valid specs (and the largest grid) to stay fast.
    by_size = sorted(ok, key=student_param_count)
    smallest_grid = min(ok, key=lambda s: s.arch.patch_size)
    for spec in {by_size[0], by_size[-1], smallest_grid}:
        model = build_student(spec).eval()
        with torch.no_grad():
            out = model(torch.randn(2, 3, resolution, resolution))
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        grid = resolution // spec.arch.patch_size
        assert model.forward_features(torch.randn(1, 3, resolution, resolution)).shape == (
            1,
            grid * grid + 1,
            spec.arch.embed_dim,
        )
    for spec in ok:
        model = build_student(spec)
        assert len(model.features.blocks) == spec.arch.depth
        assert model.head.out_features == 10
    for arch in bad:
        with pytest.raises(ValueError, match="divisible by num_heads"):
            StudentSpec("vit", resolution, 10, arch)


def test_embed_dim_not_divisible_by_heads_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"student\.vit\.embed_dim: must be divisible by num_heads .*64.*3"):
        _spec(2, 64, 3, 4)


def test_missing_or_non_dividing_patch_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="patch_size"):
        StudentSpec("vit", 32, 10, {"depth": 2, "embed_dim": 64, "num_heads": 2})
    with pytest.raises(ValueError, match="must divide the resolution"):
        build_student(_spec(2, 64, 2, 5))


def test_label_and_param_groups_spare_tokens() -> None:
    spec = _spec(4, 96, 3, 4)
    assert spec.label == "vit4-d96h3p4@32"
    model = build_student(spec)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in param_groups(model, 0.05)}
    assert {"features.pos_embed", "features.cls_token", "head.bias"} <= groups[0.0]
    assert "head.weight" in groups[0.05] and "features.blocks.0.attn.qkv.weight" in groups[0.05]
    assert not groups[0.0] & groups[0.05]


@pytest.mark.parametrize(
    ("resolution", "pps", "expected"),
    [
        (32, 4, 8),
        (32, 8, 4),
        (64, 8, 8),
        (96, 8, 12),
        (160, 8, 20),
        (224, 8, 28),
        (224, 4, 56),
        (65, 4, 13),
        (65, 8, 5),
        (32, 32, 2),
        (30, 4, 6),
        (100, 8, 10),
    ],
)
def test_vit_patch_size(resolution: int, pps: int, expected: int) -> None:
    p = vit_patch_size(resolution, pps)
    assert p == expected
    assert resolution % p == 0 and p >= 2
    assert resolution // p >= min(pps, resolution // 2)


def test_vit_patch_size_impossible() -> None:
    with pytest.raises(ValueError, match="no patch size"):
        vit_patch_size(67, 4)  # 67 is prime


def test_contract_attributes_and_freezing() -> None:
    model = build_student(_spec(2, 64, 2, 8))
    assert model.last_block is model.features.blocks[-1]
    assert [k for k in model.state_dict() if not k.startswith("features.")] == ["head.weight", "head.bias"]
    assert sum(p.numel() for p in model.head.parameters()) == 64 * 10 + 10
    for p in model.parameters():
        p.requires_grad = False
    for p in model.head.parameters():
        p.requires_grad = True
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    assert all(p.grad is None for p in model.features.parameters())
    assert model.head.weight.grad is not None
    with torch.no_grad():
        emb = model.forward_head(model.forward_features(x), pre_logits=True)
    assert emb.shape == (2, 64)
