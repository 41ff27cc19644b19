"""Crash and kill recovery: RUNNING trials whose worker is gone become FAIL ``stale``.

RDB storages (PostgreSQL, MySQL) use Optuna's own heartbeats (see
:func:`kdsearch.storage.open_storage`): a running trial's worker records a heartbeat every
interval, and a trial whose last heartbeat is older than the grace period is stale. :func:`recover_stale` fails it with ``fail_reason: stale`` (stored
*before* the state change: Optuna refuses attrs on a finished trial) and hands it to the storage's
``heartbeat_stale_trial_callback`` (:func:`stale_trial_callback`, Optuna's
``RetryHeartbeatStaleTrialCallback``), which re-queues the parameters at most ``max_retries``
times. The journal file and sqlite have no heartbeats, so kdsearch keeps its own: each running
trial carries a ``worker`` user attr (host, pid) and a ``heartbeat_at`` user attr that a thread
refreshes every heartbeat interval. A RUNNING trial is stale when its worker's process is gone
(same host) or its heartbeat is older than the grace period (any host). Either heartbeat survives
transient storage errors (:class:`TrialHeartbeat` retries a failed beat with a bounded backoff)
and stops only when the worker has stored the trial or the trial is finished in storage.

Optuna's RDB test sees only trials that have a heartbeat row. A worker killed between
``study.ask()`` and its first beat leaves a RUNNING trial without one, which would stay RUNNING
for ever; so a worker beats once before it stamps the trial with its ``worker`` attr
(:func:`first_heartbeat`), and :func:`fail_heartbeat_stale_trials` also fails a RUNNING trial
that this process has seen without a stamp for longer than the grace period (its own monotonic
clock: no other host's clock or time zone is trusted). Storage errors that go away by themselves
(a PostgreSQL restart, a full disk) are retried below Optuna, in every storage call
(:mod:`kdsearch.storage_faults`).

Who calls :func:`recover_stale`: the supervisor when it starts (a restart after a crash), when
one of its workers dies, and every few seconds; every worker before it asks for a trial (what
Optuna's ``study.optimize`` does), so workers on other hosts recover each other's trials.

Heartbeat interval and grace come from :func:`kdsearch.storage.heartbeat_settings`; the
environment variables ``KDSEARCH_HEARTBEAT_INTERVAL_S`` and ``KDSEARCH_HEARTBEAT_GRACE_S`` (whole
seconds) override the defaults, e.g. for tests. Every write to another process's trial goes
through Optuna's public ``BaseStorage`` methods on :func:`kdsearch.storage.study_storage`.
"""

from __future__ import annotations

import copy
import logging
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

from kdsearch import trial_record as tr
from kdsearch.storage import (
    HEARTBEAT_GRACE_S,
    HEARTBEAT_INTERVAL_S,
    heartbeat_interval_s,
    heartbeat_settings,
    stale_trial_ids,
    study_storage,
    trial_id,
)
from kdsearch.storage_faults import backoff_s

