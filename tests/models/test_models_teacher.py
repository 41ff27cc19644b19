"""Teachers: timm names, checkpoints, offline failures, hashing, the fit decision. No network."""

from __future__ import annotations

import logging
import re
import socket
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import save_file

from kdsearch.config import TeacherConfig, TeacherFitConfig
from kdsearch.data import ImageSplit
from kdsearch.errors import CheckpointError, TeacherError
from kdsearch.measure import evaluate_accuracy
from kdsearch.models import LoadedTeacher, create_teacher, state_dict_sha256, teacher_needs_fit
from kdsearch.models.teacher import weak_teacher_warning

TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 3}


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test here may reach the network: hub downloads raise at once, sockets refuse."""

    def no_hub(*args: object, **kwargs: object) -> None:
        raise LocalEntryNotFoundError("offline (test): cannot reach the Hugging Face Hub")

    def no_url(*args: object, **kwargs: object) -> None:
        raise OSError("offline (test): no network")

    monkeypatch.setattr("timm.models._hub.hf_hub_download", no_hub)
    monkeypatch.setattr("timm.models._builder.load_state_dict_from_url", no_url)
    monkeypatch.setattr("timm.models._builder.download_cached_file", no_url)
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: no_url())


def _x(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def _save_teacher_weights(
    tmp_path: Path, name: str, num_classes: int, **kwargs: object
) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "w.pth")
    save_file(state, str(tmp_path / "w.safetensors"))
    return state


@pytest.mark.parametrize(
    ("name", "kwargs", "size"),
    [
        ("vit_tiny_patch16_224", TINY_VIT, 32),
        ("resnet18", {}, 224),
        ("test_vit", {}, 160),
        ("test_resnet", {}, 160),
    ],
)
def test_random_teacher_builds(name: str, kwargs: dict, size: int) -> None:
    cfg = TeacherConfig(name=name, model_kwargs=kwargs, label="T")
    t = create_teacher(cfg, num_classes=10, device="cpu")
    assert isinstance(t, LoadedTeacher)
    assert (t.name, t.label, t.num_classes, t.input_size) == (name, "T", 10, size)
    assert not t.pretrained and not t.head_reset
    assert not t.model.training
    assert len(t.mean) == 3 and len(t.std) == 3 and all(s > 0 for s in t.std)
    assert len(t.weights_sha256) == 64
    assert teacher_needs_fit(cfg, t, 10)  # auto: no real weights
    with torch.no_grad():
        assert t.model(_x(size)).shape == (2, 10)


def test_pretrained_cfg_normalisation_and_input_override() -> None:
    t = create_teacher(TeacherConfig(name="resnet18", input_size=64), 10, "cpu")
    assert t.input_size == 64
    assert t.mean == pytest.approx((0.485, 0.456, 0.406)) and t.std == pytest.approx((0.229, 0.224, 0.225))


def test_input_size_the_model_cannot_run_is_a_teacher_error() -> None:
    cfg = TeacherConfig(name="vit_tiny_patch16_224", model_kwargs=TINY_VIT, input_size=48)
    with pytest.raises(TeacherError, match=r"teacher\.input_size: .* cannot run at 48 px.*img_size: 48"):
        create_teacher(cfg, 10, "cpu")


def test_unknown_name_suggests_close_match() -> None:
    with pytest.raises(TeacherError) as exc:
        create_teacher(TeacherConfig(name="deit_smal_patch16_224"), 10, "cpu")
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("teacher.name: timm has no model 'deit_smal_patch16_224'")
    assert "did you mean 'deit_small_patch16_224'" in msg


def test_bad_model_kwargs_is_a_teacher_error() -> None:
    with pytest.raises(TeacherError, match="teacher.model_kwargs"):
        create_teacher(TeacherConfig(name="test_resnet", model_kwargs={"no_such_kwarg": 1}), 10, "cpu")


def test_pretrained_offline_is_a_one_line_teacher_error() -> None:
    with pytest.raises(TeacherError) as exc:
        create_teacher(TeacherConfig(name="test_resnet", pretrained=True), 10, "cpu")
    msg = str(exc.value)
    assert "\n" not in msg and "'test_resnet'" in msg and "teacher.checkpoint" in msg


def test_hf_hub_name_offline_is_a_teacher_error() -> None:
    with pytest.raises(TeacherError) as exc:
        create_teacher(TeacherConfig(name="hf-hub:someorg/some-vit"), 10, "cpu")
    msg = str(exc.value)
    assert "'hf-hub:someorg/some-vit'" in msg and "download" in msg and "teacher.checkpoint" in msg


def test_pretrained_with_other_class_count_resets_head(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(7)
    hub_state = timm.create_model("test_resnet", num_classes=1000).state_dict()
    monkeypatch.setattr("timm.models._builder.load_state_dict_from_hf", lambda *a, **k: dict(hub_state))
    cfg = TeacherConfig(name="test_resnet", pretrained=True)
    t = create_teacher(cfg, 10, "cpu")
    assert t.pretrained and t.head_reset and teacher_needs_fit(cfg, t, 10)
    assert torch.equal(t.model.state_dict()["conv1.0.weight"], hub_state["conv1.0.weight"])
    t1000 = create_teacher(cfg, 1000, "cpu")
    assert t1000.pretrained and not t1000.head_reset and not teacher_needs_fit(cfg, t1000, 1000)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_round_trip(tmp_path: Path, suffix: str) -> None:
    state = _save_teacher_weights(tmp_path, "vit_tiny_patch16_224", 10, **TINY_VIT)
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=10, **TINY_VIT).eval()
    ref.load_state_dict(state)
    cfg = TeacherConfig(
        name="vit_tiny_patch16_224", model_kwargs=TINY_VIT, checkpoint=str(tmp_path / f"w{suffix}")
    )
    t = create_teacher(cfg, 10, "cpu")
    assert t.pretrained and not t.head_reset and t.checkpoint == cfg.checkpoint
    assert t.weights_sha256 == state_dict_sha256(state) == state_dict_sha256(ref)
    assert not teacher_needs_fit(cfg, t, 10)
    with torch.no_grad():
        assert torch.equal(t.model(_x(32)), ref(_x(32)))


def test_checkpoint_wrappers_and_prefixes(tmp_path: Path) -> None:
    state = _save_teacher_weights(tmp_path, "test_resnet", 10)
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}, "optimizer": {}}
    torch.save(wrapped, tmp_path / "wrapped.pt")
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in state.items()}}, tmp_path / "compiled.bin")
    hashes = {
        create_teacher(
            TeacherConfig(name="test_resnet", checkpoint=str(tmp_path / f)), 10, "cpu"
        ).weights_sha256
        for f in ("w.pth", "w.safetensors", "wrapped.pt", "compiled.bin")
    }
    assert hashes == {state_dict_sha256(state)}


def test_checkpoint_with_wrong_shapes(tmp_path: Path) -> None:
    _save_teacher_weights(tmp_path, "vit_tiny_patch16_224", 10, **TINY_VIT)
    other = dict(TINY_VIT, embed_dim=96)
    cfg = TeacherConfig(
        name="vit_tiny_patch16_224", model_kwargs=other, checkpoint=str(tmp_path / "w.safetensors")
    )
    with pytest.raises(CheckpointError) as exc:
        create_teacher(cfg, 10, "cpu")
    msg = str(exc.value)
    assert "\n" not in msg and "w.safetensors" in msg and "shape mismatch" in msg
    assert re.search(r"\(\d*,? ?48[,)].* vs \(\d*,? ?96[,)]", msg)  # an offending key with both shapes


def test_checkpoint_of_another_architecture(tmp_path: Path) -> None:
    _save_teacher_weights(tmp_path, "test_resnet", 10)
    cfg = TeacherConfig(name="test_vit", checkpoint=str(tmp_path / "w.pth"))
    with pytest.raises(
        CheckpointError, match=r"w\.pth.*does not fit timm model 'test_vit'.*missing .*unexpected"
    ):
        create_teacher(cfg, 10, "cpu")


def test_checkpoint_unreadable_or_not_a_state_dict(tmp_path: Path) -> None:
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth.*cannot be read"):
        create_teacher(TeacherConfig(name="test_resnet", checkpoint=str(tmp_path / "junk.pth")), 10, "cpu")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match="meta.pt.*does not hold a state_dict"):
        create_teacher(TeacherConfig(name="test_resnet", checkpoint=str(tmp_path / "meta.pt")), 10, "cpu")
    with pytest.raises(CheckpointError, match="file not found"):
        create_teacher(TeacherConfig(name="test_resnet", checkpoint=str(tmp_path / "nope.pth")), 10, "cpu")


def test_checkpoint_with_other_class_count_resets_head(tmp_path: Path) -> None:
    state = _save_teacher_weights(tmp_path, "test_resnet", 100)
    cfg = TeacherConfig(name="test_resnet", checkpoint=str(tmp_path / "w.pth"))
    t = create_teacher(cfg, 10, "cpu")
    assert t.pretrained and t.head_reset and t.num_classes == 10
    assert teacher_needs_fit(cfg, t, 10)
    loaded = t.model.state_dict()
    assert loaded["fc.weight"].shape[0] == 10
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("fc."))
    off = TeacherConfig(name="test_resnet", checkpoint=cfg.checkpoint, fit=TeacherFitConfig(enabled="false"))
    assert not teacher_needs_fit(off, t, 10)


def test_fit_enabled_true_forces_fit(tmp_path: Path) -> None:
    _save_teacher_weights(tmp_path, "test_resnet", 10)
    cfg = TeacherConfig(
        name="test_resnet", checkpoint=str(tmp_path / "w.pth"), fit=TeacherFitConfig(enabled="true")
    )
    t = create_teacher(cfg, 10, "cpu")
    assert teacher_needs_fit(cfg, t, 10)
    assert not teacher_needs_fit(TeacherConfig(name="test_resnet", checkpoint=cfg.checkpoint), t, 10)


def test_weights_sha256_is_deterministic_and_sensitive() -> None:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    h1 = state_dict_sha256(model)
    assert (
        h1 == state_dict_sha256(model) == state_dict_sha256(dict(reversed(list(model.state_dict().items()))))
    )
    with torch.no_grad():
        model.fc.weight[0, 0] += 1e-3
    h2 = state_dict_sha256(model)
    assert h2 != h1
    with torch.no_grad():
        model.fc.weight[0, 0] -= 1e-3
    # Same values in another dtype are other weights.
    assert state_dict_sha256({k: v.half() for k, v in model.state_dict().items()}) != h1


# ----------------------------------------------------------------------------------------------
# The user's own teacher, with its own normalisation

OWN_MEAN = (0.2, 0.8, 0.5)  # far from timm's (0.5, 0.5, 0.5) for this ViT
OWN_STD = (0.1, 0.05, 0.1)
TINY_VIT16 = {"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2}


def _colour_classes(n: int, gen: torch.Generator, centres: torch.Tensor) -> ImageSplit:
    """``n`` 16 px uint8 images; class c is a noisy field around the RGB colour ``centres[c]``."""
    labels = torch.arange(n) % centres.shape[0]
    x = centres[labels][:, :, None, None] + torch.randn(n, 3, 16, 16, generator=gen) * 25
    return ImageSplit(x.clamp(0, 255).round().to(torch.uint8), labels)


def _normalise(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (images.float() / 255 - m) / s


@pytest.fixture(scope="module")
def own_teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ImageSplit, float]:
    """A tiny timm ViT trained in plain PyTorch on OWN_MEAN/OWN_STD-normalised data: its weights
    file, a validation split, and its validation accuracy measured in plain PyTorch."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.randint(40, 216, (4, 3), generator=gen).float()
    train, val = _colour_classes(256, gen, centres), _colour_classes(128, gen, centres)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=4, **TINY_VIT16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = _normalise(train.images, OWN_MEAN, OWN_STD)
    for _ in range(40):  # full batch: ~2 s on a CPU
        loss = torch.nn.functional.cross_entropy(model(x), train.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        plain = (model(_normalise(val.images, OWN_MEAN, OWN_STD)).argmax(1) == val.labels).float().mean()
    path = tmp_path_factory.mktemp("own") / "teacher.safetensors"
    save_file(model.state_dict(), str(path))
    return path, val, float(plain)


def _kdsearch_val_accuracy(loaded: LoadedTeacher, val: ImageSplit) -> float:
    # The call the objective makes for every teacher (kdsearch/search/objective.py).
    return evaluate_accuracy(loaded.model, val, loaded.input_size, loaded.mean, loaded.std, "cpu", 512,
                             interpolation=loaded.interpolation)


def test_own_normalisation_scores_the_same_through_kdsearch(own_teacher, caplog: pytest.LogCaptureFixture) -> None:
    path, val, plain = own_teacher
    assert plain >= 0.9  # it learnt the task
    cfg = TeacherConfig(name="vit_tiny_patch16_224", model_kwargs=TINY_VIT16, checkpoint=str(path),
                        mean=OWN_MEAN, std=OWN_STD)
    own = create_teacher(cfg, 4, "cpu")
    assert (own.mean, own.std, own.norm_source) == (OWN_MEAN, OWN_STD, "teacher.mean + teacher.std")
    assert own.input_size == 16 and not teacher_needs_fit(cfg, own, 4)
    assert _kdsearch_val_accuracy(own, val) == plain  # exactly: same pixels, same arithmetic
    with caplog.at_level(logging.WARNING, logger="kdsearch.models.teacher"):
        assert weak_teacher_warning(own, plain, expected_accuracy=0.95) is None
    assert not caplog.records

    # Without teacher.mean/std, timm's pretrained_cfg normalisation is used: the teacher is lost.
    default = create_teacher(TeacherConfig(name="vit_tiny_patch16_224", model_kwargs=TINY_VIT16,
                                           checkpoint=str(path)), 4, "cpu")
    assert default.norm_source == "timm pretrained_cfg" and default.mean != OWN_MEAN
    wrong = _kdsearch_val_accuracy(default, val)
    assert wrong <= plain - 0.4
    with caplog.at_level(logging.WARNING, logger="kdsearch.models.teacher"):
        msg = weak_teacher_warning(default, wrong, expected_accuracy=plain)
    assert msg is not None and caplog.records[-1].getMessage() == msg and "\n" not in msg
    assert "normalisation" in msg and "teacher.mean/teacher.std" in msg and "input size (16 px" in msg
    assert "timm pretrained_cfg" in msg


@pytest.mark.parametrize(
    ("accuracy", "expected", "warns", "fragment"),
    [
        (0.10, None, True, "near chance (10% for 10 classes)"),
        (0.15, None, True, "near chance"),  # 1.5 / 10 classes
        (0.16, None, False, ""),
        (0.70, 0.95, True, "far below teacher.expected_accuracy 95%"),
        (0.86, 0.95, False, ""),  # within 10 points
    ],
)
def test_weak_teacher_warning_thresholds(accuracy: float, expected: float | None, warns: bool, fragment: str) -> None:
    t = create_teacher(TeacherConfig(name="test_resnet", input_size=32, interpolation="bicubic"), 10, "cpu")
    assert t.interpolation == "bicubic"
    msg = weak_teacher_warning(t, accuracy, expected)
    assert (msg is not None) == warns
    if warns:
        assert fragment in msg and "32 px, bicubic" in msg


def test_one_of_mean_or_std_overrides_alone() -> None:
    t = create_teacher(TeacherConfig(name="test_resnet", input_size=32, std=(0.3, 0.3, 0.3)), 10, "cpu")
    ref = create_teacher(TeacherConfig(name="test_resnet", input_size=32), 10, "cpu")
    assert t.std == (0.3, 0.3, 0.3) and t.mean == ref.mean
    assert t.norm_source == "teacher.std (rest: timm pretrained_cfg)"


def test_pretrained_cfg_overlay_points_to_the_teacher_keys() -> None:
    cfg = TeacherConfig(name="test_resnet", model_kwargs={"pretrained_cfg_overlay": {"mean": (0.1, 0.1, 0.1)}})
    with pytest.raises(TeacherError, match="set teacher.mean, teacher.std, teacher.interpolation"):
        create_teacher(cfg, 10, "cpu")
