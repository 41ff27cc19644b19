"""Crash and kill recovery: RUNNING trials whose worker is gone become FAIL ``stale``.

RDB storages (PostgreSQL, MySQL) use Optuna's own heartbeats (see ``open_storage``): a running
trial's worker records a heartbeat every interval, and a trial whose last heartbeat is older than
the grace period is stale. :func:`recover_stale` fails it with ``fail_reason: stale`` (stored
*before* the state change: Optuna refuses attrs on a finished trial) and hands it to the storage's
``heartbeat_stale_trial_callback`` (:func:`stale_trial_callback`, Optuna's
``RetryHeartbeatStaleTrialCallback``), which re-queues the parameters at most ``max_retries``
times. The journal file and sqlite have no heartbeats, so kdsearch keeps its own: each running
trial carries a ``worker`` user attr (host, pid) and a ``heartbeat_at`` user attr that a thread
refreshes every heartbeat interval. A RUNNING trial is stale when its worker's process is gone
(same host) or its heartbeat is older than the grace period (any host).

Who calls :func:`recover_stale`: the supervisor when it starts (a restart after a crash), when
one of its workers dies, and every few seconds; every worker before it asks for a trial (what
Optuna's ``study.optimize`` does), so workers on other hosts recover each other's trials.

Heartbeat interval and grace come from :func:`heartbeat_settings`; the environment variables
``KDSEARCH_HEARTBEAT_INTERVAL_S`` and ``KDSEARCH_HEARTBEAT_GRACE_S`` (whole seconds) override the
defaults, e.g. for tests.
"""

from __future__ import annotations

import copy
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState

from kdsearch.errors import ConfigError

__all__ = [
    "HEARTBEAT_EVERY_S",
    "STALE_AFTER_S",
    "INTERVAL_ENV",
    "GRACE_ENV",
    "heartbeat_settings",
    "TrialHeartbeat",
    "trial_heartbeat",
    "recover_stale",
    "uses_optuna_heartbeat",
    "fail_stale_trials",
    "fail_heartbeat_stale_trials",
    "mark_failed",
    "retry_attrs",
    "requeue",
    "stale_trial_callback",
    "pid_alive",
]

HEARTBEAT_EVERY_S = 10.0  # journal/sqlite defaults: kdsearch's own heartbeat user attr
STALE_AFTER_S = 60.0
INTERVAL_ENV = "KDSEARCH_HEARTBEAT_INTERVAL_S"
GRACE_ENV = "KDSEARCH_HEARTBEAT_GRACE_S"


def heartbeat_settings(default_interval_s: float, default_grace_s: float) -> tuple[int, int]:
    """(interval, grace) in whole seconds: the environment overrides, else the defaults.

    Optuna's RDB heartbeats take positive integers; the grace is raised to at least two intervals
    so that one late beat never fails a live trial.
    """
    interval = _env_seconds(INTERVAL_ENV, default_interval_s)
    grace = _env_seconds(GRACE_ENV, default_grace_s)
    return interval, max(grace, 2 * interval)


def _env_seconds(name: str, default: float) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return max(int(round(default)), 1)
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(name, "must be a whole number of seconds >= 1", text) from None
    if value < 1:
        raise ConfigError(name, "must be a whole number of seconds >= 1", text)
    return value


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
    every, _ = heartbeat_settings(HEARTBEAT_EVERY_S, STALE_AFTER_S)
    return TrialHeartbeat(lambda: storage.set_trial_user_attr(trial_id, "heartbeat_at", time.time()), every)


def uses_optuna_heartbeat(study: optuna.Study) -> bool:
    """True for RDB storages opened with heartbeats (also behind Optuna's ``_CachedStorage``)."""
    storage = study._storage
    return isinstance(storage, BaseHeartbeat) and storage.get_heartbeat_interval() is not None


def recover_stale(study: optuna.Study, max_retries: int) -> list[int]:
    """Fail stale RUNNING trials with the mechanism that fits the storage; returns their numbers.

    RDB with heartbeats: Optuna's heartbeat test (``max_retries`` is the storage callback's, set
    in ``open_storage``). Journal/sqlite: the worker's pid (same host) or ``heartbeat_at`` age.
    """
    if uses_optuna_heartbeat(study):
        return fail_heartbeat_stale_trials(study)
    _, grace = heartbeat_settings(HEARTBEAT_EVERY_S, STALE_AFTER_S)
    return fail_stale_trials(study, max_retries, stale_after_s=float(grace))


def fail_heartbeat_stale_trials(study: optuna.Study) -> list[int]:
    """Optuna's ``fail_stale_trials`` for RDB storages, storing ``fail_reason: stale`` first.

    Optuna's own function changes the state and then runs the callback, when the trial no longer
    accepts user attrs; this one writes the reason, then the state, then runs the storage's
    ``heartbeat_stale_trial_callback`` (the re-queue) for the trials this process failed.
    """
    storage: Any = study._storage
    interval = storage.get_heartbeat_interval()
    grace = getattr(getattr(storage, "_backend", storage), "grace_period", None) or 2 * interval
    failed: list[FrozenTrial] = []
    for trial_id in storage._get_stale_trial_ids(study._study_id):
        try:
            trial = storage.get_trial(trial_id)
        except KeyError:
            continue
        if trial.state != TrialState.RUNNING:
            continue
        worker = trial.user_attrs.get("worker") or {}
        detail = (f"no heartbeat for > {grace}s (worker {worker.get('host', '?')}:{worker.get('pid', '?')})")
        if mark_failed(study, trial, "stale", detail):
            failed.append(trial)
    callback = storage.get_heartbeat_stale_trial_callback()
    for trial in failed:
        if callback is not None:
            callback(study, copy.deepcopy(storage.get_trial(trial._trial_id)))
    return sorted(t.number for t in failed)


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


def retry_attrs(trial: FrozenTrial) -> dict[str, Any]:
    """User attrs of the re-queued copy of ``trial``: the original trial and the retry count."""
    return {"retry_of": trial.user_attrs.get("retry_of", trial.number),
            "retry_count": int(trial.user_attrs.get("retry_count", 0)) + 1}


def requeue(study: optuna.Study, trial: FrozenTrial, max_retries: int) -> bool:
    """Enqueue the trial's params again unless they were already retried ``max_retries`` times."""
    attrs = retry_attrs(trial)
    if attrs["retry_count"] > max_retries or not trial.params:
        return False
    study.enqueue_trial(trial.params, user_attrs=attrs, skip_if_exists=False)
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
    """For RDBStorage(heartbeat_stale_trial_callback=...): re-queue a stale trial's params at most
    ``max_retries`` times (Optuna's RetryHeartbeatStaleTrialCallback).

    The WAITING copy carries only ``retry_of``/``retry_count`` (as on the journal), not the dead
    trial's user attrs: its ``invocation`` would count against the old run's ``--n-trials`` and its
    ``worker`` pid would make the retry look stale before its new worker stamps it.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retries)

    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        clean = copy.deepcopy(trial)
        clean.user_attrs = retry_attrs(trial)
        retry(study, clean)

    return callback
