"""StudentSpec: the plain description that fully determines a student model."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kdsearch.models.families import get_family
from kdsearch.models.registry import SPEC_KEYS

__all__ = ["StudentSpec"]

# The first StudentSpec was one flat union of every family's fields; a family leaves the ones it
# does not use at these values. Stored trials and checkpoints written then still load.
_LEGACY_UNUSED: dict[str, Any] = {"width": 1.0, "depth": None, "embed_dim": None, "num_heads": None, "patch_size": None}


@dataclass(frozen=True)
class StudentSpec:
    """Everything needed to rebuild a student, and nothing else.

    ``family`` names a registered student family (:mod:`kdsearch.models.families`); ``resolution``
    is the input side length in pixels the student is trained and measured at; ``arch`` is the
    family's own architecture record (e.g. ``VGGArch(depth=8, width=0.25)``). A mapping given as
    ``arch`` is turned into that record, so ``StudentSpec("vgg", 32, 10, {"depth": 8, "width": 0.25})``
    works; an unknown family or a bad architecture raises ``ValueError`` at once.

    The dict form is flat, ``{family, resolution, num_classes, in_chans, <arch fields>}``: stored
    trials keep their spec as a user attr, and pivot tables read ``depth`` or ``width`` from it.
    """

    family: str
    resolution: int
    num_classes: int
    arch: Any
    in_chans: int = 3

    def __post_init__(self) -> None:
        fam = get_family(self.family)
        arch = self.arch
        if isinstance(arch, Mapping):
            arch = fam.arch_from_dict(arch)
        elif not isinstance(arch, fam.arch):
            raise ValueError(
                f"StudentSpec.arch: must be a {fam.arch.__name__} or a mapping of its fields for family "
                f"{self.family!r} (got {type(arch).__name__})"
            )
        object.__setattr__(self, "arch", arch)
        for key in ("resolution", "num_classes", "in_chans"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"StudentSpec.{key}: must be a positive integer (got {value!r})")

    def to_dict(self) -> dict[str, Any]:
        """``{family, resolution, num_classes, in_chans}`` plus the architecture fields, flat."""
        return {
            "family": self.family,
            "resolution": self.resolution,
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            **dataclasses.asdict(self.arch),
        }

    def size_by(self) -> dict[str, str]:
        """``{"field": <arch field>, "unit": ...}``: the field that says how big this student is
        (its family's ``size_field``), stored with each trial for the report's marker sizes."""
        fam = get_family(self.family)
        return {"field": fam.size_field, "unit": fam.size_unit}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudentSpec:
        """Inverse of :meth:`to_dict`. Also reads the first, union layout, where every family's
        fields were present and the unused ones left at None (or ``width`` at 1.0)."""
        if "family" not in data:
            raise ValueError("StudentSpec: the dict has no 'family'")
        fam = get_family(data["family"])
        arch_fields = {f.name for f in dataclasses.fields(fam.arch)}
        arch = {
            k: v for k, v in data.items()
            if k not in SPEC_KEYS and not (k not in arch_fields and k in _LEGACY_UNUSED and v == _LEGACY_UNUSED[k])
        }
        common = {k: data[k] for k in SPEC_KEYS if k in data and k != "family"}
        missing = [k for k in ("resolution", "num_classes") if k not in common]
        if missing:
            raise ValueError(f"StudentSpec: the dict has no {missing}")
        return cls(family=data["family"], arch=arch, **common)

    @classmethod
    def from_json(cls, text: str) -> StudentSpec:
        return cls.from_dict(json.loads(text))

    @property
    def label(self) -> str:
        """Short human label from the family, e.g. ``vgg8-w0.25@32`` or ``vit4-d96h3p4@32``."""
        return get_family(self.family).label(self)
