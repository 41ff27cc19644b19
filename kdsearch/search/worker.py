"""A worker process: prepare once (data on the device, teachers), then run trials until told to stop.

Started by the supervisor as ``python -m kdsearch.search.worker RUN_SPEC.json``. It reports its
phase through an atomically rewritten status file that the supervisor reads for the live display
and for the hard per-trial time limit. Signals: SIGINT is ignored (the supervisor owns Ctrl-C);
SIGUSR1 = stop after the running trial; SIGTERM = interrupt the running trial now (stored as
FAIL ``interrupted``).

Exit codes: 0 done, 3 a user error during preparation (message in the status file).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from filelock import FileLock
from optuna.trial import TrialState

from kdsearch.checkpoint import atomic_write_text
from kdsearch.config import StudyConfig, config_from_dict
from kdsearch.errors import KDSearchError, TrialFailure
from kdsearch.search.objective import WorkerContext, prepare_worker, run_trial, teacher_summary
from kdsearch.search.recovery import trial_heartbeat
from kdsearch.search.study import create_or_resume, run_paths

__all__ = ["RunSpec", "estimate_trial_s", "worker_main", "EXIT_USER_ERROR"]

EXIT_USER_ERROR = 3


@dataclass(frozen=True)
class RunSpec:
    """What the supervisor tells a worker (written as JSON)."""

    config: dict[str, Any]
    invocation: str  # id of this optimize run; trials carry it, the --n-trials cap counts it
    deadline_epoch_s: float  # wall-clock end of the budget (time.time() scale)
    n_trials: int | None
    status_path: str
    slot_lock: str  # file lock that makes "count, then ask" atomic across local workers

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_file(cls, path: str | Path) -> RunSpec:
        return cls(**json.loads(Path(path).read_text()))


def estimate_trial_s(cfg: StudyConfig, durations_s: list[float]) -> float:
    """Expected wall time (s) of the next trial: the box plus the largest overhead seen so far
    (25% of the box plus 5 s before any trial has finished)."""
    box = cfg.study.trial_time_s
    if not durations_s:
        return box * 1.25 + 5.0
    return box + max(0.0, max(d - box for d in durations_s))


class _Status:
    """The worker's status file: phase, fraction, current trial and its start time."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname(), "phase": "starting",
                                     "fraction": None, "message": "", "trial": None, "trial_started_at": None}
        self._last = 0.0
        self.write()

    def write(self) -> None:
        self.data["updated_at"] = time.time()
        atomic_write_text(self.path, json.dumps(self.data))

    def update(self, force: bool = False, **kw: Any) -> None:
        changed = any(self.data.get(k) != v for k, v in kw.items() if k != "fraction")
        self.data.update(kw)
        now = time.monotonic()
        if force or changed or now - self._last > 0.5:  # throttle bar updates to 2 writes/s
            self._last = now
            self.write()

    def progress(self, phase: str, fraction: float | None, message: str) -> None:
        self.update(phase=phase, fraction=fraction, message=message)


class _Signals:
    def __init__(self) -> None:
        self.stop_after_trial = False
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, self._usr1)
        signal.signal(signal.SIGTERM, self._term)

    def _usr1(self, signum: int, frame: Any) -> None:
        self.stop_after_trial = True

    def _term(self, signum: int, frame: Any) -> None:
        self.stop_after_trial = True
        raise KeyboardInterrupt


def _claim_trial(study: optuna.Study, spec: RunSpec) -> optuna.Trial | None:
    """Ask for a trial unless this invocation already has ``n_trials`` (atomic across local workers)."""
    with FileLock(spec.slot_lock, timeout=600):
        if spec.n_trials is not None:
            mine = sum(t.user_attrs.get("invocation") == spec.invocation for t in study.get_trials(deepcopy=False))
            if mine >= spec.n_trials:
                return None
        trial = study.ask()
        trial.set_user_attr("invocation", spec.invocation)
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid(), "started_at": time.time()})
        return trial


def run_trials(ctx: WorkerContext, study: optuna.Study, spec: RunSpec, status: _Status, signals: _Signals) -> str:
    """The trial loop. Returns why it stopped."""
    cfg = ctx.cfg
    durations: list[float] = []
    while True:
        if signals.stop_after_trial:
            return "stop requested"
        remaining = spec.deadline_epoch_s - time.time()
        need = estimate_trial_s(cfg, durations)
        if remaining < need:
            return f"budget: {remaining:.0f}s left < {need:.0f}s for one more trial"
        sampler = study.sampler
        if isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(study):
            return "grid exhausted"
        trial = _claim_trial(study, spec)
        if trial is None:
            return f"reached --n-trials {spec.n_trials}"
        t0 = time.monotonic()
        status.update(force=True, trial=trial.number, trial_started_at=time.time(), phase="trial", fraction=0.0,
                      message="")
        try:
            with trial_heartbeat(study, trial._trial_id):
                values = run_trial(ctx, trial, status.progress)
            study.tell(trial, values)
        except TrialFailure:
            study.tell(trial, state=TrialState.FAIL)
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted")
            trial.set_user_attr("fail_detail", "stopped by a second Ctrl-C")
            study.tell(trial, state=TrialState.FAIL)
            return "interrupted"
        finally:
            status.update(force=True, trial=None, trial_started_at=None, phase="idle", fraction=None, message="")
        durations.append(time.monotonic() - t0)


def worker_main(spec_path: str) -> int:
    spec = RunSpec.from_file(spec_path)
    signals = _Signals()
    status = _Status(spec.status_path)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        cfg = config_from_dict(spec.config)
        study, _ = create_or_resume(cfg)
        paths = run_paths(cfg.study.run_dir, cfg.study.name, cfg.teacher.cache.dir)
        ctx = prepare_worker(cfg, paths, progress=status.progress)
        study.set_user_attr("teachers", _json_safe(teacher_summary(ctx)))
        if "environment" not in study.user_attrs:
            study.set_user_attr("environment", ctx.environment)
        status.update(force=True, phase="ready", teachers=_json_safe(teacher_summary(ctx)))
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
        return 1
    status.update(force=True, phase="stopped", stop_reason=reason)
    return 0


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: None if isinstance(o, float) and not math.isfinite(o) else str(o)))


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
