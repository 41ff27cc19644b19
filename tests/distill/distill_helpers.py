"""Tiny real data, teachers and students for the distill tests (and the two-process worker)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from kdsearch.config import DataConfig, TeacherCacheConfig, TeacherConfig
from kdsearch.data import DataBundle, load_data
from kdsearch.models import LoadedTeacher, StudentSpec, build_student, create_teacher, state_dict_sha256

TINY_VIT_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}


def tiny_bundle(
    train_size: int = 256, test_size: int = 64, num_classes: int = 10, seed: int = 0
) -> DataBundle:
    """Synthetic 32 px images with class structure (see kdsearch.data.synthetic)."""
    return load_data(
        DataConfig(
            dataset="synthetic",
            synthetic_train_size=train_size,
            synthetic_test_size=test_size,
            num_classes=num_classes,
            seed=seed,
        )
    )


def tiny_teacher(num_classes: int, seed: int = 0, input_size: int = 32, **kwargs: Any) -> LoadedTeacher:
    """A one-block timm ViT (vit_tiny_patch16_224 with tiny kwargs), random weights from ``seed``."""
    torch.manual_seed(seed)
    model_kwargs = {**TINY_VIT_KWARGS, "img_size": input_size, **kwargs}
    cfg = TeacherConfig(name="vit_tiny_patch16_224", model_kwargs=model_kwargs, label="tinyvit")
    return create_teacher(cfg, num_classes, "cpu")


def perturbed(teacher: LoadedTeacher) -> LoadedTeacher:
    """The same teacher with one weight changed (and its hash recomputed), on a copy of the model."""
    import copy

    model = copy.deepcopy(teacher.model)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    return dataclasses.replace(teacher, model=model, weights_sha256=state_dict_sha256(model))


def tiny_student(
    num_classes: int, resolution: int = 16, depth: int = 3, width: float = 1 / 16, seed: int = 0
):
    torch.manual_seed(seed)
    return build_student(
        StudentSpec(family="vgg", resolution=resolution, num_classes=num_classes, arch={"depth": depth, "width": width})
    )


def build_in_child(cache_dir: str, barrier: Any, queue: Any, slow_s: float) -> None:
    """Worker for the two-process test: same data, same teacher, build at the same moment."""
    from kdsearch.distill import build_or_load_cache

    torch.set_num_threads(1)
    bundle = tiny_bundle(train_size=96)
    teacher = tiny_teacher(bundle.num_classes, seed=1)
    forward = teacher.model.forward

    def slow_forward(x: torch.Tensor) -> torch.Tensor:  # make the build long enough to overlap
        time.sleep(slow_s)
        return forward(x)

    teacher.model.forward = slow_forward  # type: ignore[method-assign]
    barrier.wait(timeout=120)
    cache = build_or_load_cache(
        teacher, bundle, TeacherCacheConfig(views=4, batch_size=32), Path(cache_dir), "cpu"
    )
    queue.put((cache.built, cache.build_id, cache.build_forward_count))
