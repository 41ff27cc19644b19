"""The ``vgg`` student family: any depth in {2, 3, 4, 5, 8, 11, 13, 16, 19}, any width multiplier.

Laid out like a timm model file: the table of layer configs, then the blocks, then the model
(``forward_features`` / ``forward_head``), then the family: its architecture record
(:class:`VGGArch`, where depth and width are checked), its study-file section (:class:`VGGConfig`,
``student.vgg``; Optuna params ``vgg_depth`` and ``vgg_width``, or ``vgg_preset``), label and the
registration.

**Depth counts weight layers** (convolutions + linear layers), as in the VGG paper's names:

===== ================================================= ====== ===== =================
depth conv widths per stage (stages split by max-pool) convs  FCs   origin
===== ================================================= ====== ===== =================
2     64                                                1      1     small student
3     64 | 128                                          2      1     small student
4     64 | 128 | 256                                    3      1     small student
5     64 | 128 | 256 | 512                              4      1     small student
8     64 | 128 | 256 | 512 | 512                        5      3     small student
11    64 | 128 | 256 256 | 512 512 | 512 512            8      3     VGG 'A'
13    64 64 | 128 128 | 256 256 | 512 512 | 512 512     10     3     VGG 'B'
16    64 64 | 128 128 | 256 x3 | 512 x3 | 512 x3        13     3     VGG 'D'
19    64 64 | 128 128 | 256 x4 | 512 x4 | 512 x4        16     3     VGG 'E'
===== ================================================= ====== ===== =================

The small students (2-5) end in one linear layer; depth 8 and up keep the standard three-layer
classifier (hidden, ReLU, dropout, hidden, ReLU, dropout, logits).

Design choices (all documented because they change parameter counts):

* Every convolution is ``Conv3x3 (no bias) -> BatchNorm -> ReLU``.
* Max-pool 2x2/2 *between* stages only, with ``ceil_mode=True``: a 1x1 map stays 1x1, and odd
  sides keep their border, so any input side (16, 32, 65, 224, ...) works without special cases.
  No pool after the last stage: the head pools globally.
* The head is ``AdaptiveAvgPool2d(1) -> flatten -> classifier``. With global pooling the
  parameter count does not depend on the input resolution.
* The FC hidden width is ``512 * width`` (the CIFAR-style VGG classifier) instead of the
  ImageNet 4096: a 4096-wide classifier would dominate every small student.
* ``width`` multiplies every channel count and the FC hidden width; each is
  ``max(1, round(c * width))``, so widths down to 1/64 (one channel in the first stage) work.
* Dropout 0.2 between the hidden FC layers (the original 0.5 is too strong for students this
  small trained inside a fixed time box; the teacher's soft targets already regularise).
* Kaiming-normal (fan-out, ReLU) convolutions, BN weight 1 / bias 0, linear N(0, 0.01) with
  zero bias, as in torchvision's VGG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kdsearch.config.space import Space, space_field
from kdsearch.errors import ConfigError
from kdsearch.models.registry import StudentFamily, register_family, section_params

if TYPE_CHECKING:
    from kdsearch.models.spec import StudentSpec

__all__ = [
    "VGG",
    "VGG_CFGS",
    "VGG_DEPTHS",
    "VGG_NUM_FC",
    "VGGArch",
    "VGGPreset",
    "VGGConfig",
    "vgg_width_for_params",
    "scaled_channels",
]

# ----------------------------------------------------------------------------------------------
# Layer configs: ints are 3x3 conv widths (before the width multiplier), "M" is a 2x2 max-pool.

VGG_CFGS: dict[int, list[int | str]] = {
    2: [64],
    3: [64, "M", 128],
    4: [64, "M", 128, "M", 256],
    5: [64, "M", 128, "M", 256, "M", 512],
    8: [64, "M", 128, "M", 256, "M", 512, "M", 512],
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}
# Number of linear layers in the classifier for each depth (depth = convs + linears).
VGG_NUM_FC: dict[int, int] = {2: 1, 3: 1, 4: 1, 5: 1, 8: 3, 11: 3, 13: 3, 16: 3, 19: 3}
VGG_DEPTHS: tuple[int, ...] = tuple(sorted(VGG_CFGS))  # every depth the table builds
FC_HIDDEN = 512  # classifier hidden width at width 1.0 (CIFAR-style; ImageNet VGG uses 4096)
DROP_RATE = 0.2


def scaled_channels(channels: int, width: float) -> int:
    """``max(1, round(channels * width))``: the channel count after the width multiplier."""
    return max(1, int(round(channels * width)))


# ----------------------------------------------------------------------------------------------
# Blocks


class ConvBlock(nn.Module):
    """Conv3x3 (no bias) -> BatchNorm -> ReLU."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class ClassifierHead(nn.Module):
    """Global average pool, flatten, then 1 linear layer or the 3-layer VGG classifier."""

    def __init__(self, in_chs: int, num_classes: int, num_fc: int, hidden: int, drop_rate: float) -> None:
        super().__init__()
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        layers: list[nn.Module] = []
        chs = in_chs
        for _ in range(num_fc - 1):
            layers += [nn.Linear(chs, hidden), nn.ReLU(inplace=True), nn.Dropout(drop_rate)]
            chs = hidden
        self.pre_logits = nn.Sequential(*layers)
        self.fc = nn.Linear(chs, num_classes)
        self.num_features = chs

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pre_logits(self.flatten(self.global_pool(x)))
        return x if pre_logits else self.fc(x)


