"""Facet 4: frozen features stay bitwise unchanged, the head learns, held-out images are never
trained on, and the new checkpoint + card record where it came from."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import kdsearch
from kdsearch.checkpoint import save_student, sha256_file
from kdsearch.data.splits import ImageSplit
from kdsearch.distill.head import finetune_model
from kdsearch.errors import ConfigError, DataError
from kdsearch.finetune import finetune_checkpoint, indices_sha256, load_finetune_pool
from kdsearch.models import build_student
from kdsearch.models.spec import StudentSpec

SPEC = StudentSpec("vgg", resolution=16, num_classes=10, arch={"depth": 3, "width": 0.125})


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    """An exported-student folder holding only model.safetensors (no card)."""
    torch.manual_seed(0)
    folder = tmp_path / "source"
    save_student(build_student(SPEC), SPEC, folder / "model.safetensors")
    return folder


def _digest(img: torch.Tensor) -> str:
    return hashlib.sha256(img.contiguous().numpy().tobytes()).hexdigest()


def test_finetune_checkpoint_freezes_features_and_never_trains_on_the_holdout(source: Path, tmp_path: Path) -> None:
    seen_positions: list[torch.Tensor] = []
    seen_images: list[str] = []

    def hook(pos: torch.Tensor, images: torch.Tensor) -> None:
        seen_positions.append(pos.clone())
        seen_images.extend(_digest(im) for im in images)

    out = tmp_path / "tuned"
    res = finetune_checkpoint(source, "synthetic", out, epochs=4, lr=1e-2, batch_size=64, holdout_fraction=0.25,
                              seed=3, batch_hook=hook)

    # Frozen: every tensor outside the head (BatchNorm statistics included) is bitwise unchanged.
    before, after = load_file(str(source / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    frozen = [k for k in before if not k.startswith("head.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any("running_mean" in k for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("head."))

    # Held out: no training batch holds a held-out position or a held-out image, and every other
    # image was trained on.
    pool = load_finetune_pool("synthetic", SPEC.resolution, SPEC.num_classes)
    assert len({_digest(im) for im in pool.images}) == len(pool.images)  # images are distinct, so content is proof
    holdout = set(res.holdout_indices.tolist())
    trained = set(torch.cat(seen_positions).tolist())
    assert trained.isdisjoint(holdout) and trained == set(res.train_indices.tolist())
    assert len(holdout) == res.n_holdout and len(holdout) + len(trained) == len(pool.labels)
    assert {_digest(pool.images[i]) for i in holdout}.isdisjoint(seen_images)
    # The holdout is stratified: a quarter of every class.
    counts = torch.bincount(pool.labels[res.holdout_indices], minlength=10)
    totals = torch.bincount(pool.labels, minlength=10)
    assert torch.all((counts - totals * 0.25).abs() <= 1)

    card = json.loads((out / "card.json").read_text())
    assert card["data"]["holdout_indices_sha256"] == indices_sha256(res.holdout_indices) == res.holdout_indices_sha256
    assert card["source"]["sha256"] == sha256_file(source / "model.safetensors") == res.source_sha256
    assert card["results"] == {"pre_accuracy": res.pre_accuracy, "post_accuracy": res.post_accuracy,
                               "gain": res.post_accuracy - res.pre_accuracy, "metric": "top-1 on the holdout"}
    assert card["training"]["epochs"] == 4 and card["training"]["lr"] == 1e-2 and card["training"]["trainable"] == "head"
    assert card["files"]["model.safetensors"] == sha256_file(out / "model.safetensors") == res.files["model.safetensors"]
    assert 0.0 <= res.pre_accuracy <= 1.0 and 0.0 <= res.post_accuracy <= 1.0
    assert res.post_accuracy > res.pre_accuracy  # an untrained head on 10 classes is at chance
    assert "fine-tuned" in (out / "README.md").read_text()
    model = kdsearch.load_student(out)  # the output is itself a loadable export
    assert not model.training


def test_unfreeze_last_block_trains_it_and_nothing_else(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "tuned"
    finetune_checkpoint(source, "synthetic", out, epochs=2, lr=1e-2, batch_size=128, unfreeze_last_block=True)
    before, after = load_file(str(source / "model.safetensors")), load_file(str(out / "model.safetensors"))
    model = build_student(SPEC)
    last = {f"features.{name}" for name, mod in model.features.named_children() if mod is model.last_block}
    assert len(last) == 1
    prefix = next(iter(last)) + "."
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith(prefix) for k in changed) and any(k.startswith("head.") for k in changed)
    assert all(k.startswith(prefix) or k.startswith("head.") for k in changed)
    assert json.loads((out / "card.json").read_text())["training"]["trainable"] == "head + last_block"


def test_finetune_model_leaves_the_callers_model_alone_by_default() -> None:
    pool = load_finetune_pool("synthetic", SPEC.resolution, SPEC.num_classes)
    train = ImageSplit(pool.images[:400], pool.labels[:400])
    held = ImageSplit(pool.images[400:], pool.labels[400:])
    torch.manual_seed(1)
    model = build_student(SPEC)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pre, post = finetune_model(model, train, held, SPEC.resolution, pool.mean, pool.std, epochs=2, lr=1e-2,
                               batch_size=64, device="cpu", seed=0)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert 0.0 <= pre <= 1.0 and 0.0 <= post <= 1.0
    assert all(p.requires_grad for p in model.parameters())
    pre2, post2 = finetune_model(model, train, held, SPEC.resolution, pool.mean, pool.std, epochs=2, lr=1e-2,
                                 batch_size=64, device="cpu", seed=0, in_place=True)
    assert (pre2, post2) == (pre, post)  # seeded: the same run twice
    changed = {k for k, v in model.state_dict().items() if not torch.equal(state[k], v)}
    assert changed and all(k.startswith("head.") for k in changed)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_imagefolder_without_splits_is_pooled(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "my_images"
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(10):
            arr = np.clip(rng.normal(60 + 120 * c, 30, (20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
    spec = StudentSpec("vgg", resolution=16, num_classes=2, arch={"depth": 2, "width": 0.25})
    torch.manual_seed(0)
    save_student(build_student(spec), spec, tmp_path / "src.safetensors")
    res = finetune_checkpoint(tmp_path / "src.safetensors", f"imagefolder:{root}", tmp_path / "out", epochs=3,
                              lr=1e-2, batch_size=8, holdout_fraction=0.2)
    assert (res.n_train, res.n_holdout) == (16, 4)
    card = json.loads((tmp_path / "out" / "card.json").read_text())
    assert card["data"]["class_names"] == ["cat", "dog"] and card["data"]["n_pool"] == 20


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"data_spec": "mnist"}, ConfigError, "--data: must be imagefolder:PATH, digits or synthetic"),
        ({"holdout_fraction": 0.0}, ConfigError, r"--holdout-fraction: must be in \(0, 0.9\)"),
        ({"epochs": 0}, ConfigError, "--epochs: must be >= 1"),
        ({"lr": -1.0}, ConfigError, r"--lr: must be in \(0, 10\)"),
        ({"data_spec": "imagefolder:/nonexistent/folder"}, DataError, "does not exist"),
    ],
)
def test_user_mistakes_are_one_line_errors(source: Path, tmp_path: Path, kwargs: dict, error: type, match: str) -> None:
    args = {"checkpoint_dir": source, "data_spec": "synthetic", "out_dir": tmp_path / "o", "epochs": 1} | kwargs
    with pytest.raises(error, match=match) as info:
        finetune_checkpoint(**args)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "o").exists()


def test_class_count_mismatch_is_a_data_error(tmp_path: Path) -> None:
    spec = StudentSpec("vgg", resolution=16, num_classes=3, arch={"depth": 2, "width": 0.125})
    save_student(build_student(spec), spec, tmp_path / "s.safetensors")
    with pytest.raises(DataError, match="has 10 classes but the student has 3 outputs"):
        finetune_checkpoint(tmp_path / "s.safetensors", "digits", tmp_path / "o", epochs=1)
