"""Bad input, as a new user would type it: one line on stderr, exit code 2, no traceback, and
nothing the user stored changes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import yaml

from cli_helpers import SMOKE, run_cli


def _study_file(tmp_path: Path, **sections: dict) -> Path:
    raw = yaml.safe_load(SMOKE.read_text())
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section] = {**raw[section], **values}
        else:
            raw[section] = values
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _bad_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "teacher.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(3, 3, 3, 3), "head.weight": torch.zeros(2, 2)}, path)
    return path


# (id, argv builder(tmp_path, run_dir) -> argv, fragment of the one-line message)
CASES = [
    ("missing-config", lambda t, r: ["optimize", "--config", t / "nope.yaml"], "--config: must be an existing study file"),
    ("yaml-syntax", lambda t, r: ["optimize", "--config", _write(t, "study: [oops\n")], "is not valid YAML"),
    ("misspelt-key", lambda t, r: ["optimize", "--config", _study_file(t, distill={"temprature": 3})], "did you mean 'temperature'"),
    ("unknown-section", lambda t, r: ["optimize", "--config", _study_file(t, optimiser={"lr": 1})], "unknown key 'optimiser'"),
    ("wrong-type", lambda t, r: ["optimize", "--config", _study_file(t, distill={"batch_size": "big"})], "distill.batch_size: must be an integer"),
    ("depth-not-allowed", lambda t, r: ["optimize", "--config", _study_file(t, student={"vgg": {"depth": [2, 7]}})], "student.vgg.depth: must be one of"),
    ("resolution-range", lambda t, r: ["optimize", "--config", _study_file(t, student={"resolution": [8]})], "student.resolution"),
    ("alpha-range", lambda t, r: ["optimize", "--config", _study_file(t, distill={"alpha": 1.5})], "distill.alpha: must be <= 1.0"),
    ("val-fraction", lambda t, r: ["optimize", "--config", _study_file(t, data={"val_fraction": 1.5})], "data.val_fraction"),
    ("objective-not-metric", lambda t, r: ["optimize", "--config", _study_file(t, objectives={"accuracy": "maximize"})], "objectives.accuracy: is not a metric"),
    ("objective-direction", lambda t, r: ["optimize", "--config", _study_file(t, objectives={"val_accuracy": "up"})], "must be maximize or minimize"),
    ("constraint-not-metric", lambda t, r: ["optimize", "--config", SMOKE, "--set", "constraints.latency=2"], "constraints.latency: is not a metric"),
    ("budget-unparsable", lambda t, r: ["optimize", "--config", SMOKE, "--budget", "2x", "--run-dir", r], "study.budget: must be a duration"),
    ("trial-time-negative", lambda t, r: ["optimize", "--config", SMOKE, "--trial-time=-5m", "--run-dir", r], "study.trial_time"),
    ("storage-scheme", lambda t, r: ["optimize", "--config", SMOKE, "--storage", "redis://x", "--run-dir", r], "study.storage"),
    ("storage-unreachable", lambda t, r: ["optimize", "--config", SMOKE, "--storage", "postgresql://nobody@127.0.0.1:1/x", "--run-dir", r], "cannot open"),
    ("study-name", lambda t, r: ["optimize", "--config", SMOKE, "--study-name", "bad name!", "--run-dir", r], "--study-name"),
    ("n-trials-zero", lambda t, r: ["optimize", "--config", SMOKE, "--n-trials", "0"], "--n-trials: must be >= 1"),
    ("set-without-equals", lambda t, r: ["optimize", "--config", SMOKE, "--set", "distill"], "section.key=value"),
    ("set-unknown-section", lambda t, r: ["optimize", "--config", SMOKE, "--set", "nosuch.key=1"], "unknown key 'nosuch'"),
    ("sampler", lambda t, r: ["optimize", "--config", SMOKE, "--sampler", "tpee"], "did you mean 'tpe'"),
    ("data-folder-missing", lambda t, r: ["optimize", "--config", _study_file(t, data={"dataset": "imagefolder", "root": str(t / "no-such-folder")}), "--run-dir", r], "no-such-folder"),
    ("cifar-offline-missing", lambda t, r: ["optimize", "--config", _study_file(t, data={"dataset": "cifar10", "root": str(t / "c10"), "download": False}), "--run-dir", r], "data.root"),
    ("teacher-unknown", lambda t, r: ["optimize", "--config", _study_file(t, teacher={"name": "deit_smal_patch16_224", "model_kwargs": {}}), "--run-dir", r], "did you mean 'deit_small_patch16_224'"),
    ("teacher-checkpoint-mismatch", lambda t, r: ["optimize", "--config", _study_file(t, teacher={"checkpoint": str(_bad_checkpoint(t))}), "--run-dir", r], "teacher.pth"),
    ("teacher-checkpoint-missing", lambda t, r: ["optimize", "--config", _study_file(t, teacher={"checkpoint": str(t / "gone.safetensors")}), "--run-dir", r], "gone.safetensors"),
    ("trials-unknown-study", lambda t, r: ["trials", "--study-name", "nope", "--run-dir", r], "no study"),
    ("trials-missing-run-dir", lambda t, r: ["trials", "--study-name", "smoke", "--run-dir", t / "empty"], "no study storage"),
    ("export-trial-missing", lambda t, r: ["export", "--study-name", "smoke", "--run-dir", r, "--trial", "99", "--out", t / "x"], "99"),
    ("export-trial-and-pick", lambda t, r: ["export", "--study-name", "smoke", "--run-dir", r, "--trial", "0", "--pick", "max val_accuracy", "--out", t / "x"], "exactly one"),
    ("export-pick-unknown-metric", lambda t, r: ["export", "--study-name", "smoke", "--run-dir", r, "--pick", "max accuracy", "--out", t / "x"], "accuracy"),
    ("export-trial-not-int", lambda t, r: ["export", "--study-name", "smoke", "--run-dir", r, "--trial", "one", "--out", t / "x"], "--trial: must be an integer"),
    ("table-unknown-key", lambda t, r: ["table", "--study-name", "smoke", "--run-dir", r, "--rows", "depht", "--cols", "resolution", "--metric", "val_accuracy"], "did you mean 'depth'"),
    ("vit-resolution-without-patch-size", lambda t, r: ["optimize", "--config", SMOKE, "--run-dir", r, "--set", "student.family=[vgg, vit]", "--set", "student.resolution={low: 17, high: 40}"], "a ViT student needs a resolution"),
    ("unknown-command", lambda t, r: ["optimise"], "invalid choice"),
    ("optimize-without-config", lambda t, r: ["optimize"], "--config"),
    ("teacher-std-zero", lambda t, r: ["optimize", "--config", SMOKE, "--set", "teacher.std=[0.2, 0, 0.2]"], "teacher.std: each must be > 0"),
    ("teacher-mean-0-255", lambda t, r: ["optimize", "--config", SMOKE, "--set", "teacher.mean=[125, 122, 104]"], "divide them by 255"),
    ("teacher-mean-length", lambda t, r: ["optimize", "--config", SMOKE, "--set", "teacher.mean=[0.5, 0.5]"], "teacher.mean: must be 3 numbers"),
    ("teacher-interpolation", lambda t, r: ["optimize", "--config", SMOKE, "--set", "teacher.interpolation=bicubik"], "did you mean 'bicubic'"),
    ("teacher-expected-accuracy-percent", lambda t, r: ["optimize", "--config", SMOKE, "--set", "teacher.expected_accuracy=93"], "a fraction, not a percentage"),
    ("cache-topk-word", lambda t, r: ["optimize", "--config", SMOKE, "--set", "teacher.cache.topk=all"], "teacher.cache.topk: must be auto"),
    ("measure-max-time-over-grace", lambda t, r: ["optimize", "--config", SMOKE, "--set", "measure.max_time=2m"], "measure.max_time: must be shorter than study.grace"),
    ("measure-max-time-zero", lambda t, r: ["optimize", "--config", SMOKE, "--set", "measure.max_time=0s"], "measure.max_time"),
    ("objective-on-test-split", lambda t, r: ["optimize", "--config", SMOKE, "--set", "objectives.test_accuracy=maximize"], "objectives.test_accuracy: is measured on the test split, which never steers the search"),
    ("constraint-on-test-split", lambda t, r: ["optimize", "--config", SMOKE, "--set", "constraints.ft_gain=0.1"], "use 'ft_gain_val' instead"),
    ("export-pick-on-test-split", lambda t, r: ["export", "--study-name", "smoke", "--run-dir", r, "--pick", "max test_accuracy", "--out", t / "x"], "selection uses val; test is for reporting"),
    ("ft-val-objective-without-finetune", lambda t, r: ["optimize", "--config", SMOKE, "--set", "objectives.post_ft_val_accuracy=maximize"], "objectives.post_ft_val_accuracy: needs finetune.enabled: true"),
    ("early-stop-that-cannot-fire", lambda t, r: ["optimize", "--config", SMOKE, "--set", "distill.early_stop.enabled=true"], "distill.early_stop.patience: can never fire"),
    ("early-stop-patience-too-long", lambda t, r: ["optimize", "--config", SMOKE, "--set", "distill.eval_every_fraction=0.25", "--set", "distill.early_stop={enabled: true, patience: 3}"], "lower distill.early_stop.patience to 2"),
    ("energy-objective-energy-off", lambda t, r: ["optimize", "--config", SMOKE, "--set", "objectives.infer_energy_mj_per_image_b1=minimize", "--set", "measure.energy.enabled=false"], "is an energy figure, and measure.energy.enabled is false"),
    ("latency-device-unknown", lambda t, r: ["optimize", "--config", SMOKE, "--set", "measure.latency.devices=[auto, onnx]"], "measure.latency.devices: each must be auto, cpu, cuda or ort-cpu"),
    ("ort-threads-zero", lambda t, r: ["optimize", "--config", SMOKE, "--set", "measure.latency.ort_threads=0"], "measure.latency.ort_threads: must be >= 1"),
    ("ort-objective-without-ort-device", lambda t, r: ["optimize", "--config", SMOKE, "--run-dir", r, "--set", "objectives.latency_ms_b1_ort=minimize"], "is measured only when measure.latency.devices lists ort-cpu"),
    ("export-quantize-not-onnx", lambda t, r: ["export", "--study-name", "smoke", "--run-dir", r, "--trial", "0", "--quantize", "int8", "--out", t / "x"], "--quantize: needs --format onnx"),
    ("export-max-int8-drop-word", lambda t, r: ["export", "--study-name", "smoke", "--run-dir", r, "--trial", "0", "--format", "onnx", "--quantize", "int8", "--max-int8-drop", "small", "--out", t / "x"], "--max-int8-drop: must be a number"),
    ("export-calibration-images-zero", lambda t, r: ["export", "--study-name", "smoke", "--run-dir", r, "--trial", "0", "--format", "onnx", "--quantize", "int8", "--calibration-images", "0", "--out", t / "x"], "--calibration-images: must be >= 1"),
]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "broken.yaml"
    p.write_text(text)
    return p


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "workers" not in p.parts and not p.name.endswith(".lock")
    }


def test_there_are_at_least_25_cases() -> None:
    assert len(CASES) >= 25


@pytest.mark.parametrize(("name", "argv", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(name: str, argv, fragment: str, copy_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _snapshot(copy_run)
    code = run_cli(*argv(tmp_path, copy_run))
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, (name, captured.out[-500:], err)
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in captured.err + captured.out
    assert fragment in err, err
    assert _snapshot(copy_run) == before


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("--debug", "optimize", "--config", tmp_path / "nope.yaml") == 2
    assert "Traceback" in capsys.readouterr().err