# ----------------------------------------------------------------------------------------------
# Model


class VGG(nn.Module):
    """A VGG student. ``features`` holds the conv blocks and pools, ``head`` the classifier."""

    __jit_unused_properties__ = ["last_block"]
    student_family = "vgg"

    def __init__(
        self,
        depth: int,
        num_classes: int,
        width: float = 1.0,
        in_chans: int = 3,
        drop_rate: float = DROP_RATE,
    ) -> None:
        super().__init__()
        VGGArch(depth, width)  # validates
        if num_classes < 1:
            raise ValueError(f"num_classes: must be >= 1 (got {num_classes!r})")
        self.depth = depth
        self.width = float(width)
        self.num_classes = num_classes

        layers: list[nn.Module] = []
        chs = in_chans
        for item in VGG_CFGS[depth]:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            else:
                out = scaled_channels(int(item), width)
                layers.append(ConvBlock(chs, out))
                chs = out
        self.features = nn.Sequential(*layers)
        self.num_features = chs
        self.head = ClassifierHead(
            chs, num_classes, VGG_NUM_FC[depth], scaled_channels(FC_HIDDEN, width), drop_rate
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    @property
    def last_block(self) -> nn.Module:
        """The last conv block (a property, so it is not registered twice in the state_dict)."""
        return [m for m in self.features if isinstance(m, ConvBlock)][-1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------------------------
# Architecture record and the study file's ``student.vgg`` section

WIDTH_MIN, WIDTH_MAX = 1 / 128, 2.0  # width multipliers a study may search


@dataclass(frozen=True)
class VGGArch:
    """A VGG student's architecture: ``depth`` weight layers, channel ``width`` multiplier."""

    depth: int
    width: float = 1.0

    def __post_init__(self) -> None:
        try:
            self.check(self.depth, self.width)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        object.__setattr__(self, "depth", int(self.depth))
        object.__setattr__(self, "width", float(self.width))

    @staticmethod
    def check(depth: Any, width: Any, where: str = "student.vgg") -> None:
        """The one check of a VGG's depth and width (the model, the presets, the sizing and the
        section's depth choices use it): ``depth`` is a row of the layer table, ``width`` a
        positive number. Raises a one-line ConfigError naming ``<where>.depth`` or ``<where>.width``."""
        if isinstance(depth, bool) or depth not in VGG_CFGS:
            raise ConfigError(f"{where}.depth", f"must be one of {list(VGG_DEPTHS)}", depth)
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not (math.isfinite(width) and width > 0):
            raise ConfigError(f"{where}.width", "must be a positive number", width)


def _check_searchable_width(low: float, high: float, field: str, value: Any) -> None:
    """Widths a study may search: within [:data:`WIDTH_MIN`, :data:`WIDTH_MAX`]."""
    if low < WIDTH_MIN or high > WIDTH_MAX:
        raise ConfigError(field, "must lie in [1/128, 2.0]", value)


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
        VGGArch.check(self.depth, self.width, "student.vgg.presets")
        _check_searchable_width(self.width, self.width, "student.vgg.presets.width", self.width)  # type: ignore[arg-type]
        if self.name is not None and not self.name.strip():
            raise ConfigError("student.vgg.presets.name", "must not be empty", self.name)

    @property
    def display_name(self) -> str:
        return self.name or f"d{self.depth}-w{self.width:g}"


DEFAULT_DEPTH = Space(choices=VGG_DEPTHS, integer=True)
DEFAULT_WIDTH = Space(low=1 / 64, high=1.0, log=True)


@dataclass(frozen=True)
class VGGConfig:
    """``student.vgg``: ``depth`` x ``width``, or a fixed list of ``presets`` (one categorical
    ``vgg_preset`` param) when only some (depth, width) pairs make sense together, e.g. students
    sized to given parameter counts. ``presets`` replaces ``depth`` and ``width``."""

    depth: Space = space_field(DEFAULT_DEPTH, kind=int, allowed=VGG_DEPTHS)
    width: Space = space_field(DEFAULT_WIDTH, minimum=WIDTH_MIN, maximum=WIDTH_MAX)
    presets: tuple[VGGPreset, ...] = ()

    def __post_init__(self) -> None:
        if self.depth.choices is None:
            raise ConfigError("student.vgg.depth", f"must be a list from {list(VGG_DEPTHS)}", self.depth.to_yaml())
        for d in self.depth.choices:
            VGGArch.check(d, 1.0)
        w = self.width
        wlo = min(w.choices) if w.choices else w.low
        whi = max(w.choices) if w.choices else w.high
        _check_searchable_width(wlo, whi, "student.vgg.width", w.to_yaml())  # type: ignore[arg-type]
        if self.presets:
            names = [p.display_name for p in self.presets]
            if self.depth != DEFAULT_DEPTH or self.width != DEFAULT_WIDTH:
                raise ConfigError(
                    "student.vgg.presets", "replaces student.vgg.depth and student.vgg.width; remove those two keys", names
                )
            if len(set(names)) != len(names):
                raise ConfigError("student.vgg.presets", "need distinct names", names)
            pairs = [(p.depth, p.width) for p in self.presets]
            if len(set(pairs)) != len(pairs):
                raise ConfigError("student.vgg.presets", "must not repeat a (depth, width) pair", names)


# ----------------------------------------------------------------------------------------------
# The family: search, build, label


def vgg_params(section: VGGConfig) -> dict[str, Space]:
    """One categorical ``vgg_preset`` when the study lists presets (named (depth, width) pairs
    instead of a cross product), else the section's keys (``vgg_depth``, ``vgg_width``)."""
    if section.presets:
        return {"vgg_preset": Space(choices=tuple(p.display_name for p in section.presets))}
    return section_params("vgg", section)


def vgg_arch(section: VGGConfig, values: dict[str, Any], resolution: int) -> VGGArch:
    """The arch of the drawn preset, or of the drawn depth and width; the resolution does not
    constrain a VGG."""
    if "preset" in values:
        preset = next(p for p in section.presets if p.display_name == values["preset"])
        return VGGArch(depth=int(preset.depth), width=float(preset.width))  # type: ignore[arg-type]
    return VGGArch(**values)


def build_vgg(spec: StudentSpec) -> VGG:
    arch: VGGArch = spec.arch
    return VGG(depth=arch.depth, num_classes=spec.num_classes, width=arch.width, in_chans=spec.in_chans)


def vgg_label(spec: StudentSpec) -> str:
    """``vgg{depth}-w{width}@{resolution}``, e.g. ``vgg8-w0.25@32``."""
    return f"vgg{spec.arch.depth}-w{spec.arch.width:.3g}@{spec.resolution}"


register_family(
    StudentFamily(
        name="vgg",
        section=VGGConfig,
        arch=VGGArch,
        build=build_vgg,
        label=vgg_label,
        search_params=vgg_params,
        arch_from_params=vgg_arch,
    )
)


# ----------------------------------------------------------------------------------------------
# Sizing


def vgg_width_for_params(
    depth: int,
    target_params: float,
    num_classes: int = 10,
    resolution: int = 32,
    in_chans: int = 3,
    min_width: float = 1 / 512,
    max_width: float = 16.0,
) -> float:
    """The width multiplier whose VGG-``depth`` has the parameter count closest to ``target_params``.

    Bisection (in log-width) over the real parameter count of the built model (built on the
    ``meta`` device, so it costs no memory); the count is a non-decreasing step function of the
    width. Of the two widths that bracket the target, the closer count wins; the width returned
    is the shortest decimal that gives exactly that count (e.g. ``0.4`` rather than
    ``0.40039...``). ``resolution`` does not change the count (global-pool head) and is kept for
    the signature's symmetry with the spec. Raises ``ValueError`` when the target is outside what
    ``[min_width, max_width]`` can reach.
    """
    VGGArch(depth)  # validates
    if not target_params > 0:
        raise ValueError(f"target_params: must be > 0 (got {target_params!r})")

    def count(w: float) -> int:
        with torch.device("meta"):
            model = VGG(depth=depth, num_classes=num_classes, width=w, in_chans=in_chans)
        return sum(p.numel() for p in model.parameters())

    lo, hi = float(min_width), float(max_width)
    c_lo, c_hi = count(lo), count(hi)
    if c_hi < target_params or c_lo > target_params:
        raise ValueError(
            f"VGG-{depth} spans {c_lo} to {c_hi} parameters for widths {lo:g} to {hi:g}; "
            f"cannot reach {target_params:g}"
        )
    # Invariant: count(lo) < target <= count(hi) (unless the target equals the minimum).
    if c_lo >= target_params:
        best = lo
    else:
        for _ in range(80):
            mid = math.sqrt(lo * hi)
            if count(mid) >= target_params:
                hi = mid
            else:
                lo = mid
            if hi / lo - 1 < 1e-9:
                break
        best = lo if abs(count(lo) - target_params) < abs(count(hi) - target_params) else hi
    want = count(best)
    for digits in range(1, 12):
        nice = float(f"{best:.{digits}g}")
        if nice > 0 and count(nice) == want:
            return nice
    return best
