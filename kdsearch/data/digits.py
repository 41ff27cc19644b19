"""scikit-learn's bundled handwritten digits (1,797 images, 8 x 8 grey, 10 classes; offline)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["DIGITS_TEST_FRACTION", "DIGITS_TEST_SEED", "load_digits_arrays"]

# scikit-learn ships no test split, so one is carved: 20 % of every class, with a fixed seed so the
# test images are the same whatever data.seed is (data.seed still steers the val split).
DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_SEED = 0


def load_digits_arrays(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as uint8 ``[N, 3, S, S]`` (grey replicated to RGB) and int64 labels.

    The 0..16 grey levels are scaled to 0..255, then upsampled to ``image_size`` px (bilinear).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    grey = torch.from_numpy(bunch.images).to(torch.float32) * (255.0 / 16.0)  # [N, 8, 8]
    x = grey[:, None]
    if image_size != 8:
        x = F.interpolate(
            x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=image_size < 8
        )
    x = x.round_().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(bunch.target).to(torch.int64)
