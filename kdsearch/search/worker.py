"""A worker process: prepare once (data on the device, teachers), then run trials until told to stop.

Started by the supervisor as ``python -m kdsearch.search.worker RUN_SPEC.json``. It reports its
phase through an atomically rewritten status file that the supervisor reads for the live display
and for the hard per-trial time limit. Signals: SIGINT is ignored (the supervisor owns Ctrl-C);
SIGUSR1 = stop after the running trial; SIGTERM = interrupt the running trial now (stored as
FAIL ``interrupted``). The interrupt never lands inside a storage call (Optuna, SQLAlchemy, a file
lock, an atomic write): there it is deferred by a few milliseconds until that call returns, so a
journal line or a database transaction is never cut in half.

A worker dies with its supervisor (``PR_SET_PDEATHSIG`` on Linux, plus a parent-pid watchdog):
after a SIGKILL of the whole run no orphan keeps claiming trials, and the trial it was running is
recovered as ``stale`` when the run restarts.

Exit codes: 0 done, 3 a user error during preparation (message in the status file), 1 a crash
(message and traceback in the status file).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

import optuna
import torch
from filelock import FileLock
from optuna.trial import TrialState

from kdsearch import trial_record as tr
from kdsearch.checkpoint import atomic_write_text
from kdsearch.config import StudyConfig, config_from_dict
from kdsearch.errors import KDSearchError, TrialFailure
from kdsearch.measure.device import describe_worker_device
from kdsearch.rdb_snapshot import restore as restore_snapshot
from kdsearch.rdb_snapshot import snapshot_file
from kdsearch.search.objective import run_trial
from kdsearch.search.recovery import first_heartbeat, recover_stale, trial_heartbeat
from kdsearch.search.rehearsal import rehearsal_wall_s
from kdsearch.search.study import create_or_resume, make_sampler
from kdsearch.search.worker_setup import WorkerContext, pick_device, prepare_worker, teacher_summary
from kdsearch.storage import run_paths
from kdsearch.storage_faults import retry_transient

__all__ = ["RunSpec", "estimate_trial_s", "worker_main", "align_objectives", "EXIT_USER_ERROR", "EXIT_CRASH"]

EXIT_USER_ERROR = 3
EXIT_CRASH = 1
_INTERRUPT_RETRY_S = 0.02  # a deferred interrupt is retried this often until it lands
_PARENT_CHECK_S = 1.0  # watchdog period (where PR_SET_PDEATHSIG is not available)
# Code that must not be cut by the interrupt: storage engines, file locks, atomic file writes.
_CRITICAL_PACKAGES = frozenset({"optuna", "sqlalchemy", "psycopg", "psycopg2", "filelock"})
_CRITICAL_MODULES = frozenset({"kdsearch.checkpoint", "kdsearch.storage", "kdsearch.storage_faults",
                               "kdsearch.search.recovery"})


@dataclass(frozen=True)
class RunSpec:
    """What the supervisor tells a worker (written as JSON)."""

    config: dict[str, Any]
    invocation: str  # id of this optimize run; trials carry it, the --n-trials cap counts it
    deadline_epoch_s: float  # wall-clock end of the budget (time.time() scale)
    n_trials: int | None
    status_path: str
    slot_lock: str  # file lock that makes "count, then ask" atomic across local workers
    supervisor_pid: int | None = None  # the worker exits when this process is gone
    sampler_seed: int | None = None  # this worker's sampler seed; None: study.seed

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_file(cls, path: str | Path) -> RunSpec:
        return cls(**json.loads(Path(path).read_text()))


def estimate_trial_s(cfg: StudyConfig, overheads_s: list[float]) -> float:
    """Expected wall time (s) of the next trial: the longest box it may draw plus the largest
    overhead (wall time beyond a trial's own box) seen so far; before any trial has finished, 25%
    of that box plus 5 s. In a rehearsal the box is its replay's wall time (box / speed)."""
    box = rehearsal_wall_s(cfg, cfg.study.trial_time_s)
    if not overheads_s:
        return box * 1.25 + 5.0
    return box + max(0.0, max(overheads_s))


class _Status:
    """The worker's status file: phase, fraction, current trial and its start time.

    Keys the supervisor relies on: ``pid``, ``phase``, ``trial`` and ``trial_started_at`` (set
    together when a trial is claimed, cleared when it is stored), ``ready`` (preparation done),
    ``trials_done`` (trials this process has started and left, however), ``trials_finished``
    (trials it saw through to storage and lived on: what the supervisor's respawn rule counts),
    ``fatal``/``crash`` on the way out.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname(), "phase": "starting",
                                     "fraction": None, "message": "", "trial": None, "trial_started_at": None,
                                     "ready": False, "trials_done": 0, "trials_finished": 0}
        self._last = 0.0
        self.write()

    def write(self) -> None:
        # A full disk is a pause, not a failed trial: the write is retried like a storage call
        # (kdsearch.storage_faults), and the trial goes on once the status is written.
        self.data["updated_at"] = time.time()
        text = json.dumps(self.data)
        retry_transient(lambda: atomic_write_text(self.path, text), f"writing the worker status {self.path}")

    def update(self, force: bool = False, **kw: Any) -> None:
        # Phase or trial changes are written at once; bar and message updates at most 2 per second.
        changed = any(self.data.get(k) != v for k, v in kw.items() if k not in ("fraction", "message"))
        self.data.update(kw)
        now = time.monotonic()
        if force or changed or now - self._last > 0.5:
            self._last = now
            self.write()

    def progress(self, phase: str, fraction: float | None, message: str) -> None:
        self.update(phase=phase, fraction=fraction, message=message)


def _in_critical_code(frame: FrameType | None) -> bool:
    """True if the interrupted stack is inside storage, file-lock or atomic-write code."""
    while frame is not None:
        module = str(frame.f_globals.get("__name__", ""))
        if module.split(".", 1)[0] in _CRITICAL_PACKAGES or module in _CRITICAL_MODULES:
            return True
        if frame.f_code is _claim_trial.__code__:
            return True
        frame = frame.f_back
    return False


class _Signals:
    """SIGUSR1: stop after this trial. SIGTERM: raise KeyboardInterrupt at the next safe point."""

    def __init__(self) -> None:
        self.stop_after_trial = False
        self._interrupt_pending = False
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, self._usr1)
        signal.signal(signal.SIGTERM, self._term)
        signal.signal(signal.SIGALRM, self._retry)

    def _usr1(self, signum: int, frame: FrameType | None) -> None:
        self.stop_after_trial = True

    def _term(self, signum: int, frame: FrameType | None) -> None:
        self.stop_after_trial = True
        self._interrupt_pending = True
        self._raise_when_safe(frame)

    def _retry(self, signum: int, frame: FrameType | None) -> None:
        if self._interrupt_pending:
            self._raise_when_safe(frame)

    def _raise_when_safe(self, frame: FrameType | None) -> None:
        if _in_critical_code(frame):
            signal.setitimer(signal.ITIMER_REAL, _INTERRUPT_RETRY_S)
            return
        self._interrupt_pending = False
        raise KeyboardInterrupt


def _die_with_supervisor(supervisor_pid: int | None) -> None:
    """Exit with the supervisor: the kernel's parent-death signal (Linux) and a watchdog thread."""
    if supervisor_pid is None:
        return
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != supervisor_pid:  # it died before the line above
        os._exit(EXIT_CRASH)

    def watch() -> None:
        while os.getppid() == supervisor_pid:
            time.sleep(_PARENT_CHECK_S)
        os.kill(os.getpid(), signal.SIGKILL)  # as if killed with the run: the trial goes stale

    threading.Thread(target=watch, name="kdsearch-parent-watch", daemon=True).start()


def align_objectives(cfg: StudyConfig, study: optuna.Study) -> StudyConfig:
    """``cfg`` with its objectives in the stored study's order, the order ``run_trial`` returns the
    values in. The resume check compares objectives as a set, so a study file (or a config rebuilt
    from storage) may list them in another order; telling values in that order would swap them."""
    stored = list(study.metric_names or [])
    if stored != cfg.metric_names and set(stored) == set(cfg.metric_names):
        return replace(cfg, objectives={m: cfg.objectives[m] for m in stored})
    return cfg


def _claim_trial(study: optuna.Study, spec: RunSpec) -> optuna.Trial | None:
    """Ask for a trial unless this invocation already has ``n_trials`` (atomic across local workers)."""
    with FileLock(spec.slot_lock, timeout=600):
        if spec.n_trials is not None:
            mine = sum(t.user_attrs.get(tr.INVOCATION) == spec.invocation for t in study.get_trials(deepcopy=False))
            if mine >= spec.n_trials:
                return None
        trial = study.ask()
        trial.set_user_attr(tr.INVOCATION, spec.invocation)
        # Beat before the worker stamp: recovery takes a RUNNING trial without a stamp past the
        # grace for one whose claimer died before its first heartbeat (Optuna's test cannot see it).
        first_heartbeat(study, trial.number)
        trial.set_user_attr(tr.WORKER, {"host": socket.gethostname(), "pid": os.getpid(), "started_at": time.time()})
        return trial


def _tell(study: optuna.Study, trial: optuna.Trial, values: list[float] | None = None,
          state: TrialState | None = None) -> None:
    """``study.tell`` outside ``study.optimize``.

    GridSampler.after_trial calls ``study.stop()`` once the grid is used up, and outside
    ``optimize`` that raises RuntimeError -- after the trial has been stored (Optuna stores it in a
    ``finally``). That error is expected and swallowed; the loop's own exhaustion check then ends
    the run. Any other error, or a trial left unfinished, is re-raised.
    """
    try:
        study.tell(trial, values, state=state)
    except RuntimeError:
        if not _is_finished(study, trial.number):
            raise
        if not isinstance(study.sampler, optuna.samplers.GridSampler):
            raise


def _is_finished(study: optuna.Study, number: int) -> bool:
    """Whether trial ``number`` is stored as finished (read through the public trial list)."""
    return any(t.number == number and t.state.is_finished() for t in study.get_trials(deepcopy=False))


def _fail_trial(study: optuna.Study, trial: optuna.Trial, reason: str | None = None, detail: str = "") -> None:
    """Store the trial as FAIL (with ``fail_reason`` unless it is already set) unless another
    process finished it first (failed it as stale or timeout)."""
    try:
        if reason is not None:
            for key, value in tr.failure_attrs(reason, detail).items():
                trial.set_user_attr(key, value)
        _tell(study, trial, state=TrialState.FAIL)
    except RuntimeError:  # UpdateFinishedTrialError: finished meanwhile
        pass


def run_trials(ctx: WorkerContext, study: optuna.Study, spec: RunSpec, status: _Status, signals: _Signals) -> str:
    """The trial loop. Returns why it stopped."""
    cfg = ctx.cfg
    overheads: list[float] = []  # wall s of each finished trial beyond its own box
    while True:
        if signals.stop_after_trial:
            return "stop requested"
        remaining = spec.deadline_epoch_s - time.time()
        need = estimate_trial_s(cfg, overheads)
        if remaining < need:
            return f"budget: {remaining:.0f}s left < {need:.0f}s for one more trial"
        sampler = study.sampler
        if isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(study):
            return "grid exhausted"
        # What Optuna's study.optimize does before each trial: fail the trials of dead workers
        # (on any host) and re-queue their params, so this ask may pick them up.
        recover_stale(study, cfg.study.max_retries)
        try:
            trial = _claim_trial(study, spec)
        except optuna.exceptions.UpdateFinishedTrialError:
            # Failed as never stamped while a storage outage held this worker between its ask and
            # its stamp (recovery's rule for a claimer that died): no box was paid; claim another.
            continue
        if trial is None:
            return f"reached --n-trials {spec.n_trials}"
        t0 = time.monotonic()
        try:
            status.update(force=True, trial=trial.number, trial_started_at=time.time(), phase="trial",
                          fraction=0.0, message="")
            with trial_heartbeat(study, trial.number):
                values = run_trial(ctx, trial, status.progress)
            _tell(study, trial, values)
        except optuna.TrialPruned:
            # Screened out before the box, or stopped at a rung: run_trial stored why (screened /
            # screen_reason, or pruned_rung / pruned_rank and the partial curve).
            _tell(study, trial, state=TrialState.PRUNED)
        except TrialFailure:
            _fail_trial(study, trial)  # run_trial stored fail_reason / fail_detail
            _log_failure(trial.number)
        except KeyboardInterrupt:
            _fail_trial(study, trial, "interrupted", "stopped by a second Ctrl-C")
            return "interrupted"
        except Exception as exc:  # noqa: BLE001 - an error after the KD loop (measure, store) is trial data too
            reason = "oom" if isinstance(exc, torch.OutOfMemoryError) else "error"
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
            _fail_trial(study, trial, reason, f"{type(exc).__name__}: {exc}")
            _log_failure(trial.number)
        finally:
            status.update(force=True, trial=None, trial_started_at=None, phase="idle", fraction=None, message="",
                          trials_done=int(status.data.get("trials_done", 0)) + 1)
        # Reached only when the trial was stored and this worker lives on (an error that escaped
        # the handlers above, e.g. storage gone while failing the trial, ends the worker first).
        status.update(force=True, trials_finished=int(status.data.get("trials_finished", 0)) + 1)
        box = trial.user_attrs.get(tr.BOX_S, cfg.study.trial_time_s)  # set by run_trial as it starts
        overheads.append(time.monotonic() - t0 - rehearsal_wall_s(cfg, float(box)))


def _log_failure(number: int) -> None:
    """The traceback of a failed trial, into this worker's log (stderr): the trial stores only a
    short detail (trial_record.FAIL_DETAIL_MAX_CHARS), and the supervisor keeps the logs of workers whose trials failed."""
    print(f"trial {number} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)


def worker_main(spec_path: str) -> int:
    spec = RunSpec.from_file(spec_path)
    _die_with_supervisor(spec.supervisor_pid)
    signals = _Signals()
    status = _Status(spec.status_path)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        cfg = config_from_dict(spec.config)
        study, _ = create_or_resume(cfg)
        cfg = align_objectives(cfg, study)
        if spec.sampler_seed is not None:
            study.sampler = make_sampler(replace(cfg, study=replace(cfg.study, seed=spec.sampler_seed)))
        paths = run_paths(cfg.study.run_dir, cfg.study.name, cfg.teacher.cache.dir)
        # A database study: the finished trials from the supervisor's snapshot, so that a worker
        # (re)started late in a long run reads only the rest (kdsearch.rdb_snapshot).
        restore_snapshot(study, snapshot_file(paths.root))
        # The device first, so the supervisor announces it while the data and teachers load.
        device = pick_device()
        device_info = _json_safe(describe_worker_device(device, amp=cfg.distill.amp))
        status.update(force=True, device=device_info)
        ctx = prepare_worker(cfg, paths, device=device, progress=status.progress)
        ctx.device_info = device_info
        study.set_user_attr(tr.TEACHERS, _json_safe(teacher_summary(ctx)))
        if tr.ENVIRONMENT not in study.user_attrs:
            study.set_user_attr(tr.ENVIRONMENT, ctx.environment)
        status.update(force=True, phase="ready", ready=True, teachers=_json_safe(teacher_summary(ctx)))
        reason = run_trials(ctx, study, spec, status, signals)
    except KDSearchError as exc:
        status.update(force=True, phase="fatal", fatal=str(exc))
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        status.update(force=True, phase="stopped", stop_reason="interrupted")
        return 0
    except Exception as exc:  # noqa: BLE001 - reported to the supervisor, which shows one line
        status.update(force=True, phase="crashed", crash=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc()[-4000:])
        return EXIT_CRASH
    status.update(force=True, phase="stopped", stop_reason=reason)
    return 0


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: None if isinstance(o, float) and not math.isfinite(o) else str(o)))


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
