"""Student family registry: ``family`` name -> builder of an ``nn.Module`` from a StudentSpec.

Every student model exposes ``forward_features(x)``, ``forward_head(features)`` and the
attributes ``features`` (the feature extractor), ``head`` (the classifier) and
``last_block`` (the last feature block, which fine-tuning may unfreeze).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kdsearch.models.spec import StudentSpec

__all__ = ["register_student", "build_student", "student_families", "student_param_count"]

StudentBuilder = Callable[[StudentSpec], nn.Module]
_REGISTRY: dict[str, StudentBuilder] = {}


def register_student(family: str) -> Callable[[StudentBuilder], StudentBuilder]:
    """Decorator: register ``builder`` for ``family``. A second registration is an error."""

    def deco(builder: StudentBuilder) -> StudentBuilder:
        if family in _REGISTRY:
            raise ValueError(f"student family {family!r} is already registered")
        _REGISTRY[family] = builder
        return builder

    return deco


def student_families() -> list[str]:
    _import_families()
    return sorted(_REGISTRY)


def build_student(spec: StudentSpec) -> nn.Module:
    """Build the student that ``spec`` describes (random init; seed torch first for determinism)."""
    _import_families()
    if spec.family not in _REGISTRY:
        raise ValueError(f"unknown student family {spec.family!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[spec.family](spec)


def student_param_count(spec: StudentSpec) -> int:
    """Number of parameters of the student ``spec`` describes.

    The model is built on the ``meta`` device: no memory is allocated and weight init does no
    work, so this is cheap enough to call inside a bisection or a search-space filter.
    """
    with torch.device("meta"):
        model = build_student(spec)
    return sum(p.numel() for p in model.parameters())


def _import_families() -> None:
    # Importing the family modules registers them; done lazily to keep imports one-way.
    from kdsearch.models import vgg, vit  # noqa: F401
