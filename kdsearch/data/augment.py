"""Augmented views on the device: pad-and-crop plus horizontal flip, stored as small integers.

A *view* of one image is ``(dy, dx, flip)`` (int16): zero-pad the stored ``S x S`` image by
``padding`` pixels on each side, take the ``S x S`` crop whose top-left corner is at ``(dy, dx)``
of the padded image (so ``dy, dx`` are in ``[0, 2 * padding]``), then mirror it left-right when
``flip`` is 1. ``(padding, padding, 0)`` is the identity. Because a view is just three integers,
the teacher cache stores the exact views its logits were computed on, and a student trained later
sees bit-identical pixels (:func:`apply_views` is a pure gather, then fixed float ops).

Everything runs on the images' device and is vectorised over the batch: no Python loop over
images, no host round trip.

CPU and CUDA agree bit for bit, on purpose. Bytes become floats through a 256-entry float32
lookup table (:func:`unit_scale_table`: ``v / 255`` divided once, in float64 on the CPU, and
rounded to float32), gathered on the images' device. A gather is exact on every device, whereas
``x.div_(255.0)`` is not: CUDA turns a division by a scalar into a multiplication by its
reciprocal, which is one ulp off for 126 of the 256 byte values. The normalisation that follows,
``(x - mean) / std`` with per-channel tensors, is an IEEE subtraction and division on both
devices. The bilinear resize is exact only when it is a no-op (output size = stored size);
a real resize may differ in the last bits between devices, as CUDA and CPU kernels sum in a
different order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kdsearch.config.sections import INTERPOLATIONS  # resize modes (torch interpolate names)

__all__ = [
    "ViewSpec",
    "sample_views",
    "identity_views",
    "apply_views",
    "preprocess",
    "gather_crops",
    "unit_scale_table",
    "INTERPOLATIONS",
]



@dataclass(frozen=True)
class ViewSpec:
    """One augmentation family: zero-pad by ``padding`` px, random ``image_size`` crop, optional flip."""

    image_size: int  # stored side, px
    padding: int  # px of zero padding on each side before the crop
    flip: bool

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"ViewSpec.image_size must be >= 1 px, got {self.image_size}")
        if self.padding < 0:
            raise ValueError(f"ViewSpec.padding must be >= 0 px, got {self.padding}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViewSpec:
        return cls(image_size=int(data["image_size"]), padding=int(data["padding"]), flip=bool(data["flip"]))


def sample_views(n_images: int, n_views: int, spec: ViewSpec, generator: torch.Generator) -> torch.Tensor:
    """Random views, int16 ``[n_views, n_images, 3]`` of ``(dy, dx, flip)``, on the generator's device.

    ``dy, dx`` are uniform in ``[0, 2 * padding]``; ``flip`` is uniform in ``{0, 1}`` (always 0
    when ``spec.flip`` is false). Same generator state, same views.
    """
    dev = generator.device
    offsets = torch.randint(0, 2 * spec.padding + 1, (n_views, n_images, 2), generator=generator, device=dev)
    if spec.flip:
        flips = torch.randint(0, 2, (n_views, n_images, 1), generator=generator, device=dev)
    else:
        flips = torch.zeros((n_views, n_images, 1), dtype=torch.int64, device=dev)
    return torch.cat([offsets, flips], dim=2).to(torch.int16)


def identity_views(
    n_images: int, padding: int | ViewSpec, device: torch.device | str | None = None
) -> torch.Tensor:
    """The centre crop without flip, int16 ``[n_images, 3]`` of ``(padding, padding, 0)``.

    ``padding`` (px, or the :class:`ViewSpec` the views will be applied with) is required: the
    identity crop of a padded image sits at ``(padding, padding)``, not at ``(0, 0)``.
    """
    p = padding.padding if isinstance(padding, ViewSpec) else int(padding)
    out = torch.zeros((n_images, 3), dtype=torch.int16, device=device)
    out[:, 0] = p
    out[:, 1] = p
    return out


_NORM_CACHE: dict[
    tuple[tuple[float, ...], tuple[float, ...], torch.device], tuple[torch.Tensor, torch.Tensor]
] = {}


_LUT_CACHE: dict[torch.device, torch.Tensor] = {}


def unit_scale_table(device: torch.device | str | None = None) -> torch.Tensor:
    """float32 ``[256]``: entry ``v`` is ``v / 255`` correctly rounded, on ``device`` (cached).

    Computed once on the CPU in float64, then copied: the same 256 values on every device, so
    mapping bytes through it is bit-identical on the CPU and on CUDA.
    """
    dev = torch.device("cpu") if device is None else torch.device(device)
    hit = _LUT_CACHE.get(dev)
    if hit is None:
        table = (torch.arange(256, dtype=torch.float64) / 255.0).to(torch.float32)
        hit = _LUT_CACHE[dev] = table.to(dev)
    return hit


def _bytes_to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1] through :func:`unit_scale_table` (a gather: exact everywhere)."""
    table = unit_scale_table(images_u8.device)
    flat = table.index_select(0, images_u8.reshape(-1).to(torch.int32))
    return flat.view(images_u8.shape)


