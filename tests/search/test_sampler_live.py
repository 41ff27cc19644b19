"""Issue 21 live: the rung-aware sampler (``study.sampler: tpe-impute``), on two worker processes
sharing one journal, reads the PRUNED trials of both workers from the storage (a rehearsal: the
live stack replaying the recorded table, kdsearch.search.rehearsal, so a trial takes a tenth of a
second). The bundled studies keep ``tpe`` (the replay found no gain, benchmarks/RESULTS.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState

from kdsearch import trial_record as tr

from cli_helpers import run_cli
from search_helpers import assert_no_storage_errors, open_study

ROOT = Path(__file__).resolve().parents[2]
TABLE = ROOT / "benchmarks" / "search_table" / "table.jsonl"
N_TRIALS = 60


@pytest.mark.slow
def test_the_rung_aware_sampler_reads_the_other_workers_pruned_trials(tmp_path: Path) -> None:
    sampler = "tpe-impute"
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({
        "study": {"name": "live", "sampler": sampler, "run_dir": str(tmp_path), "budget": "30d", "trial_time": "30s",
                  "grace": "30s", "n_startup_trials": 4, "pruning": {"enabled": True}},
        "student": {"family": "vgg", "resolution": [16, 32],
                    "vgg": {"depth": [2, 3, 4, 5, 8], "width": {"low": 0.0625, "high": 0.5, "log": True}}},
        "distill": {"temperature": {"low": 2.0, "high": 6.0, "log": True}, "alpha": {"low": 0.5, "high": 0.9},
                    "eval_every_fraction": 0.25},
        "objectives": {"val_accuracy": "maximize", "macs": "minimize"},
        "constraints": {"params": 300000},
        "measure": {"max_time": "0.5s"},
        "rehearsal": {"table": str(TABLE), "speed": 300},
    }, sort_keys=False))
    assert run_cli("optimize", "--config", config, "--workers", "2", "--n-trials", N_TRIALS, "--plain") == 0
    trials = open_study(tmp_path, "live").get_trials()
    assert len(trials) == N_TRIALS and {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2
    pruned_at_rung = [t for t in trials if t.state == TrialState.PRUNED and f"{tr.RUNG_PREFIX}0" in t.user_attrs]
    assert pruned_at_rung, "no trial was stopped at a rung"

    # Each proposal after the start-up trials records what the sampler read; some of them
    # presented PRUNED trials to TPE with an imputed value. One that presented more PRUNED trials
    # than its own worker had stopped by then read the other worker's from the shared storage.
    proposed = [t for t in trials if tr.SAMPLER_INPUT in t.user_attrs]
    assert proposed and all(t.user_attrs[tr.SAMPLER_INPUT]["mode"] == sampler.removeprefix("tpe-") for t in proposed)
    assert any(t.user_attrs[tr.SAMPLER_INPUT]["pruned_presented"] > 0 for t in proposed)

    def own_pruned_before(t) -> int:  # noqa: ANN001
        pid = t.user_attrs["worker"]["pid"]
        return sum(1 for p in pruned_at_rung
                   if p.user_attrs["worker"]["pid"] == pid and p.datetime_complete < t.datetime_complete)

    assert any(t.user_attrs[tr.SAMPLER_INPUT]["pruned_presented"] > own_pruned_before(t) for t in proposed), [
        (t.number, t.user_attrs[tr.SAMPLER_INPUT], own_pruned_before(t)) for t in proposed]
    assert_no_storage_errors(tmp_path, "live")
