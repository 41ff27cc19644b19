"""Export round trips (safetensors, TorchScript, ONNX with a dynamic batch), the model card, the
sha256 check, trial selection errors, and never-half-written output folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from optuna.artifacts import FileSystemArtifactStore, download_artifact

import kdsearch
from kdsearch.checkpoint import load_student, load_student_file, sha256_file
from kdsearch.errors import CheckpointError, ConfigError, ExportError
from kdsearch.export import TOLERANCE, export_trial

from study_helpers import FIXTURE_ROWS, FixtureStudy, build_fixture_study


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> FixtureStudy:
    return build_fixture_study(tmp_path_factory.mktemp("runs"))


def _original(fx: FixtureStudy, number: int, tmp: Path) -> torch.nn.Module:
    """The trial's stored student, straight from the artifact store (the reference)."""
    trial = fx.open().trials[number]
    dest = tmp / f"orig-{number}.safetensors"
    download_artifact(artifact_store=FileSystemArtifactStore(str(fx.artifact_dir)), file_path=str(dest),
                      artifact_id=trial.user_attrs["artifact_id"])
    model, _ = load_student_file(dest, expected_sha256=trial.user_attrs["weights_sha256"])
    return model.eval()


def _batch(n: int, res: int, seed: int = 123) -> torch.Tensor:
    return torch.randn(n, 3, res, res, generator=torch.Generator().manual_seed(seed))


def _no_leftovers(parent: Path) -> None:
    assert [p.name for p in parent.iterdir() if p.name.startswith(".")] == []


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
@pytest.mark.parametrize("fmt", ["safetensors", "torchscript", "onnx"])
def test_export_round_trip(study: FixtureStudy, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"student-{fmt}"
    res = export_trial(study.storage_url, study.study_name, 7, None, out, fmt, study.artifact_dir)
    spec = study.specs[7]
    model_file = {"safetensors": "model.safetensors", "torchscript": "model.pt", "onnx": "model.onnx"}[fmt]
    assert res.trial_number == 7 and res.out_dir == out and res.fmt == fmt
    assert sorted(p.name for p in out.iterdir()) == sorted({"model.safetensors", model_file, "card.json", "README.md"})
    assert res.files == {p.name: sha256_file(p) for p in out.iterdir()}
    _no_leftovers(tmp_path)

    ref_model = _original(study, 7, tmp_path)
    x = _batch(5, spec.resolution)
    with torch.no_grad():
        ref = ref_model(x)
    assert ref.std() > 0.05, "the fixture's student must give non-trivial outputs"
    if fmt == "safetensors":
        with torch.no_grad():
            got = kdsearch.load_student(out)(x)
    elif fmt == "torchscript":
        with torch.no_grad():
            got = torch.jit.load(str(out / "model.pt"))(x)
    else:
        import onnx
        import onnxruntime as ort

        proto = onnx.load(str(out / "model.onnx"))
        assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
        sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        assert inp.name == "input" and not isinstance(inp.shape[0], int)  # dynamic batch
        for n in (1, 5):  # neither is the batch size it was exported with
            o = sess.run(None, {"input": x[:n].numpy()})[0]
            assert np.abs(o - ref[:n].numpy()).max() <= TOLERANCE
        got = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    assert (got - ref).abs().max().item() <= TOLERANCE

    card = json.loads((out / "card.json").read_text())
    assert card["format"] == fmt and card["trial_number"] == 7 and card["study"] == study.study_name
    assert card["spec"] == spec.to_dict() and card["teacher"] == "deit_tiny" and card["dataset"] == "synthetic"
    assert card["distillation"]["temperature"] == pytest.approx(3.0)
    assert card["metrics"]["val_accuracy"] == {"value": FIXTURE_ROWS[7][3], "unit": "fraction", "method": {"method": "top1"}}
    assert card["metrics"]["latency_ms_b1"]["unit"] == "ms"
    assert "NVML" in card["metrics"]["kd_energy_j"]["missing_reason"]
    assert card["files"] == {k: v for k, v in res.files.items() if k not in ("card.json", "README.md")}
    assert card["source"]["weights_sha256"] == card["files"]["model.safetensors"]
    assert card["verification"]["max_abs_diff"] == res.max_abs_diff <= TOLERANCE
    assert card["kdsearch_version"] == kdsearch.__version__
    readme = (out / "README.md").read_text()
    assert "kdsearch.load_student(" in readme and "| latency_ms_b1 | 1.95 | ms | perf_counter (cpu) |" in readme
    assert res.files["card.json"] in readme and res.files[model_file] in readme


def test_export_by_pick_rule(study: FixtureStudy, tmp_path: Path) -> None:
    res = export_trial(study.storage_url, study.study_name, None, "max val_accuracy where latency_ms_b1 <= 1.5",
                       tmp_path / "picked", "safetensors", study.artifact_dir)
    assert res.trial_number == 1
    assert json.loads((tmp_path / "picked" / "card.json").read_text())["student"] == study.specs[1].label


@pytest.mark.parametrize(
    ("trial", "pick", "match"),
    [
        (8, None, r"--trial: must be a COMPLETE trial of study 'fixture'; trial 8 is FAIL \(got 8\); COMPLETE trials: 0-7"),
        (99, None, r"trial 99 does not exist .*COMPLETE trials: 0-7"),
        (None, None, r"--trial/--pick: give exactly one"),
        (1, "max val_accuracy", r"--trial/--pick: give exactly one"),
        (None, "max val_acc", r"--pick: unknown metric 'val_acc'"),
    ],
)
def test_bad_selection_is_a_one_line_config_error(study: FixtureStudy, tmp_path: Path, trial: int | None,
                                                  pick: str | None, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        export_trial(study.storage_url, study.study_name, trial, pick, tmp_path / "x", "onnx", study.artifact_dir)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "x").exists()


def test_sha256_mismatch_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    fx = build_fixture_study(tmp_path / "runs", with_failures=False)
    aid = fx.open().trials[4].user_attrs["artifact_id"]
    blob = fx.artifact_dir / aid
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01  # one flipped bit in the weights
    blob.write_bytes(bytes(data))
    out = tmp_path / "exports" / "student"
    with pytest.raises(ExportError, match=r"trial 4: checkpoint sha256 .* does not match the stored weights_sha256"):
        export_trial(fx.storage_url, fx.study_name, 4, None, out, "safetensors", fx.artifact_dir)
    assert not out.exists()
    _no_leftovers(out.parent)
    # The other trials still export.
    export_trial(fx.storage_url, fx.study_name, 0, None, out, "safetensors", fx.artifact_dir)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_failed_verification_leaves_no_half_written_export(study: FixtureStudy, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "student"
    real_load = torch.jit.load

    class Drifted(torch.nn.Module):  # what a broken serializer would give back
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) + 1e-3

    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: Drifted(real_load(*a, **k)))
    with pytest.raises(ExportError, match=r"--format torchscript: the exported model's outputs differ from PyTorch by 0.001"):
        export_trial(study.storage_url, study.study_name, 7, None, out, "torchscript", study.artifact_dir)
    assert not out.exists()
    _no_leftovers(tmp_path)


