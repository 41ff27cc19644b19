"""The soak (benchmarks/soak.py) at test scale: rehearsed trials through the real `kdsearch
optimize` supervisor, its workers, the rung pruner and the journal storage, with faults injected;
nothing may be lost or run twice.

The small soak (a few dozen trials, one SIGKILL of a worker in a trial) runs in the default suite;
the scaled-down one (a few hundred trials, 4 objectives, a transient journal write error and a
SIGKILL of the supervisor, then a resume) is ``slow``. The full soak (3,000 trials) is run by hand:
``python benchmarks/soak.py`` (benchmarks/RESULTS.md, "Issue 19 -- soak").
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from soak import Leg, Settings, soak  # noqa: E402


def _check(doc: dict[str, Any], leg: Leg, faults: list[str]) -> dict[str, Any]:
    result = doc["legs"][leg.name]
    f, log = result["figures"], result["log"]
    assert not log["timed_out"], log
    assert [x["kind"] for x in log["faults"]] == faults, log["faults"]
    assert f["lost"]["total"] == 0 and f["lost"]["left_running"] == [], f["lost"]
    assert f["duplicates"] == 0
    assert set(f["states"]) <= {"COMPLETE", "PRUNED", "FAIL", "WAITING"}, f["states"]
    assert f["finished"] >= leg.trials
    assert f["states"].get("PRUNED", 0) > 0 and f["states"].get("COMPLETE", 0) > 0, f["states"]
    assert f["rung_decision_s"]["decisions"] > 0
    assert all(s["bytes"] > 0 for s in f["storage"]), f["storage"]
    return result


def test_a_small_soak_with_a_killed_worker_loses_nothing(tmp_path: Path) -> None:
    leg = Leg("journal", 3, 24)
    s = Settings(workers=2, box_s=30.0, speed=60.0, grace_s=2.0, faults=("worker-kill",), rounds=1,
                 tmpfs_mb=256, leg_timeout_s=150.0, cli=False)
    result = _check(soak([leg], s, tmp_path), leg, ["worker-kill"])
    killed = result["log"]["faults"][0]
    assert killed.get("pid"), killed  # a worker was there to kill
    assert result["figures"]["fail_reasons"] in ({"stale": 1}, {}), result["figures"]["fail_reasons"]


@pytest.mark.slow
def test_a_scaled_down_soak_survives_storage_errors_and_a_killed_supervisor(tmp_path: Path) -> None:
    leg = Leg("journal", 4, 300)
    s = Settings(workers=4, box_s=30.0, speed=30.0, faults=("storage", "supervisor-kill"), rounds=1,
                 tmpfs_mb=512, leg_timeout_s=900.0)
    result = _check(soak([leg], s, tmp_path), leg, ["storage", "supervisor-kill"])
    runs = result["log"]["supervisor_runs"]
    assert len(runs) == 2 and runs[0]["killed_by_driver"] and runs[1]["exit_code"] == 0, runs
    for label in ("trials_pareto", "report"):
        assert result["figures"]["cli"][label]["exit_code"] == 0, result["figures"]["cli"]
