"""A study stored by an earlier kdsearch still loads: report, trials, table and export read it.

``legacy_v1/legacy/`` is a journal study (and its artifact store) written by the real
``kdsearch optimize`` of the version before the trial record moved into one module
(``kdsearch/trial_record.py``). It was made with::

    kdsearch optimize --config studies/smoke.yaml --run-dir R --study-name legacy --plain \\
        --n-trials 8 --set study.pruning.enabled=true --set study.pruning.min_competitors=1 \\
        --set study.trial_time=1.5s --set constraints.macs=300000 \\
        --set debug.inject=error --set debug.inject_trial=2
    # then the same without debug.inject and --n-trials 3

It holds one trial of each kind the search stores: 0 screened before training (macs over the
limit, PRUNED), 1 COMPLETE with its checkpoint, 2 FAIL (injected error), 3-10 PRUNED at a rung.
The answers below were read from the file as written, not from the code under test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from optuna.trial import TrialState

from kdsearch.report.pareto import feasible, infeasible_reason, pareto_front, trial_rows, trial_state_label
from kdsearch.storage import default_storage_url, load_study

from cli_helpers import run_cli

SOURCE = Path(__file__).resolve().parent / "legacy_v1"


@pytest.fixture
def legacy_run(tmp_path: Path) -> Path:
    """A private copy (reading a journal may write its lock file beside it)."""
    dst = tmp_path / "run"
    shutil.copytree(SOURCE, dst)
    return dst


def test_the_legacy_study_reads_as_it_was_stored(legacy_run: Path) -> None:
    study = load_study(default_storage_url(legacy_run, "legacy"), "legacy")
    trials = study.get_trials()
    assert [t.state for t in trials[:3]] == [TrialState.PRUNED, TrialState.COMPLETE, TrialState.FAIL]
    assert all(t.state == TrialState.PRUNED for t in trials[3:]) and len(trials) == 11

    screened, complete, failed = trials[0], trials[1], trials[2]
    assert screened.user_attrs["screened"] is True
    assert screened.user_attrs["screen_reason"] == "macs=3.291e+05 > 3e+05"
    assert screened.user_attrs["screened_values"]["val_accuracy"] is None
    assert failed.user_attrs["fail_reason"] == "error"
    assert failed.user_attrs["fail_detail"] == "RuntimeError: injected error"
    for t in trials[3:]:
        assert t.user_attrs["pruned_rung"] in (1 / 9, 1 / 3) and t.user_attrs["pruned_rank"] >= 1

    assert feasible(complete) and infeasible_reason(complete) is None
    assert not feasible(screened) and trial_state_label(screened) == "PRUNED"
    assert trial_state_label(failed) == "FAIL"
    assert [t.number for t in pareto_front(study)] == [1]
    rows = trial_rows(study, trials)
    assert [r.number for r in rows] == [t.number for t in trials]


def test_the_cli_reads_the_legacy_study(legacy_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--study-name", "legacy", "--run-dir", str(legacy_run)]
    assert run_cli("trials", *common, "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [t["number"] for t in listed] == list(range(11))
    assert run_cli("trials", *common, "--pareto") == 0
    assert "vgg4-w0.0187@16" in capsys.readouterr().out
    assert run_cli("table", *common, "--rows", "vgg_depth", "--cols", "resolution", "--metric", "val_accuracy") == 0
    out = legacy_run / "report.html"
    assert run_cli("report", *common, "--out", str(out)) == 0
    assert out.stat().st_size > 0
    export = legacy_run / "export"
    assert run_cli("export", *common, "--pick", "max val_accuracy", "--out", str(export)) == 0
    card = json.loads((export / "card.json").read_text())
    assert card["trial_number"] == 1 and card["feasible"] is True
    assert card["metrics"]["val_accuracy"]["value"] == pytest.approx(0.640625)