def _norm_tensors(
    mean: Sequence[float], std: Sequence[float], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached so the hot path does not copy two 3-element tensors to the device every batch.
    key = (tuple(float(m) for m in mean), tuple(float(s) for s in std), device)
    hit = _NORM_CACHE.get(key)
    if hit is None:
        m = torch.tensor(key[0], dtype=torch.float32, device=device).view(1, 3, 1, 1)
        s = torch.tensor(key[1], dtype=torch.float32, device=device).view(1, 3, 1, 1)
        hit = _NORM_CACHE[key] = (m, s)
    return hit


def _to_model_input(
    images_u8: torch.Tensor,
    out_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype,
    channels_last: bool,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """uint8 [B,3,S,S] -> float in [0, 1], resize to ``out_size`` px, normalise, cast."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {list(INTERPOLATIONS)}, got {interpolation!r}")
    x = _bytes_to_unit(images_u8)
    side = int(images_u8.shape[-1])
    if out_size != side or images_u8.shape[-2] != out_size:
        if interpolation == "nearest":
            x = F.interpolate(x, size=(out_size, out_size), mode="nearest")
        else:
            # Antialias only matters (and only costs) when shrinking.
            x = F.interpolate(
                x, size=(out_size, out_size), mode=interpolation, align_corners=False, antialias=out_size < side
            )
            if interpolation == "bicubic":
                x = x.clamp_(0.0, 1.0)  # cubic overshoots; a resized 8-bit image cannot
    m, s = _norm_tensors(mean, std, x.device)
    x = (x - m) / s
    if dtype != torch.float32:
        x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def gather_crops(
    images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor | None, h: int, w: int
) -> torch.Tensor:
    """Per-image ``h x w`` crops of ``images`` ``[B, C, H, W]`` (any dtype) at top-left ``(dy, dx)``
    (int64 ``[B]``), mirrored left-right where ``flip`` (bool ``[B]``) is true. One gather, no loop."""
    b, c, _, wp = images.shape
    dev = images.device
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = dy[:, None] + ar_h  # [B, h]
    cols = dx[:, None] + ar_w  # [B, w]
    if flip is not None:
        cols = torch.where(flip[:, None], dx[:, None] + (w - 1 - ar_w), cols)
    flat = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return images.reshape(b, c, -1).gather(2, flat).reshape(b, c, h, w)


def apply_views(
    images_u8: torch.Tensor,
    views: torch.Tensor,
    spec: ViewSpec,
    out_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """Model input for ``images_u8`` (uint8 ``[B, 3, S, S]``) seen through ``views`` (``[B, 3]``).

    Zero-pad by ``spec.padding`` px, gather the ``S x S`` crop at ``(dy, dx)``, mirror where
    ``flip`` is 1, scale to [0, 1], resize to ``out_size`` px (``interpolation``: bilinear by
    default, or bicubic, both antialiased when shrinking, or nearest) and normalise with ``mean``/``std`` (0..1 scale). Runs on the images' device;
    ``views`` is moved there. Returns ``[B, 3, out_size, out_size]`` in ``dtype``.
    ``dy, dx`` must lie in ``[0, 2 * padding]`` (not checked: that would sync the device).
    """
    if images_u8.dim() != 4 or images_u8.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, S, S], got {tuple(images_u8.shape)}")
    b, c, h, w = images_u8.shape
    if h != spec.image_size or w != spec.image_size:
        raise ValueError(f"images are {h}x{w} px but the ViewSpec is for {spec.image_size} px")
    if views.shape != (b, 3):
        raise ValueError(f"views must be [{b}, 3], got {tuple(views.shape)}")
    p = spec.padding
    v = views.to(device=images_u8.device, dtype=torch.int64)
    padded = F.pad(images_u8, (p, p, p, p)) if p > 0 else images_u8
    crops = gather_crops(padded, v[:, 0], v[:, 1], v[:, 2] != 0, h, w)
    return _to_model_input(crops, out_size, mean, std, dtype, channels_last, interpolation)


def preprocess(
    images_u8: torch.Tensor,
    out_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """Evaluation input: no crop, no flip; resize to ``out_size`` px and normalise.

    Equal, bit for bit, to :func:`apply_views` with :func:`identity_views`.
    """
    if images_u8.dim() != 4 or images_u8.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, S, S], got {tuple(images_u8.shape)}")
    return _to_model_input(images_u8, out_size, mean, std, dtype, channels_last, interpolation)
