"""The search space: what one trial proposes.

A trial proposes a teacher (when the study lists several), a student family, a resolution, the
family's own architecture parameters (the family file's ``suggest``, e.g. ``vgg_depth`` and
``vgg_width``; see :mod:`kdsearch.models.families`), the KD hyper-parameters (temperature,
alpha, learning rate) and, when ``study.trial_time`` lists several durations, the KD time box
(``trial_time_s``: then ``kd_time_s`` is a figure the search can trade against accuracy). Fixed values are not suggested; they are stored as user attrs so every
trial is self-describing. Every value is drawn through :func:`kdsearch.models.suggest_space`.
This module knows no family: it asks the family registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from kdsearch.config import Space, StudyConfig, TeacherConfig
from kdsearch.distill.loop import KDHyper
from kdsearch.models import StudentSpec, get_family, suggest_space

__all__ = ["Proposal", "suggest", "grid_search_space", "param_distributions"]


@dataclass(frozen=True)
class Proposal:
    """What one trial runs: the student, the KD hyper-parameters and the teacher."""

    spec: StudentSpec
    hyper: KDHyper
    teacher: TeacherConfig
    box_s: float  # the KD time box of this trial (s)


def param_distributions(cfg: StudyConfig) -> dict[str, Space]:
    """Every parameter the study may search, by Optuna parameter name (fixed ones included)."""
    s = cfg.student
    spaces: dict[str, Space] = {
        "family": s.family,
        "resolution": s.resolution,
        "temperature": cfg.distill.temperature,
        "alpha": cfg.distill.alpha,
        "lr": cfg.distill.lr,
        "trial_time_s": cfg.study.box_space,
    }
    if len(cfg.teachers) > 1:
        spaces["teacher"] = Space(choices=tuple(t.display_name for t in cfg.teachers))
    for name in s.families:
        spaces.update(get_family(name).params(s.section(name)))
    return spaces


def grid_search_space(cfg: StudyConfig) -> dict[str, list[Any]]:
    """The search space for Optuna's GridSampler (searched parameters only)."""
    return {name: sp.values() for name, sp in param_distributions(cfg).items() if not sp.is_fixed}


def suggest(trial: optuna.trial.BaseTrial, cfg: StudyConfig, num_classes: int) -> Proposal:
    """Suggest one proposal. A family's parameters are only suggested when it is chosen."""
    teacher = cfg.teachers[0]
    if len(cfg.teachers) > 1:
        label = suggest_space(trial, "teacher", Space(choices=tuple(t.display_name for t in cfg.teachers)))
        teacher = next(t for t in cfg.teachers if t.display_name == label)
    family = str(suggest_space(trial, "family", cfg.student.family))
    resolution = int(suggest_space(trial, "resolution", cfg.student.resolution))
    arch = get_family(family).suggest(trial, cfg.student.section(family), resolution)
    spec = StudentSpec(family=family, resolution=resolution, num_classes=num_classes, arch=arch)
    hyper = KDHyper(
        temperature=float(suggest_space(trial, "temperature", cfg.distill.temperature)),
        alpha=float(suggest_space(trial, "alpha", cfg.distill.alpha)),
        lr=float(suggest_space(trial, "lr", cfg.distill.lr)),
    )
    box_s = float(suggest_space(trial, "trial_time_s", cfg.study.box_space))
    return Proposal(spec=spec, hyper=hyper, teacher=teacher, box_s=box_s)
