"""The ``mobilenetv3`` student family: timm's MobileNetV3, the edge-typical CNN, built by timm.

The network is whatever ``timm.create_model`` builds for a registered MobileNetV3 name, so the
layer table is timm's (``timm/models/mobilenetv3.py``: inverted-residual blocks with squeeze-and-
excite and hard-swish, a 32x stride, global pooling, then a 1x1 "efficient head" convolution to
1024 (small) or 1280 (large) features). Three things are searched, through timm's own arguments:

* ``size``: ``small`` or ``large`` (timm's two MobileNetV3 layer tables);
* ``channel_multiplier``: the width multiplier. ``timm.create_model`` fixes it per registered
  name (``mobilenetv3_small_050`` is 0.5; passing ``channel_multiplier=`` is a TypeError), so the
  choices are the widths timm registers (:data:`TIMM_WIDTHS`: small 0.5 / 0.75 / 1.0, large
  0.75 / 1.0), checked when the study file is loaded;
* ``depth_multiplier``: timm's ``depth_multiplier`` keyword, which scales the repeats of every
  stage (rounded up, so at least one block each).

The global pool makes any resolution from 16 px up work with the same parameter count.

The model is a thin wrapper, like the ViT student's: ``features`` is the timm model built with
``num_classes=0`` (stem, blocks, pooling, head convolution); ``head`` is the final
``nn.Linear(head_hidden_size, num_classes)``; ``last_block`` is ``features.blocks[-1]`` (the
last stage: a 1x1 conv-BN-hard-swish). ``forward_features`` returns the last stage's map
``[B, C, H/32, W/32]``; ``forward_head`` pools, applies the head convolution and classifies.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import timm
from torch import nn

from kdsearch.config.space import Space, space_field
from kdsearch.errors import ConfigError
from kdsearch.models.backbone import TimmBackboneStudent
from kdsearch.models.registry import StudentFamily, register_family

if TYPE_CHECKING:
    from kdsearch.models.spec import StudentSpec

__all__ = ["MobileNetV3Student", "MobileNetV3Arch", "MobileNetV3Config", "TIMM_WIDTHS", "timm_name"]

SIZES: tuple[str, ...] = ("small", "large")


def _registered_widths() -> dict[str, tuple[float, ...]]:
    """``size -> channel multipliers`` of timm's registered ``mobilenetv3_<size>_<width x 100>``."""
    out: dict[str, list[float]] = {size: [] for size in SIZES}
    for name in timm.list_models("mobilenetv3_*"):
        m = re.fullmatch(r"mobilenetv3_(small|large)_(\d{3})", name)  # not _150d (a deeper stem) or _rw
        if m:
            out[m.group(1)].append(int(m.group(2)) / 100)
    return {size: tuple(sorted(ws)) for size, ws in out.items()}


TIMM_WIDTHS: dict[str, tuple[float, ...]] = _registered_widths()
"""The channel multipliers timm registers for each size, e.g. ``{"small": (0.5, 0.75, 1.0), ...}``."""

DEPTH_MIN, DEPTH_MAX = 0.1, 2.0  # depth multipliers a study may search


def timm_name(size: str, channel_multiplier: float) -> str:
    """``mobilenetv3_small_050`` for ``("small", 0.5)``: the timm model that has this width."""
    return f"mobilenetv3_{size}_{round(channel_multiplier * 100):03d}"


def _check_width(size: str, width: float, field: str) -> None:
    if width not in TIMM_WIDTHS.get(size, ()):
        raise ConfigError(
            field,
            f"timm registers mobilenetv3_{size} at channel multipliers {list(TIMM_WIDTHS.get(size, ()))}",
            width,
            "choose one of those, or the other size",
        )


