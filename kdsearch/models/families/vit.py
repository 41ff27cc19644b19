"""The ``vit`` student family: a timm ``VisionTransformer`` backbone plus a separate linear head.

The model is a thin wrapper so that the student contract is exact:

* ``features`` is a timm :class:`~timm.models.vision_transformer.VisionTransformer` built with
  ``num_classes=0``: patch embedding, class token, position embedding, the blocks, the final
  norm and the token pooling. It holds every parameter except the classifier.
* ``head`` is the ``nn.Linear(embed_dim, num_classes)`` classifier, and nothing else, so
  "freeze everything except the head" is ``requires_grad=False`` on all parameters and then
  ``True`` on ``model.head.parameters()``.
* ``last_block`` is ``features.blocks[-1]`` (a property, so it is not registered twice).

``forward_features`` returns the token sequence ``[B, N, embed_dim]``; ``forward_head`` pools it
(class token for ``global_pool='token'``, mean of patch tokens for ``'avg'``) and classifies.
State-dict keys are the timm keys prefixed with ``features.``, plus ``head.weight``/``head.bias``.

The family: :class:`ViTArch` (depth, embed_dim, num_heads, patch_size in px), the study file's
``student.vit`` section (:class:`ViTConfig`; Optuna params ``vit_num_heads``, ``vit_embed_dim``,
``vit_patches_per_side``, ``vit_depth``), a preflight check that every resolution the study can
propose has a patch size, the label, and the two token parameters kept out of weight decay.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from kdsearch.config.space import Space, space_field
from kdsearch.errors import ConfigError
from kdsearch.models.backbone import TimmBackboneStudent
from kdsearch.models.registry import StudentFamily, register_family

if TYPE_CHECKING:
    from kdsearch.models.spec import StudentSpec

__all__ = ["ViTStudent", "ViTArch", "ViTConfig", "vit_patch_size", "check_patch_grid"]

GLOBAL_POOLS = ("token", "avg")


def vit_patch_size(resolution: int, patches_per_side: int) -> int:
    """Patch side in pixels for ``patches_per_side`` patches across a ``resolution`` image.

    The nominal size is ``resolution // patches_per_side`` (at least 2). The result is the
    largest divisor of ``resolution`` that is >= 2 and <= the nominal size, so the patch grid is
    integral and has at least ``patches_per_side`` patches per side (more only when the nominal
    size does not divide the resolution, or when the 2-pixel minimum applies). E.g. 32/4 -> 8,
    224/8 -> 28, 65/4 -> 13 (5 x 5 patches), 65/8 -> 5 (13 x 13 patches). Raises
    ``ValueError`` when no divisor in ``[2, nominal]`` exists (for example a prime resolution).
    """
    if resolution < 2:
        raise ValueError(f"student.resolution: must be >= 2 pixels for a ViT (got {resolution!r})")
    if patches_per_side < 1:
        raise ValueError(f"student.vit.patches_per_side: must be >= 1 (got {patches_per_side!r})")
    nominal = max(2, resolution // patches_per_side)
    for p in range(nominal, 1, -1):
        if resolution % p == 0:
            return p
    raise ValueError(
        f"student.resolution: {resolution} px has no patch size in [2, {nominal}] that divides it "
        f"(patches_per_side={patches_per_side}); choose a resolution with more divisors, e.g. a multiple of 8"
    )


@dataclass(frozen=True)
class ViTArch:
    """A ViT student's architecture: ``depth`` blocks of width ``embed_dim`` with ``num_heads``
    heads, on ``patch_size`` x ``patch_size`` px patches."""

    depth: int
    embed_dim: int
    num_heads: int
    patch_size: int

    def __post_init__(self) -> None:
        for name in ("depth", "embed_dim", "num_heads", "patch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"student.vit.{name}: must be a positive integer for a ViT student (got {value!r})")
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(
                f"student.vit.embed_dim: must be divisible by num_heads (got embed_dim={self.embed_dim}, "
                f"num_heads={self.num_heads}); choose heads that divide the embedding width"
            )


def check_patch_grid(arch: ViTArch, resolution: int) -> None:
    """Raise ``ValueError`` (one line) unless ``arch.patch_size`` divides ``resolution``."""
    if arch.patch_size > resolution or resolution % arch.patch_size != 0:
        raise ValueError(
            f"student.vit.patch_size: must divide the resolution (got patch_size={arch.patch_size}, "
            f"resolution={resolution}); use vit_patch_size(resolution, patches_per_side)"
        )


class ViTStudent(TimmBackboneStudent):
    """A small ViT: timm VisionTransformer features (``num_classes=0``) + linear ``head``."""

    student_family = "vit"

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        num_classes: int,
        in_chans: int = 3,
        global_pool: str = "token",
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool: must be one of {GLOBAL_POOLS} (got {global_pool!r})")
        check_patch_grid(ViTArch(depth, embed_dim, num_heads, patch_size), img_size)
        if num_classes < 1:
            raise ValueError(f"num_classes: must be >= 1 (got {num_classes!r})")
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.features = VisionTransformer(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            global_pool=global_pool,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            class_token=global_pool == "token",
            drop_path_rate=drop_path_rate,
        )
        self.head = nn.Linear(embed_dim, num_classes)
        trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)



# ----------------------------------------------------------------------------------------------
# The study file's ``student.vit`` section and the family


@dataclass(frozen=True)
class ViTConfig:
    """``student.vit``: the patch size follows the resolution (``resolution // patches_per_side``,
    see :func:`vit_patch_size`); a sampled width is rounded up to a multiple of the heads. The keys
    are in the order a trial draws them (so a seeded study keeps drawing the same students)."""

    num_heads: Space = space_field(Space(choices=(2, 3, 4), integer=True), kind=int, minimum=1, maximum=16)
    embed_dim: Space = space_field(Space(choices=(64, 96, 128, 192), integer=True), kind=int, minimum=8, maximum=1024)
    patches_per_side: Space = space_field(Space(choices=(4, 8), integer=True), kind=int, minimum=1, maximum=32)
    depth: Space = space_field(Space(choices=(2, 4, 6), integer=True), kind=int, minimum=1, maximum=24)


def vit_arch(section: ViTConfig, values: dict[str, Any], resolution: int) -> ViTArch:
    """The drawn heads, width, patches per side and depth as an arch: the width rounded up to a
    multiple of the heads (documented in the README), so every drawn combination is a valid
    model, and the patch size from the resolution."""
    heads = int(values["num_heads"])
    dim = -(-int(values["embed_dim"]) // heads) * heads
    patch = vit_patch_size(resolution, int(values["patches_per_side"]))
    return ViTArch(depth=int(values["depth"]), embed_dim=dim, num_heads=heads, patch_size=patch)


def _int_values(space: Space) -> list[int]:
    if space.choices is not None:
        return [int(v) for v in space.choices]
    return list(range(int(space.low), int(space.high) + 1, int(space.step or 1)))  # type: ignore[arg-type]


def preflight_vit(section: ViTConfig, resolutions: Sequence[int]) -> None:
    """Every resolution a ViT trial can be proposed must have a patch size for every
    ``patches_per_side`` choice; otherwise trials would be wasted on invalid students."""
    for res in resolutions:
        for n in _int_values(section.patches_per_side):
            try:
                vit_patch_size(res, n)
            except ValueError:
                raise ConfigError(
                    "student.resolution",
                    f"a ViT student needs a resolution with a patch size that divides it ({res} px has none "
                    f"for patches_per_side={n})",
                    res,
                    "use a list or a range with step: 8",
                ) from None


def build_vit(spec: StudentSpec) -> ViTStudent:
    """Class-token ViT with mlp_ratio 4 and no stochastic depth (students are small, boxes short)."""
    arch: ViTArch = spec.arch
    return ViTStudent(
        img_size=spec.resolution,
        patch_size=arch.patch_size,
        embed_dim=arch.embed_dim,
        depth=arch.depth,
        num_heads=arch.num_heads,
        num_classes=spec.num_classes,
        in_chans=spec.in_chans,
    )


def vit_label(spec: StudentSpec) -> str:
    """``vit{depth}-d{embed_dim}h{num_heads}p{patch_size}@{resolution}``, e.g. ``vit4-d96h3p4@32``."""
    a: ViTArch = spec.arch
    return f"vit{a.depth}-d{a.embed_dim}h{a.num_heads}p{a.patch_size}@{spec.resolution}"


register_family(
    StudentFamily(
        name="vit",
        section=ViTConfig,
        arch=ViTArch,
        build=build_vit,
        label=vit_label,
        arch_from_params=vit_arch,
        no_weight_decay=("features.pos_embed", "features.cls_token"),  # besides norms and biases
        preflight=preflight_vit,
        size_unit="blocks",
    )
)
