"""Crash and kill recovery: RUNNING trials whose worker is gone become FAIL ``stale``.

RDB storages (PostgreSQL, MySQL) use Optuna's own heartbeats (see ``open_storage``): a worker's
``study.optimize`` fails stale trials and :func:`stale_trial_callback` records ``fail_reason`` and
re-queues the parameters. The journal file and sqlite have no heartbeats, so kdsearch keeps its
own: each running trial carries a ``worker`` user attr (host, pid, start time) and a
``heartbeat_at`` user attr that a thread refreshes every :data:`HEARTBEAT_EVERY_S`. A RUNNING
trial is stale when its worker's process is gone (same host) or its heartbeat is older than the
grace period (any host).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

__all__ = [
    "HEARTBEAT_EVERY_S",
    "STALE_AFTER_S",
    "TrialHeartbeat",
    "trial_heartbeat",
    "recover_stale",
    "uses_optuna_heartbeat",
    "fail_stale_trials",
    "mark_failed",
    "requeue",
    "stale_trial_callback",
    "pid_alive",
]

HEARTBEAT_EVERY_S = 10.0
STALE_AFTER_S = 60.0


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists on this host (zombies count as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


class TrialHeartbeat:
    """Calls ``beat()`` now and then every ``every_s`` seconds from a daemon thread, until exit.

    A beat that raises (the trial was finished elsewhere) ends the thread.
    """

    def __init__(self, beat: Callable[[], None], every_s: float = HEARTBEAT_EVERY_S) -> None:
        self._beat_fn = beat
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kdsearch-heartbeat", daemon=True)

    def __enter__(self) -> TrialHeartbeat:
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _beat(self) -> None:
        try:
            self._beat_fn()
        except Exception:  # noqa: BLE001
            self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            self._beat()


def trial_heartbeat(study: optuna.Study, trial_id: int) -> TrialHeartbeat:
    """Optuna's own heartbeat for RDB storages with heartbeats (what ``study.optimize`` sends),
    else kdsearch's ``heartbeat_at`` user attr (journal, sqlite)."""
    storage: Any = study._storage
    if uses_optuna_heartbeat(study):
        every = float(storage.get_heartbeat_interval() or HEARTBEAT_EVERY_S)
        return TrialHeartbeat(lambda: storage.record_heartbeat(trial_id), every)
    return TrialHeartbeat(lambda: storage.set_trial_user_attr(trial_id, "heartbeat_at", time.time()))


def uses_optuna_heartbeat(study: optuna.Study) -> bool:
    """True for RDB storages opened with heartbeats (Optuna's heartbeat API is duck-typed)."""
    enabled = getattr(study._storage, "is_heartbeat_enabled", None)
    return bool(enabled and enabled())


def recover_stale(study: optuna.Study, max_retries: int) -> list[int]:
    """Fail stale RUNNING trials with the mechanism that fits the storage; returns their numbers."""
    if uses_optuna_heartbeat(study):
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        optuna.storages.fail_stale_trials(study)
        after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        return sorted(before - after)
    return fail_stale_trials(study, max_retries)


def _is_stale(t: FrozenTrial, now: float, stale_after_s: float) -> str | None:
    worker = t.user_attrs.get("worker") or {}
    beat = t.user_attrs.get("heartbeat_at")
    if worker.get("host") == socket.gethostname() and isinstance(worker.get("pid"), int):
        if not pid_alive(worker["pid"]):
            return f"worker pid {worker['pid']} on {worker['host']} is gone"
        if worker["pid"] == os.getpid():
            return None
    last = beat if isinstance(beat, (int, float)) else (t.datetime_start.timestamp() if t.datetime_start else None)
    if last is not None and now - last > stale_after_s:
        return f"no heartbeat for {now - last:.0f}s (worker {worker.get('host', '?')}:{worker.get('pid', '?')})"
    return None


def mark_failed(study: optuna.Study, trial: FrozenTrial, reason: str, detail: str) -> bool:
    """Set a RUNNING trial to FAIL with ``fail_reason``. False if another process finished it first."""
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
        storage.set_trial_user_attr(trial._trial_id, "fail_detail", detail)
        return storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
    except RuntimeError:
        # The trial was finished meanwhile (optuna refuses to change a finished trial).
        return False


def requeue(study: optuna.Study, trial: FrozenTrial, max_retries: int) -> bool:
    """Enqueue the trial's params again unless they were already retried ``max_retries`` times."""
    origin = trial.user_attrs.get("retry_of", trial.number)
    tries = int(trial.user_attrs.get("retry_count", 0))
    if tries >= max_retries or not trial.params:
        return False
    study.enqueue_trial(
        trial.params,
        user_attrs={"retry_of": origin, "retry_count": tries + 1},
        skip_if_exists=False,
    )
    return True


def fail_stale_trials(study: optuna.Study, max_retries: int, stale_after_s: float = STALE_AFTER_S) -> list[int]:
    """Fail every stale RUNNING trial (journal/sqlite) and re-queue its params once. Returns numbers."""
    now = time.time()
    failed: list[int] = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        why = _is_stale(t, now, stale_after_s)
        if why and mark_failed(study, t, "stale", why):
            failed.append(t.number)
            requeue(study, t, max_retries)
    return failed


def stale_trial_callback(max_retries: int) -> Any:
    """For RDBStorage(heartbeat_stale_trial_callback=...): record ``fail_reason: stale`` and re-queue
    the params at most ``max_retries`` times (Optuna's RetryHeartbeatStaleTrialCallback)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retries)

    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        try:
            study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", "stale")
            study._storage.set_trial_user_attr(trial._trial_id, "fail_detail", "RDB heartbeat expired")
        except Exception:  # noqa: BLE001 - best effort; the state change already happened
            pass
        retry(study, trial)

    return callback