def test_output_folder_rules(study: FixtureStudy, tmp_path: Path) -> None:
    # A folder with someone else's files is never overwritten.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="is a non-empty folder that is not a kdsearch export"):
        export_trial(study.storage_url, study.study_name, 0, None, other, "safetensors", study.artifact_dir)
    assert (other / "notes.txt").read_text() == "keep me"
    # A previous export is replaced as a whole.
    out = tmp_path / "student"
    export_trial(study.storage_url, study.study_name, 0, None, out, "onnx", study.artifact_dir)
    export_trial(study.storage_url, study.study_name, 1, None, out, "safetensors", study.artifact_dir)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "card.json", "model.safetensors"]
    assert json.loads((out / "card.json").read_text())["trial_number"] == 1
    _no_leftovers(tmp_path)
    with pytest.raises(ConfigError, match="--format: must be one of"):
        export_trial(study.storage_url, study.study_name, 0, None, out, "tflite", study.artifact_dir)
    with pytest.raises(ExportError, match="artifact folder is missing"):
        export_trial(study.storage_url, study.study_name, 0, None, tmp_path / "y", "safetensors", tmp_path / "nowhere")


def test_load_student_forms_and_errors(study: FixtureStudy, tmp_path: Path) -> None:
    out = tmp_path / "student"
    export_trial(study.storage_url, study.study_name, 4, None, out, "safetensors", study.artifact_dir)
    from_dir = load_student(out)
    from_file = kdsearch.load_student(out / "model.safetensors")
    assert not from_dir.training and not from_file.training
    x = _batch(2, study.specs[4].resolution)
    with torch.no_grad():
        assert torch.equal(from_dir(x), from_file(x))
    # A card whose hash no longer matches the weights is refused.
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    card = json.loads((bad / "card.json").read_text())
    card["files"]["model.safetensors"] = "0" * 64
    (bad / "card.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="does not match the recorded"):
        load_student(bad)
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_student(tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors in folder"):
        load_student(empty)
