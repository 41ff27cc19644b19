from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kdsearch.measure import evaluate_accuracy

MEAN = (0.4, 0.5, 0.6)
STD = (0.2, 0.25, 0.3)


class BrightnessClassifier(nn.Module):
    """Class 1 iff the red channel's mean is above mid-grey (127.5 / 255), in normalised units."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.threshold = (0.5 - MEAN[0]) / STD[0]
        self.sizes: set[int] = set()
        self.training_seen: set[bool] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.add(int(x.shape[-1]))
        self.training_seen.add(self.training)
        m = x[:, 0].mean(dim=(1, 2)) - self.threshold
        return torch.stack([-m, m], dim=1) * self.scale


def _split(n: int = 37, side: int = 16) -> tuple[SimpleNamespace, float]:
    """Uniform-grey images (resizing keeps them exact); every 4th label is deliberately wrong."""
    g = torch.Generator().manual_seed(0)
    bright = torch.rand(n, generator=g) > 0.5
    values = torch.where(bright, torch.tensor(200), torch.tensor(50)).to(torch.uint8)
    images = values[:, None, None, None].expand(n, 3, side, side).contiguous()
    labels = bright.long()
    wrong = torch.arange(n) % 4 == 0
    labels[wrong] = 1 - labels[wrong]
    expected = 1.0 - wrong.sum().item() / n
    return SimpleNamespace(images=images, labels=labels), expected


def test_accuracy_is_exact_across_batch_boundaries() -> None:
    split, expected = _split()
    model = BrightnessClassifier()
    model.train()
    for bs in (1, 8, 512):
        acc = evaluate_accuracy(model, split, 8, MEAN, STD, "cpu", batch_size=bs)
        assert acc == pytest.approx(expected)  # 27/37 of the labels are right
    assert model.sizes == {8}  # resized to the requested resolution
    assert model.training_seen == {False} and model.training  # eval inside, mode restored


def test_accuracy_with_image_split_type() -> None:
    from kdsearch.data import ImageSplit

    ns, expected = _split(n=20)
    split = ImageSplit(images=ns.images, labels=ns.labels)
    assert evaluate_accuracy(BrightnessClassifier(), split, 32, MEAN, STD, "cpu", 7) == pytest.approx(
        expected
    )


def test_accuracy_rejects_bad_input() -> None:
    split, _ = _split()
    with pytest.raises(ValueError, match="empty"):
        evaluate_accuracy(
            BrightnessClassifier(),
            SimpleNamespace(images=split.images[:0], labels=split.labels[:0]),
            8,
            MEAN,
            STD,
            "cpu",
        )
    with pytest.raises(ValueError, match="labels"):
        evaluate_accuracy(
            BrightnessClassifier(),
            SimpleNamespace(images=split.images, labels=split.labels[:5]),
            8,
            MEAN,
            STD,
            "cpu",
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_accuracy_on_cuda_from_cpu_images() -> None:
    split, expected = _split()
    assert evaluate_accuracy(BrightnessClassifier().cuda(), split, 8, MEAN, STD, "cuda", 8) == pytest.approx(
        expected
    )