@dataclass(frozen=True)
class MobileNetV3Arch:
    """A MobileNetV3 student: timm's ``size`` table at ``channel_multiplier`` x the widths and
    ``depth_multiplier`` x the repeats of every stage."""

    size: str
    channel_multiplier: float
    depth_multiplier: float = 1.0

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"student.mobilenetv3.size: must be one of {list(SIZES)} (got {self.size!r})")
        try:
            _check_width(self.size, self.channel_multiplier, "student.mobilenetv3.channel_multiplier")
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        d = self.depth_multiplier
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (math.isfinite(d) and d > 0):
            raise ValueError(f"student.mobilenetv3.depth_multiplier: must be a positive number (got {d!r})")
        object.__setattr__(self, "channel_multiplier", float(self.channel_multiplier))
        object.__setattr__(self, "depth_multiplier", float(d))


class MobileNetV3Student(TimmBackboneStudent):
    """timm MobileNetV3 features (``num_classes=0``) + linear ``head``."""

    student_family = "mobilenetv3"

    def __init__(
        self,
        size: str,
        channel_multiplier: float,
        depth_multiplier: float,
        num_classes: int,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        MobileNetV3Arch(size, channel_multiplier, depth_multiplier)  # validates
        if num_classes < 1:
            raise ValueError(f"num_classes: must be >= 1 (got {num_classes!r})")
        self.num_classes = num_classes
        self.features = timm.create_model(
            timm_name(size, channel_multiplier),
            pretrained=False,
            num_classes=0,
            in_chans=in_chans,
            depth_multiplier=depth_multiplier,
        )
        self.num_features = self.features.num_features  # channels of forward_features
        self.head = nn.Linear(self.features.head_hidden_size, num_classes)
        # timm's classifier init for this family (efficientnet_init_weights): U(+-1/sqrt(fan_out)).
        bound = 1.0 / math.sqrt(num_classes)
        nn.init.uniform_(self.head.weight, -bound, bound)
        nn.init.zeros_(self.head.bias)



# ----------------------------------------------------------------------------------------------
# The study file's ``student.mobilenetv3`` section and the family


@dataclass(frozen=True)
class MobileNetV3Config:
    """``student.mobilenetv3``: every (size, channel_multiplier) pair the lists can form must be
    a width timm registers (:data:`TIMM_WIDTHS`)."""

    size: Space = space_field(Space(choices=("small",)), kind=str, allowed=SIZES)
    channel_multiplier: Space = space_field(Space(choices=(0.5, 0.75, 1.0)), minimum=0.1, maximum=2.0)
    depth_multiplier: Space = space_field(Space(choices=(0.5, 0.75, 1.0)), minimum=DEPTH_MIN, maximum=DEPTH_MAX)

    def __post_init__(self) -> None:
        if self.channel_multiplier.choices is None:
            raise ConfigError(
                "student.mobilenetv3.channel_multiplier",
                f"must be a list from timm's widths {TIMM_WIDTHS}",
                self.channel_multiplier.to_yaml(),
            )
        for size in self.size.values():
            for width in self.channel_multiplier.choices:
                _check_width(size, width, "student.mobilenetv3.channel_multiplier")


def build_mobilenetv3(spec: StudentSpec) -> MobileNetV3Student:
    a: MobileNetV3Arch = spec.arch
    return MobileNetV3Student(a.size, a.channel_multiplier, a.depth_multiplier, spec.num_classes, spec.in_chans)


def mobilenetv3_label(spec: StudentSpec) -> str:
    """``mnv3-{size}-w{channel_multiplier}-d{depth_multiplier}@{resolution}``, e.g. ``mnv3-small-w0.5-d0.75@32``."""
    a: MobileNetV3Arch = spec.arch
    return f"mnv3-{a.size}-w{a.channel_multiplier:g}-d{a.depth_multiplier:g}@{spec.resolution}"


register_family(
    StudentFamily(
        name="mobilenetv3",
        section=MobileNetV3Config,
        arch=MobileNetV3Arch,
        build=build_mobilenetv3,
        label=mobilenetv3_label,
        size_field="depth_multiplier",
        size_unit="x the repeats of every stage",
    )
)
