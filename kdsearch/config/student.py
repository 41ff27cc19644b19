"""The ``student`` section."""

from __future__ import annotations

from dataclasses import dataclass, field

from kdsearch.config.space import Space, space_field
from kdsearch.errors import ConfigError

VGG_DEPTHS: tuple[int, ...] = (2, 3, 4, 5, 8, 11, 13, 16, 19)
STUDENT_FAMILIES: tuple[str, ...] = ("vgg", "vit")


@dataclass(frozen=True)
class VGGPreset:
    """One named VGG student, ``(depth, width)``, for ``student.vgg.presets``.

    ``name`` is the value of the categorical ``vgg_preset`` param (default ``d{depth}-w{width}``).
    """

    depth: int | None = None  # required; None only so a missing key gets a one-line error
    width: float | None = None  # required
    name: str | None = None

    def __post_init__(self) -> None:
        for key in ("depth", "width"):
            if getattr(self, key) is None:
                raise ConfigError(f"student.vgg.presets.{key}", "is required in every preset", None,
                                  "write each preset as {depth: 5, width: 0.2, name: S}")
        if self.depth not in VGG_DEPTHS:
            raise ConfigError("student.vgg.presets.depth", f"must be one of {list(VGG_DEPTHS)}", self.depth)
        if not 1 / 128 <= self.width <= 2.0:
            raise ConfigError("student.vgg.presets.width", "must lie in [1/128, 2.0]", self.width)
        if self.name is not None and not self.name.strip():
            raise ConfigError("student.vgg.presets.name", "must not be empty", self.name)

    @property
    def display_name(self) -> str:
        return self.name or f"d{self.depth}-w{self.width:g}"


@dataclass(frozen=True)
class VGGSpaceConfig:
    """VGG students: ``depth`` x ``width``, or a fixed list of ``presets`` (one categorical
    ``vgg_preset`` param) when only some (depth, width) pairs make sense together, e.g. students
    sized to given parameter counts. ``presets`` replaces ``depth`` and ``width``."""

    depth: Space = space_field(Space(choices=VGG_DEPTHS, integer=True), kind=int, allowed=VGG_DEPTHS)
    width: Space = space_field(Space(low=1 / 64, high=1.0, log=True), minimum=1 / 128, maximum=2.0)
    presets: tuple[VGGPreset, ...] = ()


@dataclass(frozen=True)
class ViTSpaceConfig:
    depth: Space = space_field(Space(choices=(2, 4, 6), integer=True), kind=int, minimum=1, maximum=24)
    embed_dim: Space = space_field(Space(choices=(64, 96, 128, 192), integer=True), kind=int, minimum=8, maximum=1024)
    num_heads: Space = space_field(Space(choices=(2, 3, 4), integer=True), kind=int, minimum=1, maximum=16)
    patches_per_side: Space = space_field(Space(choices=(4, 8), integer=True), kind=int, minimum=1, maximum=32)  # patch = res // this


@dataclass(frozen=True)
class StudentConfig:
    family: Space = space_field(Space(choices=("vgg",)), kind=str, allowed=STUDENT_FAMILIES)
    resolution: Space = space_field(Space(choices=(32, 64, 96, 128, 160, 224), integer=True), kind=int, minimum=16, maximum=224)
    vgg: VGGSpaceConfig = field(default_factory=VGGSpaceConfig)
    vit: ViTSpaceConfig = field(default_factory=ViTSpaceConfig)


