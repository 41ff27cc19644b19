"""Heartbeats survive transient storage errors and stop only when the trial has ended (issue 19).

A storage wrapper raises on the first beats (a journal ``OSError``, a PostgreSQL-style
``OperationalError`` on Optuna's RDB heartbeat, run on sqlite) and then lets them through: the
heartbeat must keep going, and the live trial must never look stale.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy.exc
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from kdsearch.search import recovery
from kdsearch.search.recovery import (
    TrialHeartbeat,
    fail_stale_trials,
    mark_failed,
    recover_stale,
    trial_heartbeat,
)
from kdsearch.storage import GRACE_ENV, INTERVAL_ENV, stale_trial_ids


class FlakyStorage:
    """The study's storage, except that ``fails`` heartbeat writes raise ``exc``, after the first
    ``after`` got through."""

    def __init__(self, inner: Any, fails: int, exc: Exception, after: int = 0) -> None:
        self.inner = inner
        self.fails = fails
        self.exc = exc
        self.after = after
        self.beats = 0  # heartbeat writes that got through

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _maybe_fail(self) -> None:
        if self.fails > 0 and self.beats >= self.after:
            self.fails -= 1
            raise self.exc
        self.beats += 1

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        if key == "heartbeat_at":
            self._maybe_fail()
        self.inner.set_trial_user_attr(trial_id, key, value)

    def record_heartbeat(self, trial_id: int) -> None:
        self._maybe_fail()
        self.inner.record_heartbeat(trial_id)


def _journal_study(tmp_path: Path) -> optuna.Study:
    return optuna.create_study(storage=JournalStorage(JournalFileBackend(str(tmp_path / "j.log"))), study_name="s")


@pytest.mark.parametrize("fails", [1, 2])
def test_journal_heartbeat_survives_transient_oserrors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: int
) -> None:
    monkeypatch.setenv(INTERVAL_ENV, "1")
    monkeypatch.setenv(GRACE_ENV, "2")
    study = _journal_study(tmp_path)
    t = study.ask()
    # A live worker on another host: only the heartbeat's age decides whether it is stale.
    t.set_user_attr("worker", {"host": "another-host", "pid": 1})
    flaky = FlakyStorage(recovery.study_storage(study), fails, OSError(28, "No space left on device"))
    monkeypatch.setattr(recovery, "study_storage", lambda s: flaky)
    t0 = time.time()
    with trial_heartbeat(study, t.number) as hb:
        time.sleep(3.2)  # the failed beats and their retries, then beats every second
        # Well past the 2 s grace since the first (failed) beat, the trial is alive and beating.
        assert fail_stale_trials(study, max_retries=1, stale_after_s=2.0) == []
        assert flaky.beats >= 2, flaky.beats
        beat = study.trials[t.number].user_attrs["heartbeat_at"]
        assert beat > t0 + 1.0, beat - t0
        assert hb.failures == fails and hb.failures_in_row == 0 and not hb.ended
    assert study.trials[t.number].state == TrialState.RUNNING
    study.tell(t, 0.5)  # the worker's final tell goes through
    assert study.trials[t.number].state == TrialState.COMPLETE


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_rdb_heartbeat_survives_an_operational_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = RDBStorage(f"sqlite:///{tmp_path / 'hb.db'}", heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(storage=storage, study_name="hb")
    t = study.ask()
    broken = sqlalchemy.exc.OperationalError("UPDATE trial_heartbeats", {}, Exception("server closed the connection"))
    # The first beat gets through (the server was up when the trial started), the next two break.
    flaky = FlakyStorage(recovery.study_storage(study), 2, broken, after=1)
    monkeypatch.setattr(recovery, "study_storage", lambda s: flaky)
    with trial_heartbeat(study, t.number) as hb:
        time.sleep(3.5)  # past the 2 s grace after the last good beat of a heartbeat that gave up
        assert stale_trial_ids(study) == [] and recover_stale(study, max_retries=1) == []
        assert flaky.beats >= 2 and hb.failures == 2
    assert study.trials[t.number].state == TrialState.RUNNING


def test_heartbeat_stops_once_the_trial_was_finished_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing beat whose trial is FAIL in storage (failed as stale or timeout) ends the thread."""
    monkeypatch.setenv(INTERVAL_ENV, "1")
    study = _journal_study(tmp_path)
    t = study.ask()
    flaky = FlakyStorage(recovery.study_storage(study), 10**6, OSError("journal locked"))
    monkeypatch.setattr(recovery, "study_storage", lambda s: flaky)
    with trial_heartbeat(study, t.number) as hb:
        time.sleep(0.7)
        assert not hb.ended and hb.failures >= 1  # still retrying: the trial is RUNNING
        assert mark_failed(study, study.trials[t.number], "timeout", "killed by the supervisor")
        deadline = time.monotonic() + 5
        while not hb.ended and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hb.ended
        assert not hb._thread.is_alive()


def test_beat_on_a_finished_trial_ends_the_heartbeat(tmp_path: Path) -> None:
    """Optuna refuses a user attr on a finished trial (UpdateFinishedTrialError): that is the end."""
    study = _journal_study(tmp_path)
    t = study.ask()
    study.tell(t, state=TrialState.FAIL)
    with trial_heartbeat(study, t.number) as hb:
        assert hb.ended and hb.failures == 0


def test_failed_beats_back_off_up_to_the_interval() -> None:
    calls: list[float] = []

    def beat() -> None:
        calls.append(time.monotonic())
        raise OSError("down")

    with TrialHeartbeat(beat, every_s=0.4, ended=lambda: False, retry_first_s=0.05) as hb:
        time.sleep(1.6)
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    # 0.05, 0.1, 0.2, then the interval: never faster than the backoff, never slower than the interval.
    assert 6 <= len(calls) <= 9, gaps
    assert gaps[0] < gaps[1] < gaps[2] < 0.35 and all(0.35 < g < 0.6 for g in gaps[3:]), gaps
    assert hb.failures == len(calls) and not hb.ended


def test_live_local_worker_with_flaky_journal_is_not_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same host's pid check and a flaky heartbeat: alive and beating, never stale."""
    monkeypatch.setenv(INTERVAL_ENV, "1")
    study = _journal_study(tmp_path)
    t = study.ask()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        t.set_user_attr("worker", {"host": socket.gethostname(), "pid": sleeper.pid})
        flaky = FlakyStorage(recovery.study_storage(study), 1, OSError("transient"))
        monkeypatch.setattr(recovery, "study_storage", lambda s: flaky)
        with trial_heartbeat(study, t.number):
            time.sleep(1.0)
            assert fail_stale_trials(study, max_retries=1, stale_after_s=2.0) == []
            assert isinstance(study.trials[t.number].user_attrs.get("heartbeat_at"), float)
    finally:
        sleeper.kill()
        sleeper.wait()
