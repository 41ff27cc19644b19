"""The search space: the only place that calls ``trial.suggest_*``.

A trial proposes a teacher (when the study lists several), a student family, a resolution, the
family's architecture parameters (for VGG: ``vgg_depth`` and ``vgg_width``, or one categorical
``vgg_preset`` when the study lists ``student.vgg.presets``), and the KD hyper-parameters
(temperature, alpha, learning rate).
Fixed values are not suggested; they are stored as user attrs so every trial is self-describing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from kdsearch.config import Space, StudyConfig, TeacherConfig
from kdsearch.distill.loop import KDHyper
from kdsearch.models.spec import StudentSpec
from kdsearch.models.vit import vit_patch_size

__all__ = ["Proposal", "suggest", "grid_search_space", "param_distributions"]


@dataclass(frozen=True)
class Proposal:
    """What one trial runs: the student, the KD hyper-parameters and the teacher."""

    spec: StudentSpec
    hyper: KDHyper
    teacher: TeacherConfig


def _distribution(space: Space) -> BaseDistribution:
    if space.choices is not None:
        return CategoricalDistribution(list(space.choices))
    if space.integer:
        return IntDistribution(int(space.low), int(space.high), log=space.log, step=int(space.step or 1))  # type: ignore[arg-type]
    return FloatDistribution(space.low, space.high, log=space.log, step=space.step)  # type: ignore[arg-type]


def _suggest(trial: optuna.trial.BaseTrial, name: str, space: Space) -> Any:
    if space.is_fixed:
        return space.fixed_value
    dist = _distribution(space)
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


def param_distributions(cfg: StudyConfig) -> dict[str, Space]:
    """Every parameter the study may search, by Optuna parameter name (fixed ones included)."""
    s = cfg.student
    spaces: dict[str, Space] = {
        "family": s.family,
        "resolution": s.resolution,
        "temperature": cfg.distill.temperature,
        "alpha": cfg.distill.alpha,
        "lr": cfg.distill.lr,
    }
    if len(cfg.teachers) > 1:
        spaces["teacher"] = Space(choices=tuple(t.display_name for t in cfg.teachers))
    families = s.family.values()
    if "vgg" in families:
        if s.vgg.presets:  # named (depth, width) pairs: one categorical instead of a cross product
            spaces["vgg_preset"] = Space(choices=tuple(p.display_name for p in s.vgg.presets))
        else:
            spaces["vgg_depth"] = s.vgg.depth
            spaces["vgg_width"] = s.vgg.width
    if "vit" in families:
        spaces["vit_depth"] = s.vit.depth
        spaces["vit_embed_dim"] = s.vit.embed_dim
        spaces["vit_num_heads"] = s.vit.num_heads
        spaces["vit_patches_per_side"] = s.vit.patches_per_side
    return spaces


def grid_search_space(cfg: StudyConfig) -> dict[str, list[Any]]:
    """The search space for Optuna's GridSampler (searched parameters only)."""
    return {name: sp.values() for name, sp in param_distributions(cfg).items() if not sp.is_fixed}


def suggest(trial: optuna.trial.BaseTrial, cfg: StudyConfig, num_classes: int) -> Proposal:
    """Suggest one proposal. Conditional parameters are only suggested for the chosen family."""
    spaces = param_distributions(cfg)
    teacher = cfg.teachers[0]
    if "teacher" in spaces:
        label = _suggest(trial, "teacher", spaces["teacher"])
        teacher = next(t for t in cfg.teachers if t.display_name == label)
    family = _suggest(trial, "family", spaces["family"])
    resolution = int(_suggest(trial, "resolution", spaces["resolution"]))
    if family == "vgg":
        if "vgg_preset" in spaces:
            name = _suggest(trial, "vgg_preset", spaces["vgg_preset"])
            preset = next(p for p in cfg.student.vgg.presets if p.display_name == name)
            depth, width = int(preset.depth), float(preset.width)  # type: ignore[arg-type]
        else:
            depth = int(_suggest(trial, "vgg_depth", spaces["vgg_depth"]))
            width = float(_suggest(trial, "vgg_width", spaces["vgg_width"]))
        spec = StudentSpec(family="vgg", depth=depth, width=width, resolution=resolution, num_classes=num_classes)
    else:
        heads = int(_suggest(trial, "vit_num_heads", spaces["vit_num_heads"]))
        dim = int(_suggest(trial, "vit_embed_dim", spaces["vit_embed_dim"]))
        # Heads must divide the width: round the width up to the next multiple (documented in
        # the README), so every sampled combination is a valid model.
        dim = -(-dim // heads) * heads
        per_side = int(_suggest(trial, "vit_patches_per_side", spaces["vit_patches_per_side"]))
        spec = StudentSpec(
            family="vit",
            depth=int(_suggest(trial, "vit_depth", spaces["vit_depth"])),
            embed_dim=dim,
            num_heads=heads,
            patch_size=vit_patch_size(resolution, per_side),
            resolution=resolution,
            num_classes=num_classes,
        )
    hyper = KDHyper(
        temperature=float(_suggest(trial, "temperature", spaces["temperature"])),
        alpha=float(_suggest(trial, "alpha", spaces["alpha"])),
        lr=float(_suggest(trial, "lr", spaces["lr"])),
    )
    return Proposal(spec=spec, hyper=hyper, teacher=teacher)
