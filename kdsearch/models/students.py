"""Building, sizing and training students from a :class:`StudentSpec`, through each family's record."""

from __future__ import annotations

from typing import Any

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from kdsearch.models.families import get_family
from kdsearch.models.registry import UnknownFamilyError
from kdsearch.models.spec import StudentSpec

__all__ = ["build_student", "student_param_count", "param_groups", "TOKEN_PATTERNS"]

TOKEN_PATTERNS: tuple[str, ...] = ("*pos_embed", "*cls_token", "*dist_token")
"""Transformer embeddings and tokens never decayed by the generic rule (``fnmatch`` patterns)."""


def build_student(spec: StudentSpec) -> nn.Module:
    """Build the student that ``spec`` describes (random init; seed torch first for determinism)."""
    return get_family(spec.family).build(spec)


def student_param_count(spec: StudentSpec) -> int:
    """Number of parameters of the student ``spec`` describes.

    The model is built on the ``meta`` device: no memory is allocated and weight init does no
    work, so this is cheap enough to call inside a bisection or a search-space filter.
    """
    with torch.device("meta"):
        model = build_student(spec)
    return sum(p.numel() for p in model.parameters())


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups for ``torch.optim`` with ``weight_decay`` where it belongs; frozen
    parameters are left out, and so is an empty group.

    A student (a model whose ``student_family`` attribute names a registered family) gets its
    family's own rule. Any other model (a teacher being fitted) gets the generic rule: no decay on
    1-D parameters (norms, biases), position embeddings and class/distillation tokens.
    """
    name = getattr(model, "student_family", None)
    if isinstance(name, str):
        try:
            family = get_family(name)
        except UnknownFamilyError:
            family = None
        if family is not None:
            return family.param_groups(model, weight_decay)
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=TOKEN_PATTERNS)
