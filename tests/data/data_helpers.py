"""Helpers for the data tests: tiny image files with known pixels."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

# One colour per class: decoded PNG pixels must come back exactly (PNG is lossless).
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "ant": (200, 30, 30),
    "bee": (30, 200, 30),
    "cat": (30, 30, 200),
}

MakeTree = Callable[..., Path]


def write_png(path: Path, colour: tuple[int, int, int], size: tuple[int, int], seed: int) -> None:
    """A ``size`` = (width, height) px PNG: the class colour plus a small seeded texture."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    arr = np.empty((h, w, 3), dtype=np.uint8)
    arr[:] = colour
    arr[..., 0] += rng.integers(0, 20, size=(h, w), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
