"""StudentSpec: the plain description that fully determines a student model."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

__all__ = ["StudentSpec"]


@dataclass(frozen=True)
class StudentSpec:
    """Everything needed to rebuild a student, and nothing else.

    ``family`` selects the builder in :mod:`kdsearch.models.registry`. VGG uses ``depth`` and
    ``width`` (a multiplier on the standard VGG channel widths); ViT uses ``depth``,
    ``embed_dim``, ``num_heads`` and ``patch_size`` (pixels). ``resolution`` is the input side
    length in pixels the student is trained and measured at.
    """

    family: str
    depth: int
    resolution: int
    num_classes: int
    width: float = 1.0
    embed_dim: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    in_chans: int = 3

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudentSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"StudentSpec: unknown fields {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> StudentSpec:
        return cls.from_dict(json.loads(text))

    @property
    def label(self) -> str:
        """Short human label, e.g. ``vgg8-w0.25@32`` or ``vit4-d96h3p4@32``."""
        if self.family == "vit":
            return f"vit{self.depth}-d{self.embed_dim}h{self.num_heads}p{self.patch_size}@{self.resolution}"
        return f"{self.family}{self.depth}-w{self.width:.3g}@{self.resolution}"
