"""Small ViT students: a timm ``VisionTransformer`` backbone plus a separate linear head.

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
"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from kdsearch.models.registry import register_student
from kdsearch.models.spec import StudentSpec

__all__ = ["ViTStudent", "vit_patch_size", "validate_vit_spec"]

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


def validate_vit_spec(spec: StudentSpec) -> None:
    """Raise ``ValueError`` (one line naming the field) when ``spec`` cannot be a ViT student."""
    for name in ("embed_dim", "num_heads", "patch_size"):
        value = getattr(spec, name)
        if value is None or value < 1:
            raise ValueError(
                f"student.vit.{name}: must be a positive integer for a ViT student (got {value!r})"
            )
    if spec.depth < 1:
        raise ValueError(f"student.vit.depth: must be >= 1 (got {spec.depth!r})")
    assert spec.embed_dim is not None and spec.num_heads is not None and spec.patch_size is not None
    if spec.embed_dim % spec.num_heads != 0:
        raise ValueError(
            f"student.vit.embed_dim: must be divisible by num_heads (got embed_dim={spec.embed_dim}, "
            f"num_heads={spec.num_heads}); choose heads that divide the embedding width"
        )
    if spec.patch_size > spec.resolution or spec.resolution % spec.patch_size != 0:
        raise ValueError(
            f"student.vit.patch_size: must divide the resolution (got patch_size={spec.patch_size}, "
            f"resolution={spec.resolution}); use vit_patch_size(resolution, patches_per_side)"
        )
    if spec.num_classes < 1:
        raise ValueError(f"num_classes: must be >= 1 (got {spec.num_classes!r})")


class ViTStudent(nn.Module):
    """A small ViT: timm VisionTransformer features (``num_classes=0``) + linear ``head``."""

    __jit_unused_properties__ = ["last_block"]

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
        validate_vit_spec(
            StudentSpec(
                "vit",
                depth,
                img_size,
                num_classes,
                embed_dim=embed_dim,
                num_heads=num_heads,
                patch_size=patch_size,
                in_chans=in_chans,
            )
        )
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

    @property
    def last_block(self) -> nn.Module:
        return self.features.blocks[-1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the last block and norm: ``[B, num_prefix + num_patches, embed_dim]``."""
        return self.features.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.features.forward_head(x, pre_logits=True)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_student("vit")
def build_vit(spec: StudentSpec) -> ViTStudent:
    """Class-token ViT with mlp_ratio 4 and no stochastic depth (students are small, boxes short)."""
    validate_vit_spec(spec)
    assert spec.embed_dim is not None and spec.num_heads is not None and spec.patch_size is not None
    return ViTStudent(
        img_size=spec.resolution,
        patch_size=spec.patch_size,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        num_classes=spec.num_classes,
        in_chans=spec.in_chans,
    )
