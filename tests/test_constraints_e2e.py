"""Constraints reach the sampler and the front: value minus limit through trial.set_constraint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kdsearch.storage import SHARED_CACHE_DIR, default_storage_url, load_study

from cli_helpers import SMOKE, run_cli


def test_an_unmeetable_constraint_leaves_no_feasible_trial(
    smoke_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    # The session run's fitted teacher and teacher cache, which every study of a run folder shares.
    shutil.copytree(smoke_run / SHARED_CACHE_DIR, run_dir / SHARED_CACHE_DIR)
    code = run_cli(
        "optimize", "--config", SMOKE, "--n-trials", "2", "--run-dir", run_dir, "--plain",
        "--set", "constraints.params=1",  # no student has a single parameter
        # Loose, but missing: a 10 ms measurement budget cannot time batch 16. (A GPU-only figure
        # such as kd_energy_j is refused on the CPU before the study starts.)
        "--set", "constraints.latency_ms_b16=1.0e9", "--set", "measure.max_time=0.01s",
    )
    assert code == 0
    capsys.readouterr()
    study = load_study(default_storage_url(run_dir, "smoke"), "smoke")
    trials = study.get_trials()
    assert len(trials) == 2
    for t in trials:
        # Params depend on the architecture only: the trial ends before the box (issue 12).
        assert t.state.name == "PRUNED" and t.user_attrs["screened"] is True
        # What the sampler sees (TPE and NSGA-II read trial.constraints): violation = value - limit.
        assert t.constraints["params"] == pytest.approx(t.user_attrs["params"] - 1)
        assert t.user_attrs["latency_ms_b16"] is None
        assert t.constraints["latency_ms_b16"] > 0  # missing counts as infeasible
        assert t.user_attrs["feasible"] is False
        reason = t.user_attrs["infeasible_reason"]
        assert "params=" in reason and "latency_ms_b16 missing" in reason
    assert run_cli("trials", "--study-name", "smoke", "--run-dir", run_dir, "--pareto", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows, "infeasible trials are listed (marked), not hidden"
    assert not any(r["pareto"] for r in rows)
    assert all(r["feasible"] is False for r in rows)
    assert run_cli("trials", "--study-name", "smoke", "--run-dir", run_dir, "--pareto") == 0
    assert "INFEASIBLE" in capsys.readouterr().out
