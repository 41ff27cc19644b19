"""The supervisor never blocks on a dead worker, and its respawn rule counts what it says (issue 19).

Real child processes: one that ignores SIGTERM, one frozen with SIGSTOP, and one that SIGKILL
cannot reach (the kill is swallowed, standing in for a process blocked in the kernel, e.g. in a
GPU driver call, that dies only when that call returns).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from kdsearch.config import apply_overrides, load_config
from kdsearch.search import supervisor, worker
from kdsearch.search.recovery import pid_alive
from kdsearch.search.supervisor import (
    MAX_DEATHS_IN_A_ROW,
    SearchOutcome,
    _kill,
    _Slot,
    _stop_workers,
    deaths_in_row,
)

from cli_helpers import SMOKE

IGNORES_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"


def _child(code: str = IGNORES_TERM) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"up"  # handler installed
    return proc


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _study(tmp_path: Path) -> optuna.Study:
    return optuna.create_study(storage=JournalStorage(JournalFileBackend(str(tmp_path / "j.log"))), study_name="s")


def _slot_running(tmp_path: Path, study: optuna.Study, proc: subprocess.Popen[bytes]) -> tuple[_Slot, int]:
    """A slot whose worker ``proc`` runs a RUNNING trial of ``study`` (named in its status file)."""
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": proc.pid})
    status = tmp_path / "worker0-0.json"
    status.write_text(json.dumps({"pid": proc.pid, "trial": trial.number, "phase": "trial"}))
    return _Slot(0, None, proc=proc, status_path=str(status)), trial.number


@pytest.mark.parametrize("frozen", [False, True], ids=["ignores-sigterm", "sigstopped"])
def test_a_worker_that_ignores_sigterm_or_is_frozen_is_stopped_in_bounded_time(tmp_path: Path, frozen: bool) -> None:
    proc = _child()
    try:
        if frozen:
            os.kill(proc.pid, signal.SIGSTOP)
        study = _study(tmp_path)
        slot, number = _slot_running(tmp_path, study, proc)
        outcome = SearchOutcome(study=study, resumed=False)
        t0 = time.monotonic()
        _stop_workers(study, [slot], max_retries=1, outcome=outcome, term_wait_s=0.5, kill_wait_s=5.0)
        assert time.monotonic() - t0 < 4.0
        assert proc.returncode == -signal.SIGKILL and not pid_alive(proc.pid)
        assert outcome.lost_workers == []
        # Its trial is the recovery's business (it is dead: stale by its pid), not failed here.
        assert study.trials[number].state == TrialState.RUNNING
    finally:
        _reap(proc)


def test_kill_of_a_sigstopped_worker_returns_at_once() -> None:
    proc = _child()
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        assert _kill(proc, wait_s=5.0)
        assert time.monotonic() - t0 < 2.0 and proc.returncode == -signal.SIGKILL
    finally:
        _reap(proc)


@pytest.fixture
def unkillable(monkeypatch: pytest.MonkeyPatch) -> Any:
    """SIGKILL does not reach the workers (as for a process stuck in an uninterruptible call)."""
    real_killpg = os.killpg

    def killpg(pgid: int, sig: int) -> None:
        if sig != signal.SIGKILL:
            real_killpg(pgid, sig)

    monkeypatch.setattr(supervisor.os, "killpg", killpg)
    monkeypatch.setattr(subprocess.Popen, "kill", lambda self: None)
    return real_killpg


def test_kill_gives_up_after_its_bounded_wait(unkillable: Any) -> None:
    proc = _child()
    try:
        done: list[bool] = []
        runner = threading.Thread(target=lambda: done.append(_kill(proc, wait_s=0.5)), daemon=True)
        t0 = time.monotonic()
        runner.start()
        runner.join(timeout=5.0)
        assert not runner.is_alive(), "the supervisor blocked on a worker that SIGKILL did not end"
        assert done == [False] and time.monotonic() - t0 < 3.0
        assert proc.poll() is None  # still there: the caller records it lost
    finally:
        unkillable(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_a_worker_that_outlives_sigkill_is_recorded_lost_and_its_trial_failed(tmp_path: Path, unkillable: Any) -> None:
    proc = _child()
    try:
        study = _study(tmp_path)
        slot, number = _slot_running(tmp_path, study, proc)
        outcome = SearchOutcome(study=study, resumed=False)
        t0 = time.monotonic()
        _stop_workers(study, [slot], max_retries=1, outcome=outcome, term_wait_s=0.3, kill_wait_s=0.3)
        assert time.monotonic() - t0 < 3.0
        (lost,) = outcome.lost_workers
        assert f"pid {proc.pid}" in lost and "after SIGKILL" in lost
        assert slot.proc is None  # never waited for again
        failed = study.trials[number]
        assert failed.state == TrialState.FAIL and failed.user_attrs["fail_reason"] == "stale"
        assert "after SIGKILL" in failed.user_attrs["fail_detail"]
        (retry,) = study.get_trials(states=(TrialState.WAITING,))
        assert retry.user_attrs["retry_of"] == number and outcome.stale_recovered == [number]
    finally:
        unkillable(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------------
# The respawn rule


def test_deaths_in_row_counts_deaths_without_a_finished_trial() -> None:
    assert deaths_in_row(0, {}) == 1
    assert deaths_in_row(3, {"trials_done": 0, "trials_finished": 0}) == 4
    # Died in its trial: the trial it died in is "done" but not finished.
    assert deaths_in_row(3, {"trials_done": 1, "trials_finished": 0}) == 4
    # Finished one trial, then died in the next: this death starts the count again.
    assert deaths_in_row(3, {"trials_done": 2, "trials_finished": 1}) == 1


def test_a_worker_that_crashes_in_every_trial_is_given_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real trial loop, with a trial that raises and a storage that refuses the FAIL (disk
    full): the worker dies in its first trial, every time. Fed its status files, the respawn rule
    reaches MAX_DEATHS_IN_A_ROW (it used to reset on ``trials_done`` and respawn for ever)."""
    cfg = apply_overrides(load_config(SMOKE), run_dir=str(tmp_path))
    study = _study(tmp_path)

    def crash(ctx: Any, trial: Any, progress: Any) -> list[float]:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(worker, "run_trial", crash)
    monkeypatch.setattr(worker, "_fail_trial", disk_full)
    monkeypatch.setattr(worker, "_log_failure", lambda number: None)
    ctx = SimpleNamespace(cfg=cfg, device=SimpleNamespace(type="cpu"))
    count = 0
    for generation in range(MAX_DEATHS_IN_A_ROW):
        spec = worker.RunSpec(config={}, invocation="inv", deadline_epoch_s=time.time() + 3600, n_trials=None,
                              status_path=str(tmp_path / f"worker0-{generation}.json"),
                              slot_lock=str(tmp_path / "slots.lock"))
        status = worker._Status(spec.status_path)
        with pytest.raises(OSError):
            worker.run_trials(ctx, study, spec, status, SimpleNamespace(stop_after_trial=False))  # type: ignore[arg-type]
        written = json.loads(Path(spec.status_path).read_text())
        assert written["trials_done"] == 1 and written["trials_finished"] == 0
        count = deaths_in_row(count, written)
    assert count == MAX_DEATHS_IN_A_ROW


def test_a_full_disk_pauses_the_worker_status_instead_of_failing_the_trial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The soak: a status write (the progress bar of a trial in its box) hit ENOSPC while the
    disk was full, and the trial failed with ``error``. It is now retried like a storage call."""
    import errno

    real_write = worker.atomic_write_text
    calls: list[str] = []

    def full_twice(path: str, text: str) -> None:
        calls.append(text)
        if len(calls) in (2, 3):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, text)

    monkeypatch.setattr(worker, "atomic_write_text", full_twice)
    status = worker._Status(str(tmp_path / "status.json"))
    status.update(force=True, phase="distil", fraction=0.5, message="replaying")
    assert len(calls) == 4  # the first write, two refused, the retry that went through
    assert json.loads((tmp_path / "status.json").read_text())["fraction"] == 0.5
