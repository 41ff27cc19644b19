"""ONNX Runtime on the CPU as a measured device (``measure.latency.devices: [..., ort-cpu]``)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kdsearch.config import EnergyConfig, LatencyConfig, MeasureConfig, StudyConfig, load_config
from kdsearch.errors import ConfigError
from kdsearch.measure import measure_inference, runtime_ort
from kdsearch.measure.runtime_ort import ONNX_OPSET, export_onnx, ort_method, ort_session
from kdsearch.metrics import metric_info
from kdsearch.search.preflight import check_ort_runtime

from .measure_helpers import small_cnn
from cli_helpers import SMOKE, run_cli

ort = pytest.importorskip("onnxruntime")

ORT_FAST = LatencyConfig(
    batch_sizes=(1, 4), devices=("auto", "ort-cpu"), ort_threads=2, ort_optimization="extended",
    warmup=1, min_repeats=3, max_repeats=10, max_time_s=0.2,
)
NO_ENERGY = EnergyConfig(enabled=False)


def test_the_exporter_matches_pytorch_at_any_batch_and_the_session_uses_its_settings() -> None:
    torch.manual_seed(0)
    net = small_cnn().eval()
    data = export_onnx(net, 24)
    sess = ort_session(data, threads=2, optimization="basic")
    opts = sess.get_session_options()
    assert opts.intra_op_num_threads == 2 and opts.inter_op_num_threads == 1
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert sess.get_providers() == ["CPUExecutionProvider"]
    for b in (1, 5):  # exported on a batch of 2: the batch dimension is dynamic
        x = torch.randn(b, 3, 24, 24)
        out = sess.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            ref = net(x).numpy()
        np.testing.assert_allclose(out, ref, atol=1e-4)
    how = ort_method(sess, 2, "basic")
    assert how["onnxruntime_version"] == ort.__version__ and how["opset"] == ONNX_OPSET
    assert how["intra_op_threads"] == 2 and how["graph_optimization_level"] == "basic"


def test_a_channels_last_bf16_student_is_exported_from_a_float32_copy_and_left_as_it_was() -> None:
    # What a CUDA KD loop leaves behind (channels-last weights), in a non-fp32 dtype: the export
    # works on a float32 CPU copy and never changes the original.
    torch.manual_seed(0)
    net = small_cnn().eval().to(memory_format=torch.channels_last).to(torch.bfloat16)
    sess = ort_session(export_onnx(net, 16))
    assert next(net.parameters()).dtype == torch.bfloat16
    x = torch.randn(2, 3, 16, 16)
    out = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = net.float()(x).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_ort_latencies_are_stored_with_how_they_were_taken() -> None:
    net = small_cnn()
    net.train()
    m = measure_inference(net, 32, "cpu", MeasureConfig(latency=ORT_FAST, energy=NO_ENERGY))
    for b in (1, 4):
        med, p90 = f"latency_ms_b{b}_ort", f"latency_p90_ms_b{b}_ort"
        assert m.values[med] is not None and m.values[med] > 0, m.missing.get(med)
        assert m.values[p90] >= m.values[med]
        how = m.methods[med]
        assert how["runtime"] == "onnxruntime" and how["onnxruntime_version"] == ort.__version__
        assert how["execution_provider"] == "CPUExecutionProvider"
        assert how["intra_op_threads"] == 2 and how["inter_op_threads"] == 1 and how["threads"] == 2
        assert how["graph_optimization_level"] == "extended" and how["opset"] == ONNX_OPSET
        assert "dynamo" in how["export"] and how["export_s"] > 0 and how["onnx_bytes"] > 0
        assert how["batch_size"] == b and how["repeats"] >= 3 and how["device"] == "cpu"
        assert metric_info(med) is not None and metric_info(med).unit == "ms"  # type: ignore[union-attr]
    # The PyTorch figures are still there, and the model's mode is restored.
    assert m.values["latency_ms_b1"] is not None and net.training
    # One export for every batch size.
    assert m.methods["latency_ms_b1_ort"]["export_s"] == m.methods["latency_ms_b4_ort"]["export_s"]


def test_an_export_that_cannot_fit_the_phase_budget_is_missing_with_its_estimate() -> None:
    m = measure_inference(small_cnn(), 32, "cpu", MeasureConfig(latency=ORT_FAST, energy=NO_ENERGY), budget_s=0.05)
    for name in ("latency_ms_b1_ort", "latency_p90_ms_b4_ort"):
        assert m.values[name] is None
        assert m.missing[name].startswith("over budget: ONNX export for ort-cpu estimated"), m.missing[name]
        assert "of measure.max_time" in m.missing[name]
    assert m.methods["latency_ms_b1_ort"]["device"] == "ort-cpu"
    assert m.elapsed_s < 2.0  # refused, not run


def test_a_failed_export_is_missing_everywhere_and_the_rest_survives(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def broken(*args: object, **kwargs: object) -> bytes:
        calls.append(1)
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(runtime_ort, "export_onnx", broken)
    m = measure_inference(small_cnn(), 32, "cpu", MeasureConfig(latency=ORT_FAST, energy=NO_ENERGY))
    assert calls == [1]  # tried once, not once per batch size
    for b in (1, 4):
        assert m.missing[f"latency_ms_b{b}_ort"] == "error: RuntimeError: unsupported operator"
    assert m.values["latency_ms_b4"] is not None


def test_latency_config_accepts_ort_cpu_and_checks_its_keys() -> None:
    assert LatencyConfig(devices=("auto", "cpu", "ort-cpu")).ort_threads == 1
    with pytest.raises(ConfigError, match=r"measure.latency.devices: each must be auto, cpu, cuda or ort-cpu \(got 'onnx'\)"):
        LatencyConfig(devices=("auto", "onnx"))
    with pytest.raises(ConfigError, match="measure.latency.ort_threads: must be >= 1"):
        LatencyConfig(ort_threads=0)
    with pytest.raises(ConfigError, match="measure.latency.ort_optimization: must be disable, basic, extended or all"):
        LatencyConfig(ort_optimization="max")


def _smoke(*sets: str) -> StudyConfig:
    return load_config(SMOKE, list(sets))


def test_preflight_names_the_extra_when_onnxruntime_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _smoke("measure.latency.devices=[auto, ort-cpu]")
    check_ort_runtime(cfg)  # installed here: passes
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(ConfigError) as info:
        check_ort_runtime(cfg)
    msg = str(info.value)
    assert msg == (
        "measure.latency.devices: ort-cpu needs onnxruntime, which is not installed (got 'ort-cpu'); "
        "pip install 'kdsearch[export]', or drop ort-cpu"
    )
    check_ort_runtime(_smoke())  # without ort-cpu onnxruntime is not needed


def test_optimize_refuses_ort_cpu_without_onnxruntime_in_a_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code = run_cli("optimize", "--config", SMOKE, "--run-dir", tmp_path / "run", "--plain",
                   "--set", "measure.latency.devices=[auto, ort-cpu]")
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: measure.latency.devices: ort-cpu needs onnxruntime") and "\n" not in err, err
    assert "pip install 'kdsearch[export]'" in err
    assert not (tmp_path / "run" / "smoke" / "journal.log").exists()  # nothing created


def test_an_ort_objective_needs_the_ort_device() -> None:
    """Refused when the study file loads (before any check of this machine)."""
    with pytest.raises(ConfigError, match=r"objectives.latency_ms_b1_ort: is measured only when "
                                          r"measure.latency.devices lists ort-cpu.*add ort-cpu"):
        _smoke("objectives.latency_ms_b1_ort=minimize")
    with pytest.raises(ConfigError, match=r"constraints.latency_p90_ms_b16_ort"):
        _smoke("constraints.latency_p90_ms_b16_ort=5")


def _optimize(run_dir: Path, cache: Path, n: int, *sets: str) -> None:
    # A roomy measurement budget: on a loaded 2-core machine the first export in a worker (which
    # imports the exporter) takes tens of seconds; the budget itself is tested above.
    args: list[object] = ["optimize", "--config", SMOKE, "--n-trials", n, "--run-dir", run_dir, "--plain",
                          "--cache-dir", cache, "--set", "measure.latency.devices=[auto, ort-cpu]",
                          "--set", "study.grace=300s", "--set", "measure.max_time=120s"]
    for s in sets:
        args += ["--set", s]
    assert run_cli(*args) == 0


def test_ort_latency_on_smoke_trials_and_as_a_constraint(
    smoke_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kdsearch.storage import default_storage_url, load_study

    cache = tmp_path / "cache"
    # The session run's teacher cache, and its fitted teacher where --cache-dir looks for it.
    shutil.copytree(smoke_run / "_cache" / "logits", cache)
    shutil.copytree(smoke_run / "_cache" / "teachers", cache / "_teachers")
    # A limit every student meets: feasible, the figure and its method stored on every trial.
    loose = tmp_path / "loose"
    _optimize(loose, cache, 2, "constraints.latency_ms_b1_ort=1000")
    capsys.readouterr()
    trials = load_study(default_storage_url(loose, "smoke"), "smoke").get_trials()
    assert len(trials) == 2
    for t in trials:
        assert t.state.name == "COMPLETE"
        ua = t.user_attrs
        for name in ("latency_ms_b1_ort", "latency_p90_ms_b1_ort", "latency_ms_b16_ort", "latency_p90_ms_b16_ort"):
            assert isinstance(ua[name], float) and ua[name] > 0, (name, ua["missing_metrics"].get(name))
        how = ua["methods"]["latency_ms_b1_ort"]
        assert how["onnxruntime_version"] == ort.__version__ and how["execution_provider"] == "CPUExecutionProvider"
        assert how["intra_op_threads"] == 1 and how["graph_optimization_level"] == "all" and how["opset"] == ONNX_OPSET
        assert t.constraints["latency_ms_b1_ort"] == pytest.approx(ua["latency_ms_b1_ort"] - 1000)
        assert ua["feasible"] is True

    # A limit no student meets: infeasible, with the stored violation value - limit.
    tight = tmp_path / "tight"
    _optimize(tight, cache, 1, "constraints.latency_ms_b1_ort=1e-9", "measure.latency.ort_threads=2")
    capsys.readouterr()
    (t,) = load_study(default_storage_url(tight, "smoke"), "smoke").get_trials()
    ua = t.user_attrs
    assert t.state.name == "PRUNED" and ua["screened"] is True and ua["feasible"] is False  # screened before the box
    assert ua["methods"]["latency_ms_b1_ort"]["intra_op_threads"] == 2
    assert t.constraints["latency_ms_b1_ort"] == pytest.approx(ua["latency_ms_b1_ort"] - 1e-9)
    assert ua["constraint_violations"]["latency_ms_b1_ort"] == pytest.approx(ua["latency_ms_b1_ort"] - 1e-9)
    assert "latency_ms_b1_ort" in ua["infeasible_reason"]
