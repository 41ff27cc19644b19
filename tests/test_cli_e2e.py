"""End to end through the CLI: optimize -> storage -> trials --json -> export -> load_student."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

import kdsearch
from kdsearch.commands.optimize import EXIT_ALL_FAILED
from kdsearch.config import apply_overrides, load_config
from kdsearch.storage import default_storage_url, load_study, run_paths

from cli_helpers import ROOT, SMOKE, run_cli

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
        # The device it trained on is stored with it (here the CPU: fp32, no energy method).
        dev = ua["device_info"]
        assert dev["device"] == "cpu" and dev["precision"] == "fp32" and dev["torch"] == torch.__version__
        assert dev["energy"].startswith("none (")
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
    assert run_cli("trials", "--study-name", "smoke", "--run-dir", smoke_run) == 0
    assert "trained on cpu fp32" in " ".join(capsys.readouterr().out.split())  # the device, in the title


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


def test_export_without_trial_or_pick_uses_the_reports_default_pick(
    smoke_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kdsearch.export.pick import default_pick_rule, pick_trial

    study = _study(smoke_run)
    rule = default_pick_rule(study)
    want = pick_trial(study, rule).number
    out_dir = tmp_path / "default"
    assert run_cli("export", "--study-name", "smoke", "--run-dir", smoke_run, "--out", out_dir) == 0
    out = capsys.readouterr().out
    assert f"no --trial or --pick: the report's default pick, --pick {rule!r}" in out
    assert f"exported trial {want} (picked by --pick {rule!r})" in out
    assert json.loads((out_dir / "card.json").read_text())["trial_number"] == want


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


def test_resume_with_pruning_switched_on_is_an_error(copy_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """study.pruning is in the search signature: a pruned trial has no final figures, so a study
    run without it is not resumed with it (nor the other way round)."""
    code = run_cli("optimize", "--config", SMOKE, "--n-trials", "1", "--run-dir", copy_run,
                   "--set", "study.pruning.enabled=true", "--plain")
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "pruning.enabled" in err and err.count("\n") == 0
    assert len(_study(copy_run).trials) == 3


def test_pruning_keys_are_checked_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for override, field in (("study.pruning.eta=1", "study.pruning.eta"),
                            ("study.pruning.min_fraction=1.5", "study.pruning.min_fraction"),
                            ("study.pruning.min_competitors=0", "study.pruning.min_competitors"),
                            ("study.pruning.bogus=1", "study.pruning.bogus")):
        code = run_cli("optimize", "--config", SMOKE, "--n-trials", "1", "--set", override, "--plain")
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and field in err, (override, err)


def test_env_prints_what_a_bug_report_needs(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("env", "--json") == 0
    env = json.loads(capsys.readouterr().out)
    assert env["torch"] == torch.__version__
    # Why torch has no usable GPU, the diagnosis optimize gives (None where one is usable).
    assert env["cuda_usable"] == (env["cuda_diagnosis"] is None and torch.cuda.device_count() > 0)
    if not env["cuda_usable"]:
        assert env["cuda_diagnosis"]
    text = json.dumps(env)
    for key in ("optuna", "timm", "ptflops", "nvml"):
        assert key in text, key
    assert run_cli("env") == 0
    assert "environment" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without a usable GPU")
def test_a_gpu_study_is_refused_at_once_without_a_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """study.device: cuda (the bundled GPU studies) on a machine without a usable GPU: one line that
    says why and what to do, exit 2, and nothing written; --set study.device=cpu is the way out."""
    run_dir = tmp_path / "runs"
    code = run_cli("optimize", "--config", "cifar10-deit", "--run-dir", run_dir, "--plain")
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert "study.device: cuda needs a usable CUDA GPU" in err and "--set study.device=cpu" in err
    assert not run_dir.exists()  # refused before any storage or folder was made


def test_help_loads_no_heavy_library() -> None:
    """``kdsearch --help`` and every ``kdsearch <command> --help`` build their parsers without
    torch, Optuna, timm or plotly: each command imports those inside its ``run``. Nor rich, YAML or
    the study-file package: together they were half of the time ``--help`` took."""
    import subprocess
    import sys

    from kdsearch.cli import COMMANDS

    names = list(COMMANDS)
    code = (
        "import sys\n"
        "from kdsearch.cli import main\n"
        f"for argv in [['--help'], ['--version']] + [[c, '--help'] for c in {names!r}]:\n"
        "    assert main(argv) == 0, argv\n"
        "heavy = [m for m in ('torch', 'optuna', 'timm', 'plotly', 'rich', 'yaml', 'kdsearch.config', 'zeus') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in names:
        assert name in out.stdout


def test_top_level_help_imports_no_command_module_and_lists_every_command() -> None:
    """``kdsearch --help`` reads the static command table (names and one-line helps) and imports
    no command module; the table names exactly the command modules, and each module's subparser
    carries the table's help."""
    import argparse
    import importlib
    import pkgutil
    import subprocess
    import sys

    import kdsearch.commands
    from kdsearch.cli import build_parser
    from kdsearch.commands import COMMAND_HELP

    shared = {"arguments", "output"}  # helpers of the commands, not commands
    modules = {m.name for m in pkgutil.iter_modules(kdsearch.commands.__path__)} - shared
    assert set(COMMAND_HELP) == modules
    class Recorder:  # the subparsers object a command module adds itself to, remembering its help
        def __init__(self) -> None:
            self.sub, self.helps = argparse.ArgumentParser().add_subparsers(), []

        def add_parser(self, name: str, **kwargs):
            self.helps.append((name, kwargs.get("help")))
            return self.sub.add_parser(name, **kwargs)

    for name, help_text in COMMAND_HELP.items():
        rec = Recorder()
        importlib.import_module(f"kdsearch.commands.{name}").add_parser(rec)
        assert rec.helps == [(name, help_text)]
    code = (
        "import sys\n"
        "from kdsearch.cli import main\n"
        "assert main(['--help']) == 0\n"
        "print(sorted(m for m in sys.modules if m.startswith('kdsearch.commands.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
    listing = " ".join(out.stdout.split())
    for name, help_text in COMMAND_HELP.items():
        assert f"{name} {help_text}" in listing
    assert build_parser().format_help() == build_parser([]).format_help()  # full or bare: the same listing


def test_export_format_choices_are_the_export_formats() -> None:
    """``--format`` offers exactly the formats the export writes (one tuple in kdsearch.constants)."""
    import argparse

    from kdsearch.commands import export as export_command
    from kdsearch.export import FORMATS, MODEL_FILES

    sub = argparse.ArgumentParser().add_subparsers()
    parser = export_command.add_parser(sub)
    assert "--format {" + ",".join(FORMATS) + "}" in parser.format_help()
    assert list(FORMATS) == list(MODEL_FILES)  # a writer for each


# -- issue 13: bundled studies, a CLI that answers at once, tidy run folders ------------------------

NO_MODEL_CODE = """
import sys
from kdsearch.cli import main
code = main(sys.argv[1:])
heavy = [m for m in ('torch', 'timm', 'plotly', 'torchvision') if m in sys.modules]
print('RESULT', code, heavy, file=sys.stderr)
"""

NO_MODEL_CASES = [
    ("trials", lambda run, t: ["trials", "--study-name", "smoke", "--run-dir", run], 0),
    ("trials-pareto-json", lambda run, t: ["trials", "--study-name", "smoke", "--run-dir", run, "--pareto", "--json"], 0),
    ("table", lambda run, t: ["table", "--study-name", "smoke", "--run-dir", run, "--rows", "vgg_depth",
                              "--cols", "resolution", "--metric", "val_accuracy"], 0),
    ("studies", lambda run, t: ["studies"], 0),
    ("studies-show", lambda run, t: ["studies", "show", "paper/table1-arch"], 0),
    ("argument-error", lambda run, t: ["optimize", "--config", "smoke", "--n-trials", "0"], 2),
    ("unknown-study-name", lambda run, t: ["optimize", "--config", "smoek"], 2),
    ("empty-study-file", lambda run, t: ["optimize", "--config", _touch(t / "empty.yaml")], 2),
    ("section-error", lambda run, t: ["optimize", "--config", "smoke", "--set", "distill.alpha=3"], 2),
    ("duration-error", lambda run, t: ["optimize", "--config", "smoke", "--budget", "2x"], 2),
    ("unknown-key", lambda run, t: ["optimize", "--config", "smoke", "--set", "measure.latncy.repeats=3"], 2),
]


def _touch(path: Path) -> Path:
    path.write_text("")
    return path


@pytest.mark.parametrize(("name", "argv", "expected"), NO_MODEL_CASES, ids=[c[0] for c in NO_MODEL_CASES])
def test_commands_that_need_no_model_never_load_torch(name: str, argv, expected: int, smoke_run: Path, tmp_path: Path) -> None:
    """Reading a study, listing the bundled studies and every argument or study-file error in a
    section other than ``student`` answer without torch, timm or plotly (seconds saved on each).
    They run from another folder, so bundled names resolve without the repository."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    args = [str(a) for a in argv(smoke_run, tmp_path)]
    out = subprocess.run([sys.executable, "-c", NO_MODEL_CODE, *args], capture_output=True, text=True, cwd=cwd,
                         check=False, timeout=120)
    result = out.stderr.strip().splitlines()[-1]
    assert result == f"RESULT {expected} []", (name, out.stderr[-1500:])


def test_studies_lists_and_shows_every_bundled_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    top = ROOT / "studies"
    in_repo = sorted(str(p.relative_to(top).with_suffix("")) for p in top.rglob("*.yaml"))
    monkeypatch.chdir(tmp_path)  # from any folder
    assert run_cli("studies") == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.strip() and not line.startswith("run one")]
    assert sorted(line.split()[0] for line in rows) == in_repo
    smoke_row = next(line for line in rows if line.split()[0] == "smoke")
    assert smoke_row.split(None, 1)[1] == "Smoke study: synthetic data, a tiny ViT teacher fitted on the spot, seconds per trial."
    assert all(len(line.split(None, 1)) == 2 for line in rows), "every bundled study has a description"
    assert run_cli("studies", "show", "smoke") == 0
    assert capsys.readouterr().out == SMOKE.read_text()
    # As --config: a bundled name, its file name, or its repository path, from this folder.
    want = load_config(SMOKE).search_signature()
    for name in ("smoke", "smoke.yaml", "studies/smoke.yaml"):
        assert load_config(name).search_signature() == want, name
    assert load_config("paper/table1-arch").study.name == "table1-arch"
    # A file of that name in this folder wins over the bundled study.
    (tmp_path / "smoke.yaml").write_text(SMOKE.read_text().replace("name: smoke", "name: my-smoke"))
    assert load_config("smoke.yaml").study.name == "my-smoke"


def test_a_clean_run_leaves_no_worker_files(smoke_run: Path) -> None:
    workers = smoke_run / "smoke" / "workers"
    assert workers.is_dir() and not list(workers.iterdir())


def test_a_failed_trial_keeps_its_workers_log(copy_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A study of its own in the smoke run folder (it shares the smoke study's fitted teacher and
    # cache) with a box long enough that the injected error (at step 3) fires on a loaded machine.
    code = run_cli("optimize", "--config", SMOKE, "--n-trials", "1", "--run-dir", copy_run, "--plain",
                   "--study-name", "failing", "--trial-time", "60s", "--set", "debug.inject=error")
    captured = capsys.readouterr()
    out = captured.out
    # Issue 22: every trial of this run failed (none COMPLETE or PRUNED): a script must see it.
    assert code == EXIT_ALL_FAILED == 3, out[-3000:] + captured.err[-2000:]
    assert "every trial of this run failed (1)" in captured.err
    trial = load_study(default_storage_url(copy_run, "failing"), "failing").trials[-1]
    assert trial.state == TrialState.FAIL and trial.user_attrs["fail_reason"] == "error"
    logs = list((copy_run / "failing" / "workers").glob("kdsearch-run-*/worker*.log"))
    assert len(logs) == 1, logs
    assert f"logs of workers with failed trials (kept): {logs[0]}" in out
    text = logs[0].read_text()
    assert f"trial {trial.number} failed:" in text and "Traceback" in text and "injected error" in text
    # What a re-run of that worker needs stays beside it: its spec and its last status.
    assert {p.name for p in logs[0].parent.iterdir()} == {"worker0-0.log", "worker0-0.json", "spec-worker0-0.json"}


def test_the_progress_line_says_when_the_teacher_accuracy_is_measured(copy_run: Path) -> None:
    from kdsearch.search.worker_setup import prepare_worker

    cfg = apply_overrides(load_config(SMOKE), run_dir=str(copy_run))
    seen: list[tuple[str, str]] = []
    prepare_worker(cfg, run_paths(copy_run, "smoke"), torch.device("cpu"), progress=lambda p, f, m: seen.append((p, m)))
    messages = [m for _, m in seen]
    measuring = messages.index("measuring teacher ViT-tiny accuracy (val, test)")
    assert messages.index("creating teacher ViT-tiny") < measuring
    assert "teacher-fit" not in [p for p, _ in seen[measuring:]]  # measured after the fit, not during it


def test_the_cli_default_run_dir_is_the_study_files() -> None:
    """``--run-dir`` defaults to the study file's ``study.run_dir`` (one value in kdsearch.constants,
    which ``--help`` reads without loading the study-file package)."""
    import argparse

    from kdsearch.commands.arguments import add_storage_args
    from kdsearch.config import StudyRunConfig

    parser = argparse.ArgumentParser()
    add_storage_args(parser)
    assert parser.parse_args(["--study-name", "s"]).run_dir == StudyRunConfig().run_dir == "runs"
