"""``kdsearch export --format onnx --quantize int8`` on a real smoke student: ONNX Runtime static
quantization calibrated on the training split, with its accuracy, latency and agreement measured."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kdsearch.checkpoint import sha256_file
from kdsearch.data import load_data, preprocess
from kdsearch.export.quantize import QuantizeSettings, calibration_indices
from kdsearch.storage import default_storage_url, load_study

from cli_helpers import run_cli

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def int8_export(smoke_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "export"
    code = run_cli("export", "--study-name", "smoke", "--run-dir", smoke_run, "--trial", "0", "--format", "onnx",
                   "--quantize", "int8", "--calibration-images", "96", "--out", out)
    assert code == 0
    return out


def _predictions(path: Path, images: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": images})[0].argmax(axis=1)


def test_the_card_holds_fp32_and_int8_accuracy_latency_and_agreement(int8_export: Path, smoke_run: Path) -> None:
    card = json.loads((int8_export / "card.json").read_text())
    q = card["quantization"]
    # The files: fp32 and int8 ONNX beside the safetensors, every sha256 in the card.
    assert card["files"]["model.int8.onnx"] == sha256_file(int8_export / "model.int8.onnx")
    assert card["files"]["model.onnx"] == sha256_file(int8_export / "model.onnx")
    # How: static QDQ, per channel, calibrated on the training split, method and image count said.
    assert q["tool"] == "onnxruntime.quantization.quantize_static" and q["format"] == "QDQ" and q["per_channel"]
    assert q["calibration"]["method"] == "MinMax" and q["calibration"]["split"] == "train"
    assert q["calibration"]["images"] == 96
    # Accuracy: fp32 and int8, val and test, and the drop.
    acc = q["accuracy"]
    for split in ("val", "test"):
        assert 0.0 <= acc["fp32"][split] <= 1.0 and 0.0 <= acc["int8"][split] <= 1.0
        assert acc["drop"][split] == pytest.approx(acc["fp32"][split] - acc["int8"][split])
    # fp32 through onnxruntime is the search's PyTorch figure (same images, same preprocessing).
    study = load_study(default_storage_url(smoke_run, "smoke"), "smoke")
    trial = study.trials[0]
    n_val = q["data"]["n_val"]
    assert abs(acc["fp32"]["val"] - trial.user_attrs["val_accuracy"]) <= 1.0 / n_val + 1e-9
    assert acc["pytorch"]["val_accuracy"] == trial.user_attrs["val_accuracy"]
    # Latency at batch 1 and the study's largest latency batch (16), and the speed-up.
    lat = q["latency_ms"]
    assert set(lat["fp32"]) == set(lat["int8"]) == {"b1", "b16"}
    for b in ("b1", "b16"):
        assert lat["fp32"][b] > 0 and lat["int8"][b] > 0
        assert lat["speedup"][b] == pytest.approx(lat["fp32"][b] / lat["int8"][b])
    assert q["latency_method"]["onnxruntime_version"] == ort.__version__
    assert q["latency_method"]["intra_op_threads"] == 1
    # Agreement (the round-trip check), recomputed here from the files on the val split.
    data_cfg = study.user_attrs["config"]["data"]
    from kdsearch.config import config_from_dict

    bundle = load_data(config_from_dict({"data": data_cfg}).data)
    norm = trial.user_attrs["normalization"]
    x = preprocess(bundle.val.images, card["spec"]["resolution"], norm["mean"], norm["std"]).numpy()
    p32 = _predictions(int8_export / "model.onnx", x)
    p8 = _predictions(int8_export / "model.int8.onnx", x)
    assert q["top1_agreement"]["val"] == pytest.approx(float((p32 == p8).mean()))
    assert acc["int8"]["val"] == pytest.approx(float((p8 == bundle.val.labels.numpy()).mean()))
    assert 0.0 <= q["top1_agreement"]["all"] <= 1.0
    # The int8 model really is quantized.
    import onnx

    ops = {n.op_type for n in onnx.load(str(int8_export / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert q["size_mb"]["int8"] < q["size_mb"]["fp32"]
    # The README shows it too.
    readme = (int8_export / "README.md").read_text()
    assert "## int8 (ONNX Runtime static quantization)" in readme
    assert "Calibration: MinMax over 96 images of the train split" in readme
    assert "Top-1 agreement" in readme and "speed-up" in readme
    assert q["within_limit"] is (acc["drop"]["val"] <= 0.02) and ("Warning (int8)" in readme) is not q["within_limit"]


def test_a_drop_over_the_limit_is_written_with_a_warning(
    smoke_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "export"
    # A negative limit: even no drop at all is "over" it, which forces the warning path.
    code = run_cli("export", "--study-name", "smoke", "--run-dir", smoke_run, "--trial", "1", "--format", "onnx",
                   "--quantize", "int8", "--calibration-images", "32", "--max-int8-drop", "-0.5", "--out", out)
    captured = capsys.readouterr()
    assert code == 0
    assert (out / "model.int8.onnx").is_file()  # still written
    q = json.loads((out / "card.json").read_text())["quantization"]
    assert q["within_limit"] is False and q["max_val_drop"] == -0.5
    assert "more than the --max-int8-drop limit of -50.00 points" in q["warning"]
    assert captured.err.strip().startswith("warning: int8 val accuracy")
    assert "int8: val" in captured.out and "top-1 agreement" in captured.out
    readme = (out / "README.md").read_text()
    assert readme.splitlines()[2].startswith("> **Warning (int8):** int8 val accuracy")  # right under the title
    assert "**exceeded**" in readme


def test_calibration_draws_a_seeded_sample_of_the_training_split() -> None:
    a = calibration_indices(300, 64)
    assert len(a) == 64 and len(set(a.tolist())) == 64 and a.min() >= 0 and a.max() < 300
    assert np.array_equal(a, calibration_indices(300, 64))
    assert len(calibration_indices(40, 512)) == 40  # capped by the split


def test_quantize_settings_are_checked() -> None:
    from kdsearch.errors import ConfigError

    with pytest.raises(ConfigError, match="--calibration-method: must be one of"):
        QuantizeSettings(method="kl")
    with pytest.raises(ConfigError, match="--calibration-images: must be >= 1"):
        QuantizeSettings(calibration_images=0)
    with pytest.raises(ConfigError, match="--max-int8-drop: must be a fraction <= 1"):
        QuantizeSettings(max_drop=2.0)


def test_quantize_needs_onnx(smoke_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_cli("export", "--study-name", "smoke", "--run-dir", smoke_run, "--trial", "0",
                   "--quantize", "int8", "--out", tmp_path / "x")
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "error: --quantize: needs --format onnx (ONNX Runtime quantizes the ONNX model) (got 'safetensors'); "
        "add --format onnx"
    )
    assert not (tmp_path / "x").exists()


def test_a_study_without_a_stored_data_config_is_a_clear_error(tmp_path: Path) -> None:
    from kdsearch.errors import ExportError
    from kdsearch.export import export_trial

    from study_helpers import build_fixture_study

    fx = build_fixture_study(tmp_path / "runs", with_failures=False)
    study = load_study(fx.storage_url, fx.study_name)
    study.set_user_attr("config", {"study": {"name": fx.study_name}})
    with pytest.raises(ExportError, match="has no stored data config"):
        export_trial(fx.storage_url, fx.study_name, 0, None, tmp_path / "out", "onnx", fx.artifact_dir,
                     quantize="int8")
    assert not (tmp_path / "out").exists()
