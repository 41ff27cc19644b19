"""Several worker processes on one journal file: exactly N trials, no duplicates, none lost."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from optuna.trial import TrialState

from kdsearch.config import apply_overrides, load_config
from kdsearch.search import supervisor
from kdsearch.search.study import create_or_resume
from kdsearch.search.worker import align_objectives

from cli_helpers import SMOKE, run_cli
from search_helpers import (
    artifact_sha,
    assert_no_storage_errors,
    open_study,
    optimize_args,
    seed_study_folder,
    worker_statuses,
)


def test_four_workers_on_a_journal_finish_exactly_n_trials(smoke_run: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(supervisor.KEEP_WORKER_FILES_ENV, "1")  # a clean run would remove them: read below
    seed_study_folder(smoke_run, tmp_path, "w4")
    code = run_cli(*optimize_args(tmp_path, "w4", "--workers", "4", "--n-trials", "8", "--set", "study.trial_time=1s"))
    assert code == 0
    trials = open_study(tmp_path, "w4").get_trials()
    assert [t.number for t in trials] == list(range(8))  # unique numbers, none lost, none extra
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 8, [t.user_attrs.get("fail_detail") for t in trials]
    # Every trial stored its own checkpoint: 8 distinct artifact ids, 8 files, hashes as recorded.
    ids = {t.user_attrs["artifact_id"] for t in trials}
    assert len(ids) == 8 and len(list((tmp_path / "w4" / "artifacts").iterdir())) == 8
    for t in trials:
        assert artifact_sha(tmp_path, "w4", t.user_attrs["artifact_id"]) == t.user_attrs["weights_sha256"]
    # Four separate processes did the work, each with its own sampler seed: no two trials share
    # their parameters (one seed in every worker would replay the same startup draws 4 times).
    pids = {t.user_attrs["worker"]["pid"] for t in trials}
    assert len(pids) >= 2
    assert len(worker_statuses(tmp_path, "w4")) == 4
    params = [json.dumps(t.params, sort_keys=True) for t in trials]
    assert len(set(params)) == 8, params
    for t in trials:
        assert t.values == [t.user_attrs["val_accuracy"], t.user_attrs["macs"]]
    assert_no_storage_errors(tmp_path, "w4")


def test_workers_are_pinned_to_the_visible_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa,GPU-bbbb,GPU-cccc")  # torch sees the first 2
    assert supervisor._visible_gpus() == ["GPU-aaaa", "GPU-bbbb"]
    assert supervisor.default_workers() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert supervisor._visible_gpus() == ["0", "1"]
    env = supervisor.worker_env("1", base={"PATH": "/bin"})
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["PATH"] == "/bin"
    assert Path(env["PYTHONPATH"].split(":")[0], "kdsearch", "cli.py").is_file()
    assert "CUDA_VISIBLE_DEVICES" not in supervisor.worker_env(None, base={})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert supervisor._visible_gpus() == [] and supervisor.default_workers() == 1


def test_a_worker_tells_values_in_the_stored_objective_order(tmp_path: Path) -> None:
    """Resuming with the objectives listed in another order passes the (set-wise) resume check;
    the worker must still return values in the study's order."""
    cfg = apply_overrides(load_config(SMOKE), run_dir=str(tmp_path))
    study, _ = create_or_resume(cfg)
    swapped = replace(cfg, objectives={"macs": "minimize", "val_accuracy": "maximize"})
    again, resumed = create_or_resume(swapped)
    assert resumed and again.metric_names == ["val_accuracy", "macs"]
    assert align_objectives(swapped, again).metric_names == ["val_accuracy", "macs"]
    assert align_objectives(cfg, again) is cfg
    # The stored config keeps the order too (`kdsearch worker` rebuilds its config from it).
    assert list(study.user_attrs["config"]["objectives"]) == ["val_accuracy", "macs"]


def test_cpu_workers_split_the_cores_instead_of_oversubscribing() -> None:
    import os

    from kdsearch.search.supervisor import worker_env

    env = worker_env(None, base={}, cpu_workers=2)
    assert env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    assert "OMP_NUM_THREADS" not in worker_env(None, base={}, cpu_workers=1)
    assert worker_env(None, base={"OMP_NUM_THREADS": "3"}, cpu_workers=4)["OMP_NUM_THREADS"] == "3"
    assert "OMP_NUM_THREADS" not in worker_env("0", base={}, cpu_workers=4)
