"""Stale-trial recovery for storages without heartbeats (journal, sqlite)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from kdsearch.search.recovery import fail_stale_trials, pid_alive, trial_heartbeat


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
