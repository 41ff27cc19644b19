"""Stale-trial recovery: kdsearch's own heartbeats (journal, sqlite) and Optuna's RDB heartbeats
(run on sqlite here, the same code path PostgreSQL takes, so it is tested without a server)."""

from __future__ import annotations

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
    pid_alive,
    recover_stale,
    stale_trial_callback,
    trial_heartbeat,
    uses_optuna_heartbeat,
)
from kdsearch.storage import heartbeat_interval_s, stale_trial_ids


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
