"""Views: sampling, exact application, identity == preprocess, resizing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdsearch.data import ViewSpec, apply_views, gather_crops, identity_views, preprocess, sample_views
from kdsearch.data.augment import unit_scale_table

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.3)


def _random_images(n: int, side: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8)


def test_sample_views_ranges_dtype_and_seed() -> None:
    spec = ViewSpec(image_size=32, padding=4, flip=True)
    v = sample_views(500, 3, spec, torch.Generator().manual_seed(1))
    assert v.shape == (3, 500, 3) and v.dtype == torch.int16
    assert int(v[..., :2].min()) == 0 and int(v[..., :2].max()) == 8
    assert set(v[..., 2].unique().tolist()) == {0, 1}
    assert torch.equal(v, sample_views(500, 3, spec, torch.Generator().manual_seed(1)))
    no_flip = sample_views(50, 2, ViewSpec(32, 2, False), torch.Generator().manual_seed(1))
    assert int(no_flip[..., 2].abs().sum()) == 0 and int(no_flip[..., :2].max()) <= 4
    assert ViewSpec.from_dict(spec.to_dict()) == spec


def test_identity_views_need_the_padding() -> None:
    spec = ViewSpec(image_size=8, padding=3, flip=True)
    assert identity_views(2, spec).tolist() == [[3, 3, 0], [3, 3, 0]]
    assert identity_views(1, 0).dtype == torch.int16


def test_apply_views_matches_a_hand_computed_crop_and_flip() -> None:
    side, pad = 4, 1
    images = torch.arange(2 * 3 * side * side, dtype=torch.uint8).reshape(2, 3, side, side)
    views = torch.tensor([[0, 2, 1], [2, 1, 0]], dtype=torch.int16)  # (dy, dx, flip)
    spec = ViewSpec(image_size=side, padding=pad, flip=True)
    got = apply_views(images, views, spec, side, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    padded = np.pad(images.numpy(), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    for b, (dy, dx, flip) in enumerate(views.tolist()):
        crop = padded[b, :, dy : dy + side, dx : dx + side]
        if flip:
            crop = crop[:, :, ::-1]
        expected = torch.from_numpy(crop.astype(np.float32) / 255.0)
        assert torch.equal(got[b], expected), b
    # The zero padding shows up where the crop leaves the image: view 0 starts one row above it.
    assert torch.equal(got[0, :, 0], torch.zeros(3, side))


def test_apply_views_is_bit_exact_and_normalises() -> None:
    images = _random_images(16, 32)
    spec = ViewSpec(image_size=32, padding=4, flip=True)
    views = sample_views(16, 1, spec, torch.Generator().manual_seed(7))[0]
    a = apply_views(images, views, spec, 32, MEAN, STD)
    b = apply_views(images.clone(), views.clone(), spec, 32, MEAN, STD)
    assert torch.equal(a, b)
    # Undo the normalisation: the pixels are the gathered uint8 values / 255.
    m = torch.tensor(MEAN).view(1, 3, 1, 1)
    s = torch.tensor(STD).view(1, 3, 1, 1)
    raw = torch.round((a * s + m) * 255)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    crops = gather_crops(padded, views[:, 0].long(), views[:, 1].long(), views[:, 2] != 0, 32, 32)
    assert torch.equal(raw, crops.float())


def test_identity_view_at_stored_size_equals_preprocess() -> None:
    images = _random_images(8, 16, seed=3)
    spec = ViewSpec(image_size=16, padding=4, flip=True)
    ident = apply_views(images, identity_views(8, spec), spec, 16, MEAN, STD)
    assert torch.equal(ident, preprocess(images, 16, MEAN, STD))
    # ... also when both resize: same pixels in, same resize out.
    up = apply_views(images, identity_views(8, spec), spec, 40, MEAN, STD)
    assert torch.equal(up, preprocess(images, 40, MEAN, STD))


def test_resize_dtype_and_layout() -> None:
    images = _random_images(4, 32)
    spec = ViewSpec(image_size=32, padding=2, flip=False)
    views = identity_views(4, spec)
    small = apply_views(images, views, spec, 16, MEAN, STD)
    assert small.shape == (4, 3, 16, 16)
    # Antialiased shrink of a flat image stays flat (no ringing, no border artefacts).
    flat = torch.full((1, 3, 32, 32), 100, dtype=torch.uint8)
    out = preprocess(flat, 8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert torch.allclose(out, torch.full_like(out, 100 / 255), atol=1e-6)
    half = preprocess(images, 24, MEAN, STD, dtype=torch.bfloat16, channels_last=True)
    assert half.dtype == torch.bfloat16 and half.is_contiguous(memory_format=torch.channels_last)


def test_apply_views_rejects_wrong_shapes() -> None:
    spec = ViewSpec(image_size=16, padding=2, flip=True)
    with pytest.raises(ValueError, match="ViewSpec is for 16"):
        apply_views(_random_images(2, 8), identity_views(2, spec), spec, 8, MEAN, STD)
    with pytest.raises(ValueError, match="views must be"):
        apply_views(_random_images(2, 16), identity_views(3, spec), spec, 16, MEAN, STD)
    with pytest.raises(ValueError):
        ViewSpec(image_size=16, padding=-1, flip=False)


def test_bytes_map_to_correctly_rounded_unit_floats_by_a_device_independent_gather() -> None:
    # The table holds v / 255 rounded once from float64: what numpy and a CPU division give.
    table = unit_scale_table()
    exact = np.arange(256, dtype=np.float64) / 255.0
    assert table.dtype == torch.float32 and table.shape == (256,)
    assert np.array_equal(table.numpy(), exact.astype(np.float32))
    # A multiplication by the float32 reciprocal (what CUDA makes of div_(255.0)) is one ulp off
    # for about half the byte values: the reason the table exists.
    recip = (torch.arange(256, dtype=torch.float32) * torch.tensor(1 / 255, dtype=torch.float32)).numpy()
    assert 100 < int((recip != table.numpy()).sum()) < 156
    # Every byte value goes through the table, in any layout: apply_views/preprocess read it.
    all_bytes = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16).contiguous()
    out = preprocess(all_bytes, 16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert torch.equal(out[0, 0].reshape(-1), table)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest"])
def test_interpolation_modes_resize_and_stay_in_range(mode: str) -> None:
    images = _random_images(2, 16, seed=5)
    up = preprocess(images, 40, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), interpolation=mode)
    assert up.shape == (2, 3, 40, 40)
    assert float(up.min()) >= 0.0 and float(up.max()) <= 1.0  # bicubic overshoot is clamped
    if mode == "nearest":  # nearest copies stored pixels: every value is one of the table's
        assert torch.isin(up, unit_scale_table()).all()
    # The identity view through apply_views is the same resize.
    spec = ViewSpec(image_size=16, padding=2, flip=False)
    via_views = apply_views(images, identity_views(2, spec), spec, 40, (0.0,) * 3, (1.0,) * 3, interpolation=mode)
    assert torch.equal(via_views, up)
    others = {m: preprocess(images, 40, (0.0,) * 3, (1.0,) * 3, interpolation=m) for m in ("bilinear", "nearest")}
    assert not torch.equal(others["bilinear"], others["nearest"])
    with pytest.raises(ValueError, match="interpolation"):
        preprocess(images, 40, (0.0,) * 3, (1.0,) * 3, interpolation="lanczos")


@pytest.mark.gpu
def test_apply_views_on_cuda_matches_cpu() -> None:
    images = _random_images(32, 32)
    spec = ViewSpec(image_size=32, padding=4, flip=True)
    views = sample_views(32, 1, spec, torch.Generator().manual_seed(0))[0]
    cpu = apply_views(images, views, spec, 32, MEAN, STD)
    gpu = apply_views(images.cuda(), views, spec, 32, MEAN, STD)
    assert gpu.device.type == "cuda"
    # Bit-identical on purpose (see augment.py): the byte table is a gather, the normalisation
    # an IEEE subtraction and division on both devices.
    assert torch.equal(cpu, gpu.cpu())
    assert torch.equal(unit_scale_table("cuda").cpu(), unit_scale_table())
    again = apply_views(images.cuda(), views, spec, 64, MEAN, STD)
    assert torch.equal(again, apply_views(images.cuda(), views, spec, 64, MEAN, STD))
