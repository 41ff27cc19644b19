"""The student contract for families built on a timm backbone: ``features`` + a linear ``head``.

A family whose model is a timm network created with ``num_classes=0`` subclasses
:class:`TimmBackboneStudent`, sets ``self.features`` (the timm model) and ``self.head`` (an
``nn.Linear`` on its pooled features) in ``__init__``, and gets ``forward_features``,
``forward_head``, ``forward`` and ``last_block`` (the backbone's last block, which fine-tuning may
unfreeze) the same way as every other family.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TimmBackboneStudent"]


class TimmBackboneStudent(nn.Module):
    """timm features (``num_classes=0``, so their own head is the identity) + linear ``head``."""

    __jit_unused_properties__ = ["last_block"]
    features: nn.Module
    head: nn.Linear

    @property
    def last_block(self) -> nn.Module:
        return self.features.blocks[-1]  # type: ignore[index]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's output before pooling (a feature map for CNNs, tokens for a ViT)."""
        return self.features.forward_features(x)  # type: ignore[operator]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.features.forward_head(x, pre_logits=True)  # type: ignore[operator]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