__all__ = [
    "HEARTBEAT_EVERY_S",
    "HEARTBEAT_RETRY_FIRST_S",
    "STALE_AFTER_S",
    "TrialHeartbeat",
    "trial_heartbeat",
    "first_heartbeat",
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
HEARTBEAT_RETRY_FIRST_S = 0.5  # a failed beat is retried this soon, then twice as long each time

_log = logging.getLogger(__name__)


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
    """Calls ``beat()`` now and then every ``every_s`` seconds from a daemon thread, until the
    worker leaves the ``with`` block (it stored the trial) or the trial has ended in storage.

    A beat that raises is not taken for the end of the trial: one transient storage error (a
    journal ``OSError``, a PostgreSQL ``OperationalError`` while the server restarts) would
    otherwise stop the heartbeat for good, get the live trial failed as stale and re-queued, and
    lose its finished box when the worker's ``tell`` is refused. A failed beat is logged and
    retried after ``retry_first_s``, then twice as long each time, never longer than ``every_s``
    (so a retry always lands before the grace period runs out). The thread stops early only when
    the trial has really ended: the beat raises Optuna's ``UpdateFinishedTrialError``, or, after a
    failed beat, ``ended()`` (the trial's state, read from storage) says it is finished. An
    ``ended()`` that raises too counts as "not known to have ended": the beats go on.
    """

    def __init__(
        self,
        beat: Callable[[], None],
        every_s: float = HEARTBEAT_EVERY_S,
        *,
        ended: Callable[[], bool] | None = None,
        retry_first_s: float = HEARTBEAT_RETRY_FIRST_S,
        label: str = "trial",
    ) -> None:
        self._beat_fn = beat
        self._ended_fn = ended
        self._every_s = every_s
        self._retry_first_s = min(retry_first_s, every_s)
        self._label = label
        self.failures_in_row = 0  # failed beats since the last one that got through
        self.failures = 0  # failed beats in all
        self.ended = False  # the thread stopped because the trial ended elsewhere
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kdsearch-heartbeat", daemon=True)

    def __enter__(self) -> TrialHeartbeat:
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _next_wait_s(self) -> float:
        """The interval after a good beat; after failed ones the backoff, capped by the interval."""
        if self.failures_in_row == 0:
            return self._every_s
        return backoff_s(self.failures_in_row, self._retry_first_s, self._every_s)

    def _trial_ended(self) -> bool:
        if self._ended_fn is None:
            return False
        try:
            return bool(self._ended_fn())
        except Exception:  # noqa: BLE001 - storage still unreachable: not known to have ended
            return False

    def _beat(self) -> None:
        """One beat; sets ``ended`` when the trial is finished in storage."""
        try:
            self._beat_fn()
        except optuna.exceptions.UpdateFinishedTrialError:
            self.ended = True
            return
        except Exception as exc:  # noqa: BLE001 - storage errors of any backend are retried
            if self._trial_ended():
                self.ended = True
                return
            self.failures_in_row += 1
            self.failures += 1
            _log.warning(
                "heartbeat of %s failed (%s: %s); %d failure(s) in a row, retrying in %.3g s",
                self._label, type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "",
                self.failures_in_row, self._next_wait_s(),
            )
            return
        if self.failures_in_row:
            _log.warning("heartbeat of %s recovered after %d failed beat(s)", self._label, self.failures_in_row)
        self.failures_in_row = 0

    def _run(self) -> None:
        while not self.ended and not self._stop.wait(self._next_wait_s()):
            self._beat()


def _beat_of(study: optuna.Study, number: int) -> tuple[Callable[[], None], float]:
    """The beat of trial ``number`` and its interval (s): Optuna's own heartbeat for RDB storages
    with heartbeats (what ``study.optimize`` sends), else kdsearch's ``heartbeat_at`` user attr."""
    storage = study_storage(study)
    tid = trial_id(study, number)
    interval = heartbeat_interval_s(study)
    if interval is not None:
        return (lambda: storage.record_heartbeat(tid)), float(interval)  # type: ignore[attr-defined]
    every, _ = heartbeat_settings(HEARTBEAT_EVERY_S, STALE_AFTER_S)
    return (lambda: storage.set_trial_user_attr(tid, tr.HEARTBEAT_AT, time.time())), float(every)


def first_heartbeat(study: optuna.Study, number: int) -> None:
    """The first beat of a trial just claimed, before its worker stamps it (``worker`` attr).

    The order is what :func:`fail_heartbeat_stale_trials` relies on: a RUNNING trial without a
    ``worker`` stamp past the grace period was claimed by a worker that died before its first
    heartbeat, which Optuna's stale test (heartbeat rows only) never sees.
    """
    beat, _ = _beat_of(study, number)
    beat()


def trial_heartbeat(study: optuna.Study, number: int) -> TrialHeartbeat:
    """Optuna's own heartbeat for RDB storages with heartbeats (what ``study.optimize`` sends),
    else kdsearch's ``heartbeat_at`` user attr (journal, sqlite), for trial ``number``. Either
    survives transient storage errors and stops once the trial is finished in storage."""
    storage = study_storage(study)
    tid = trial_id(study, number)

    def ended() -> bool:
        return storage.get_trial(tid).state.is_finished()

    beat, every = _beat_of(study, number)
    return TrialHeartbeat(beat, every, ended=ended, label=f"trial {number}")


def uses_optuna_heartbeat(study: optuna.Study) -> bool:
    """True for RDB storages opened with heartbeats (also behind Optuna's cache wrapper)."""
    return heartbeat_interval_s(study) is not None


def recover_stale(study: optuna.Study, max_retries: int) -> list[int]:
    """Fail stale RUNNING trials with the mechanism that fits the storage; returns their numbers.

    RDB with heartbeats: Optuna's heartbeat test (``max_retries`` is the storage callback's, set
    in ``kdsearch.storage.open_storage``). Journal/sqlite: the worker's pid (same host) or ``heartbeat_at`` age.
    """
    if uses_optuna_heartbeat(study):
        return fail_heartbeat_stale_trials(study)
    _, grace = heartbeat_settings(HEARTBEAT_EVERY_S, STALE_AFTER_S)
    return fail_stale_trials(study, max_retries, stale_after_s=float(grace))


def fail_heartbeat_stale_trials(study: optuna.Study) -> list[int]:
    """Optuna's ``fail_stale_trials`` for RDB storages, storing ``fail_reason: stale`` first, and
    the RUNNING trials Optuna's test cannot see (:func:`_unbeating_trials`).

    Optuna's own function changes the state and then runs the callback, when the trial no longer
    accepts user attrs; this one writes the reason, then the state, then runs the storage's
    ``heartbeat_stale_trial_callback`` (the re-queue) for the trials this process failed.
    """
    storage = study_storage(study)
    # The grace open_storage gave this RDB storage (same defaults, same environment), for the message.
    _, grace = heartbeat_settings(HEARTBEAT_INTERVAL_S, HEARTBEAT_GRACE_S)
    candidates: dict[int, str | None] = dict.fromkeys(stale_trial_ids(study))
    candidates.update(_unbeating_trials(study, float(grace), exclude=set(candidates)))
    failed: list[tuple[int, FrozenTrial]] = []
    for tid, why in candidates.items():
        try:
            trial = storage.get_trial(tid)
        except KeyError:
            continue
        if trial.state != TrialState.RUNNING:
            continue
        worker = trial.user_attrs.get(tr.WORKER) or {}
        detail = why or f"no heartbeat for > {grace}s (worker {worker.get('host', '?')}:{worker.get('pid', '?')})"
        if mark_failed(study, trial, "stale", detail):
            failed.append((tid, trial))
    callback = storage.get_heartbeat_stale_trial_callback()  # type: ignore[attr-defined]
    for tid, _trial in failed:
        if callback is not None:
            callback(study, copy.deepcopy(storage.get_trial(tid)))
    return sorted(t.number for _tid, t in failed)


# (study name, trial number, claim time) -> time.monotonic() when this process first saw the trial
# RUNNING without a worker stamp (the claim time tells apart trials of same-named studies). This process's own clock: a claim time stored by another host (naive
# local time on RDB) would make a just-claimed trial look old under a clock or time-zone skew.
_UNSTAMPED_SINCE: dict[tuple[str, int, Any], float] = {}


def _unbeating_trials(study: optuna.Study, grace_s: float, exclude: set[int]) -> dict[int, str]:
    """RUNNING trials (storage id -> why) whose claimer died before its first heartbeat, which
    Optuna's heartbeat test cannot see (such a trial has no heartbeat row).

    A worker beats once before it stamps the trial it claimed (:func:`first_heartbeat`), so a
    trial with a ``worker`` stamp has a heartbeat row and is Optuna's to judge; one without a stamp,
    seen so by this process for longer than ``grace_s``, was claimed by a worker that died
    between ``study.ask()`` and that first beat. A trial claimed a moment ago is left alone.
    """
    now = time.monotonic()
    out: dict[int, str] = {}
    unstamped: set[tuple[str, int, Any]] = set()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if isinstance(t.user_attrs.get(tr.WORKER), dict):
            continue
        key = (study.study_name, t.number, t.datetime_start)
        unstamped.add(key)
        first = _UNSTAMPED_SINCE.setdefault(key, now)
        if now - first > grace_s:
            tid = trial_id(study, t.number)
            if tid not in exclude:
                out[tid] = (f"claimed but never stamped by its worker for {now - first:.0f}s > grace {grace_s:g}s "
                            "(its worker died before its first heartbeat)")
    for key in [k for k in _UNSTAMPED_SINCE if k[0] == study.study_name and k not in unstamped]:
        del _UNSTAMPED_SINCE[key]
    return out


def _is_stale(t: FrozenTrial, now: float, stale_after_s: float) -> str | None:
    worker = t.user_attrs.get(tr.WORKER) or {}
    beat = t.user_attrs.get(tr.HEARTBEAT_AT)
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
    storage = study_storage(study)
    try:
        tid = trial_id(study, trial.number)
        for key, value in tr.failure_attrs(reason, detail).items():
            storage.set_trial_user_attr(tid, key, value)
        return storage.set_trial_state_values(tid, state=TrialState.FAIL)
    except RuntimeError:
        # The trial was finished meanwhile (optuna refuses to change a finished trial).
        return False


def retry_attrs(trial: FrozenTrial) -> dict[str, Any]:
    """User attrs of the re-queued copy of ``trial``: the original trial and the retry count."""
    return {tr.RETRY_OF: trial.user_attrs.get(tr.RETRY_OF, trial.number),
            tr.RETRY_COUNT: int(trial.user_attrs.get(tr.RETRY_COUNT, 0)) + 1}


def requeue(study: optuna.Study, trial: FrozenTrial, max_retries: int) -> bool:
    """Enqueue the trial's params again unless they were already retried ``max_retries`` times."""
    attrs = retry_attrs(trial)
    if attrs[tr.RETRY_COUNT] > max_retries or not trial.params:
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
