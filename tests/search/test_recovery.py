"""Stale-trial recovery: kdsearch's own heartbeats (journal, sqlite) and Optuna's RDB heartbeats
(run on sqlite here, the same code path PostgreSQL takes, so it is tested without a server)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from kdsearch.search.recovery import (
    fail_stale_trials,
    first_heartbeat,
    pid_alive,
    recover_stale,
    stale_trial_callback,
    trial_heartbeat,
    uses_optuna_heartbeat,
)
from kdsearch.storage import GRACE_ENV, INTERVAL_ENV, heartbeat_interval_s, stale_trial_ids


def _study(tmp_path: Path) -> optuna.Study:
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "j.log")))
    return optuna.create_study(storage=storage, study_name="s")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_dead_worker_trial_becomes_stale_and_is_requeued_once(tmp_path: Path) -> None:
    study = _study(tmp_path)
    done = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    study.tell(done, 1.0)
    t = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    t.set_user_attr("worker", {"host": socket.gethostname(), "pid": _dead_pid()})
    assert fail_stale_trials(study, max_retries=1) == [t.number]
    failed = study.trials[t.number]
    assert failed.state == TrialState.FAIL and failed.user_attrs["fail_reason"] == "stale"
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].system_attrs["fixed_params"] == failed.params
    assert waiting[0].user_attrs["retry_of"] == t.number
    # The COMPLETE trial is untouched.
    assert study.trials[done.number].state == TrialState.COMPLETE and study.trials[done.number].values == [1.0]
    # The retry dies too: it is failed again but not re-queued a second time.
    retry = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    assert retry.params == failed.params
    retry.set_user_attr("worker", {"host": socket.gethostname(), "pid": _dead_pid()})
    assert fail_stale_trials(study, max_retries=1) == [retry.number]
    assert study.get_trials(states=(TrialState.WAITING,)) == []


def test_live_worker_with_fresh_heartbeat_is_not_stale(tmp_path: Path) -> None:
    study = _study(tmp_path)
    t = study.ask()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        t.set_user_attr("worker", {"host": socket.gethostname(), "pid": sleeper.pid})
        with trial_heartbeat(study, t.number):
            assert fail_stale_trials(study, max_retries=1) == []
        assert isinstance(study.trials[0].user_attrs["heartbeat_at"], float)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not pid_alive(sleeper.pid)


def test_old_heartbeat_from_another_host_is_stale(tmp_path: Path) -> None:
    study = _study(tmp_path)
    t = study.ask()
    t.set_user_attr("worker", {"host": "some-other-host", "pid": 1})
    t.set_user_attr("heartbeat_at", time.time() - 3600)
    assert fail_stale_trials(study, max_retries=0, stale_after_s=60) == [t.number]
    assert study.get_trials(states=(TrialState.WAITING,)) == []


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_optuna_heartbeats_fail_the_silent_trial_and_requeue_it(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = RDBStorage(f"sqlite:///{tmp_path / 'hb.db'}", heartbeat_interval=1, grace_period=3,
                             heartbeat_stale_trial_callback=stale_trial_callback(1))
    study = optuna.create_study(storage=storage, study_name="hb")
    assert uses_optuna_heartbeat(study) and heartbeat_interval_s(study) == 1  # behind Optuna's cache wrapper
    x = {"x": optuna.distributions.FloatDistribution(0, 1)}
    silent, alive = study.ask(x), study.ask(x)
    silent.set_user_attr("worker", {"host": "h", "pid": 1})
    with trial_heartbeat(study, silent.number):
        pass  # one beat, then the worker goes quiet
    with trial_heartbeat(study, alive.number):
        time.sleep(4.5)  # past the grace period for the silent one; the live one keeps beating
        assert [storage.get_trial(i).number for i in stale_trial_ids(study)] == [silent.number]
        assert recover_stale(study, max_retries=1) == [silent.number]
    failed = study.trials[silent.number]
    assert failed.state == TrialState.FAIL and failed.user_attrs["fail_reason"] == "stale"
    assert "no heartbeat" in failed.user_attrs["fail_detail"] and "h:1" in failed.user_attrs["fail_detail"]
    assert study.trials[alive.number].state == TrialState.RUNNING
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].user_attrs == {"retry_of": silent.number, "retry_count": 1}
    assert recover_stale(study, max_retries=1) == []  # already failed: nothing more to do


def test_storages_without_heartbeats_report_none(tmp_path: Path) -> None:
    study = _study(tmp_path)
    assert heartbeat_interval_s(study) is None and stale_trial_ids(study) == []


def _rdb_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> optuna.Study:
    """RDB storage with Optuna heartbeats (interval 1 s, grace 2 s) on sqlite: PostgreSQL's path."""
    monkeypatch.setenv(INTERVAL_ENV, "1")
    monkeypatch.setenv(GRACE_ENV, "2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = RDBStorage(f"sqlite:///{tmp_path / 'hb.db'}", heartbeat_interval=1, grace_period=2,
                             heartbeat_stale_trial_callback=stale_trial_callback(1))
    return optuna.create_study(storage=storage, study_name="hb")


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_rdb_trial_claimed_by_a_worker_that_died_before_its_first_heartbeat_is_recovered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Optuna's stale test sees only trials with a heartbeat row: this one has none, and no worker
    stamp (the soak's #112 and #146, RUNNING for ever on PostgreSQL)."""
    study = _rdb_study(tmp_path, monkeypatch)
    x = {"x": optuna.distributions.FloatDistribution(0, 1)}
    orphan = study.ask(x)
    assert recover_stale(study, max_retries=1) == []  # just claimed: its worker may be about to beat
    time.sleep(1.0)
    assert recover_stale(study, max_retries=1) == []  # within the 2 s grace
    assert study.trials[orphan.number].state == TrialState.RUNNING
    time.sleep(1.4)
    assert recover_stale(study, max_retries=1) == [orphan.number]
    failed = study.trials[orphan.number]
    assert failed.state == TrialState.FAIL and failed.user_attrs["fail_reason"] == "stale"
    assert "first heartbeat" in failed.user_attrs["fail_detail"], failed.user_attrs["fail_detail"]
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].params == failed.params


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_rdb_trial_claimed_by_a_live_worker_is_not_failed_past_the_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's claim (ask, first beat, stamp: the order test_a_claimed_trial_beats_before_it_names_its_worker
    checks) followed by its heartbeat: never taken for an orphan."""
    study = _rdb_study(tmp_path, monkeypatch)
    trial = study.ask()
    assert recover_stale(study, max_retries=1) == []  # claimed a moment ago, not beating yet
    first_heartbeat(study, trial.number)
    trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
    assert recover_stale(study, max_retries=1) == []
    with trial_heartbeat(study, trial.number):
        time.sleep(2.6)  # past the 2 s grace
        assert recover_stale(study, max_retries=1) == []
    assert study.trials[trial.number].state == TrialState.RUNNING


def test_a_claimed_trial_beats_before_it_names_its_worker(tmp_path: Path) -> None:
    """The order recovery relies on: a trial with a ``worker`` stamp has a heartbeat, so a RUNNING
    trial without one past the grace was claimed by a worker that died before beating."""
    import json

    from kdsearch.search import worker

    study = _study(tmp_path)
    spec = worker.RunSpec(config={}, invocation="inv", deadline_epoch_s=time.time() + 3600, n_trials=None,
                          status_path="", slot_lock=str(tmp_path / "slots.lock"))
    trial = worker._claim_trial(study, spec)
    assert trial is not None
    keys = [k for line in (tmp_path / "j.log").read_text().splitlines()
            for k in (json.loads(line).get("user_attr") or {})]
    assert keys.index("heartbeat_at") < keys.index("worker"), keys
