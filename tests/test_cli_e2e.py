"""End to end through the CLI: optimize -> storage -> trials --json -> export -> load_student."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

import kdsearch
from kdsearch.storage import default_storage_url, load_study

from cli_helpers import SMOKE, run_cli

REQUIRED_ATTRS = ("val_accuracy", "test_accuracy", "kd_time_s", "params", "macs", "teacher", "spec",
                  "artifact_id", "weights_sha256", "latency_ms_b1", "latency_ms_b16", "model_size_mb",
                  "activation_peak_mb_b1", "methods", "missing_metrics")


def _study(run_dir: Path) -> optuna.Study:
    return load_study(default_storage_url(run_dir, "smoke"), "smoke")


def test_smoke_study_stores_complete_trials(smoke_run: Path) -> None:
    study = _study(smoke_run)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert study.metric_names == ["val_accuracy", "macs"]
    for t in trials:
        for key in REQUIRED_ATTRS:
            assert key in t.user_attrs, key
        ua = t.user_attrs
        assert 0.0 <= ua["val_accuracy"] <= 1.0
        assert 0 < ua["kd_time_s"] <= 2.0 + 1.0  # the 2 s box plus slack for the last step
        assert ua["macs"] > 0 and ua["params"] > 0
        assert t.values == [ua["val_accuracy"], ua["macs"]]
        # CPU: energy and CUDA memory are missing with a reason, never 0.
        assert ua["kd_energy_j"] is None and ua["missing_metrics"]["kd_energy_j"]
        assert ua["peak_kd_memory_mb"] is None and "CUDA" in ua["missing_metrics"]["peak_kd_memory_mb"]
        assert ua["kd_history"]["teacher_forward_count"] == 0  # the cache paid the teacher once
    attrs = study.user_attrs
    assert attrs["config"]["study"]["name"] == "smoke"
    assert "ViT-tiny" in attrs["teachers"]
    assert attrs["time_spent_s"] > 0
    assert 0.0 <= attrs["teachers"]["ViT-tiny"]["val_accuracy"] <= 1.0


def test_trials_json_and_pareto(smoke_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("trials", "--study-name", "smoke", "--run-dir", smoke_run, "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3 and {r["state"] for r in rows} == {"COMPLETE"}
    assert set(rows[0]) >= {"number", "state", "params", "values", "user_attrs"}
    assert run_cli("trials", "--study-name", "smoke", "--run-dir", smoke_run, "--json", "--pareto") == 0
    front = json.loads(capsys.readouterr().out)
    assert front and all(r["pareto"] for r in front)


def test_export_round_trips_exactly(smoke_run: Path, tmp_path: Path) -> None:
    from kdsearch.checkpoint import load_student_file

    study = _study(smoke_run)
    trial = study.trials[0]
    out = tmp_path / "exported"
    assert run_cli("export", "--study-name", "smoke", "--run-dir", smoke_run, "--trial", "0", "--out", out) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["spec"] == trial.user_attrs["spec"]
    model = kdsearch.load_student(str(out))
    original, spec = load_student_file(
        next((smoke_run / "smoke" / "artifacts").rglob(trial.user_attrs["artifact_id"]))
    )
    x = torch.randn(4, 3, spec.resolution, spec.resolution, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), original(x))


def test_resume_adds_trials_without_duplicates(copy_run: Path) -> None:
    before = {t.number: t.values for t in _study(copy_run).trials}
    assert run_cli("optimize", "--config", SMOKE, "--n-trials", "2", "--run-dir", copy_run, "--plain") == 0
    trials = _study(copy_run).trials
    assert [t.number for t in trials] == list(range(5))
    assert {t.number: t.values for t in trials[:3]} == before


def test_resume_with_a_different_space_is_an_error(copy_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_cli("optimize", "--config", SMOKE, "--n-trials", "1", "--run-dir", copy_run,
                   "--set", "student.vgg.depth=[2]", "--plain")
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "student.vgg.depth" in err and err.count("\n") == 0
    assert len(_study(copy_run).trials) == 3


def test_env_prints_what_a_bug_report_needs(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("env", "--json") == 0
    env = json.loads(capsys.readouterr().out)
    assert env["torch"] == torch.__version__
    text = json.dumps(env)
    for key in ("optuna", "timm", "ptflops", "nvml"):
        assert key in text, key
    assert run_cli("env") == 0
    assert "environment" in capsys.readouterr().out


def test_help_loads_no_heavy_library() -> None:
    """``kdsearch --help`` and every ``kdsearch <command> --help`` build their parsers without
    torch, Optuna, timm or plotly: each command imports those inside its ``run``."""
    import subprocess
    import sys

    from kdsearch.cli import COMMANDS

    names = [c.__name__.rsplit(".", 1)[1] for c in COMMANDS]
    code = (
        "import sys\n"
        "from kdsearch.cli import main\n"
        f"for argv in [['--help'], ['--version']] + [[c, '--help'] for c in {names!r}]:\n"
        "    assert main(argv) == 0, argv\n"
        "heavy = [m for m in ('torch', 'optuna', 'timm', 'plotly') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in names:
        assert name in out.stdout


def test_export_format_choices_are_the_export_formats() -> None:
    from kdsearch.commands.export import FORMAT_CHOICES
    from kdsearch.export import FORMATS

    assert FORMAT_CHOICES == list(FORMATS)
