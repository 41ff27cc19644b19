"""Resizing images to the *stored* square size (done once at load time, not per trial)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["resize_square_u8"]


def resize_square_u8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Scale the shorter side to ``size`` px (bilinear, antialiased), then centre-crop ``size x size``.

    ``images`` is uint8 ``[3, H, W]`` or ``[N, 3, H, W]``; the result has the same rank, uint8,
    rounded to nearest. Images already ``size x size`` come back unchanged (same tensor).
    """
    single = images.dim() == 3
    x = images[None] if single else images
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if h == size and w == size:
        return images
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        xf = F.interpolate(
            x.to(torch.float32), size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1
        )
        x = xf.round_().clamp_(0, 255).to(torch.uint8)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top : top + size, left : left + size].contiguous()
    return x[0] if single else x
