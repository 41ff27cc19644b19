"""The supervisor: starts N worker processes on one study and keeps the run healthy.

- Each worker is its own process, pinned to one GPU through ``CUDA_VISIBLE_DEVICES`` (one per
  visible GPU by default, else one). Optuna's storage is the only channel between them: there is
  no home-made scheduler.
- A trial that runs past its KD box plus ``study.grace`` is killed with its worker (SIGKILL); the
  trial is stored as FAIL ``timeout`` and a fresh worker (same run spec) takes the slot. A worker
  that dies any other way leaves a RUNNING trial that :func:`recover_stale` fails as ``stale`` and
  re-queues once; the supervisor runs it at start (a restart after a crash), as soon as it sees a
  worker die, and every few seconds (workers on other hosts, expired RDB heartbeats). A slot
  whose workers die :data:`MAX_DEATHS_IN_A_ROW` times in a row without finishing a trial is
  given up.
- The supervisor never blocks on a worker: every wait for one to end is bounded. A worker still
  there :data:`KILL_WAIT_S` after SIGKILL (blocked in the kernel, e.g. in a GPU driver call) is
  recorded as lost (``SearchOutcome.lost_workers``, a warning in the log), its RUNNING trial is
  failed as ``stale`` and re-queued, and the run goes on without it.
- A storage error that goes away by itself (a PostgreSQL restart, a journal write on a full disk)
  is retried inside the storage call, with a bounded backoff, logged once per incident
  (:mod:`kdsearch.storage_faults`); only storage unreachable for ``KDSEARCH_STORAGE_RETRY_S``
  (default 120 s) ends the run, with a one-line error.
- Workers die with the supervisor (see :mod:`kdsearch.search.worker`), so a SIGKILL of the whole
  run leaves no orphan; the next run recovers the trials they were running.
- Ctrl-C once: workers finish their running trial, then stop. Twice: the running trials stop now
  and are stored as FAIL ``interrupted``.
- The wall time of this invocation is added to the study's ``time_spent_s`` every
  :data:`TIME_FLUSH_EVERY_S` and at the end.
- Each run keeps its workers' spec, status and log files in ``<run>/<study>/workers/kdsearch-run-*``.
  When the run ends without an error, the files of every worker that exited 0 and stored no
  FAIL trial are removed; the rest (a post-mortem's logs) stay, named in
  ``SearchOutcome.kept_logs``. After an error everything stays, and so it does with
  ``KDSEARCH_KEEP_WORKER_FILES=1`` (to read a clean worker's warnings).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from kdsearch import trial_record as tr
from kdsearch.checkpoint import atomic_write_text
from kdsearch.config import StudyConfig, config_to_dict
from kdsearch.device_record import format_device_banner
from kdsearch.errors import KDSearchError
from kdsearch.measure.device import collect_cuda_facts, resolve_study_device
from kdsearch.rdb_snapshot import resume as resume_snapshot
from kdsearch.rdb_snapshot import snapshot_file
from kdsearch.search.preflight import check_workers, preflight
from kdsearch.search.recovery import mark_failed, recover_stale, requeue
from kdsearch.search.rehearsal import rehearsal_wall_s
from kdsearch.search.study import add_time_spent, create_or_resume
from kdsearch.search.worker import EXIT_USER_ERROR, RunSpec
from kdsearch.search.worker_setup import ENV_EXPECT_CUDA, ENV_WORKERS_PER_GPU
from kdsearch.storage import heartbeat_interval_s, run_paths

__all__ = [
    "StopFlag",
    "SearchOutcome",
    "supervise",
    "default_workers",
    "worker_env",
    "tidy_worker_files",
    "KEEP_WORKER_FILES_ENV",
    "TrialBoxes",
    "deaths_in_row",
]

POLL_S = 0.5
RECOVER_EVERY_S = 5.0  # also capped by the heartbeat interval (RDB)
TIME_FLUSH_EVERY_S = 60.0  # time_spent_s is updated this often, so a killed run loses little
MAX_DEATHS_IN_A_ROW = 5  # a slot whose workers die this often without finishing a trial is given up
TERM_WAIT_S = 30.0  # at the end of a run: how long workers get to store their trial after SIGTERM
KILL_WAIT_S = 10.0  # after SIGKILL: how long the supervisor waits to reap a worker before it is lost
KEEP_WORKER_FILES_ENV = "KDSEARCH_KEEP_WORKER_FILES"  # "1": a clean run keeps every worker's files too

_log = logging.getLogger(__name__)


class StopFlag:
    """Counts Ctrl-C presses; the supervisor turns them into signals for its workers.

    SIGTERM (``kill``, ``systemctl stop``, a batch scheduler's time limit) counts as two presses:
    the running trials stop now and are stored as FAIL ``interrupted`` rather than left to be
    found stale on the next run.
    """

    def __init__(self) -> None:
        self.requests = 0

    def request(self, times: int = 1) -> None:
        self.requests += times

    def install_sigint(self) -> Callable[[], None]:
        """Install SIGINT and SIGTERM handlers; returns a function that restores the old ones."""
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        signal.signal(signal.SIGINT, lambda signum, frame: self.request())
        signal.signal(signal.SIGTERM, lambda signum, frame: self.request(2))

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore


@dataclass
class SearchOutcome:
    study: optuna.Study
    resumed: bool
    trials_before: int = 0  # trials stored when this run started
    trials_complete: int = 0
    trials_failed: int = 0
    trials_pruned: int = 0  # stopped at a rung or screened out before the box
    wall_s: float = 0.0
    stop_reason: str = ""
    stale_recovered: list[int] = field(default_factory=list)
    timeouts: list[int] = field(default_factory=list)
    lost_workers: list[str] = field(default_factory=list)  # workers that outlived SIGKILL (see _kill)
    kept_logs: list[str] = field(default_factory=list)  # worker logs kept for a post-mortem


def default_workers() -> int:
    """One worker per visible GPU, else one."""
    return max(len(_visible_gpus()), 1)


@dataclass
class _Slot:
    index: int
    gpu: str | None  # the CUDA_VISIBLE_DEVICES entry this slot's workers get
    proc: subprocess.Popen[bytes] | None = None
    status_path: str = ""
    generation: int = 0  # workers started in this slot so far (names their files)
    deaths_in_row: int = 0  # workers that died without storing a trial, since the last that did
    done: bool = False
    stop_reason: str = ""
    log_path: str = ""


def _read_status(path: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def worker_env(gpu: str | None, base: dict[str, str] | None = None, cpu_workers: int = 1) -> dict[str, str]:
    """The environment of a worker process: pinned to ``gpu`` (a CUDA_VISIBLE_DEVICES entry) and
    able to import this kdsearch. CPU workers sharing a machine split its cores
    (``OMP_NUM_THREADS``) instead of oversubscribing them, unless the user set it already."""
    env = dict(os.environ if base is None else base)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    elif cpu_workers > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cpu_workers))
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def supervise(
    cfg: StudyConfig,
    *,
    n_workers: int | None = None,
    stop: StopFlag | None = None,
    progress: Callable[[str, float | None, str], None] | None = None,
    on_ready: Callable[[SearchOutcome, dict[str, Any]], None] | None = None,
    on_trial_end: Callable[[FrozenTrial, float], None] | None = None,
    create: bool = True,
    on_note: Callable[[str], None] | None = None,
) -> SearchOutcome:
    """Run or resume ``cfg``'s study with worker processes until budget, cap, Ctrl-C or grid end.

    ``on_note`` gets the device lines: the study's device (``study.device`` resolved; a CPU run
    says so and why) before anything else, then each worker's device banner as it starts."""
    t0 = time.monotonic()
    stop = stop or StopFlag()
    progress = progress or (lambda phase, frac, msg: None)
    note = on_note or (lambda line: None)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    # First, in milliseconds and before anything is written: study.device: cuda without a usable
    # GPU is refused with the reason; auto on such a machine runs on the CPU and says so.
    device_type, device_line = resolve_study_device(cfg.study.device, collect_cuda_facts())
    note(device_line)
    progress("checks", None, "data, teachers, storage")
    preflight(cfg, cuda_available=device_type == "cuda")
    n_workers = n_workers or cfg.study.workers or default_workers()
    gpus = _visible_gpus() if device_type == "cuda" else []
    check_workers(cfg, n_workers, len(gpus))  # more workers than GPUs only with study.share_gpu
    paths = run_paths(cfg.study.run_dir, cfg.study.name, cfg.teacher.cache.dir)
    paths.ensure()  # before the study exists: a folder that cannot be made leaves nothing behind
    study, resumed = create_or_resume(cfg, create=create)
    # A database study: start from its trial snapshot, and keep it current for the commands that
    # read the study later (kdsearch.rdb_snapshot; a journal keeps its own).
    snapshot = resume_snapshot(study, snapshot_file(paths.root))
    outcome = SearchOutcome(study=study, resumed=resumed, trials_before=len(study.get_trials(deepcopy=False)))
    # A restart after a crash or a kill: the trials its workers left RUNNING are stale.
    outcome.stale_recovered = recover_stale(study, cfg.study.max_retries)
    invocation = uuid.uuid4().hex[:12]
    spec = RunSpec(
        config=json.loads(json.dumps(config_to_dict(cfg))),
        invocation=invocation,
        deadline_epoch_s=time.time() + rehearsal_wall_s(cfg, cfg.study.budget_s),  # budget / speed in a rehearsal
        n_trials=cfg.study.n_trials,
        status_path="",
        slot_lock=str(paths.root / f".slots-{invocation}.lock"),
        supervisor_pid=os.getpid(),
    )
    spec_dir = Path(tempfile.mkdtemp(prefix="kdsearch-run-", dir=paths.workers))
    slots = [_Slot(i, gpus[i % len(gpus)] if gpus else None) for i in range(n_workers)]
    seen_finished = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    ready_announced = False
    devices_announced: set[int] = set()
    stop_level_sent = 0
    grace_s = cfg.study.grace_s
    # The hard limit is each trial's own box + grace (TrialBoxes reads a searched box from storage,
    # only once the shortest box + grace has passed).
    min_box_s = rehearsal_wall_s(cfg, min(cfg.study.trial_times_s))
    trial_box_s = TrialBoxes(cfg, study)

    recover_every_s = RECOVER_EVERY_S
    heartbeat_s = heartbeat_interval_s(study)
    if heartbeat_s is not None:
        recover_every_s = min(recover_every_s, float(heartbeat_s))
    last_recover = time.monotonic()
    last_flush = t0
    fresh_study = outcome.trials_before == 0
    spawned: dict[str, subprocess.Popen[bytes]] = {}  # file stem (worker0-0) -> its process

    def sampler_seed(slot: _Slot) -> int | None:
        # Every worker process would otherwise replay the same seeded random draws (the
        # sampler's startup trials, and a resumed run the previous run's): the first worker of a
        # fresh study keeps study.seed (a one-worker run stays reproducible), the others draw
        # from a seed of their own.
        if fresh_study and slot.index == 0 and slot.generation == 0:
            return None
        key = f"{cfg.study.seed}:{invocation}:{slot.index}:{slot.generation}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:4], "big")

    def gpu_worker_env(slot: _Slot) -> dict[str, str]:
        # A worker pinned to a GPU must find it (no silent CPU fall-back) and records how many
        # workers share it.
        env = worker_env(slot.gpu, cpu_workers=len(slots))
        if device_type == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # study.device cpu, or auto without a usable GPU
        if slot.gpu is not None:
            env[ENV_EXPECT_CUDA] = "1"
            env[ENV_WORKERS_PER_GPU] = str(sum(s.gpu == slot.gpu for s in slots))
        return env

    def spawn(slot: _Slot) -> None:
        # Every worker of this run, a replacement included, gets the same spec: same invocation
        # (the --n-trials count), same deadline; only its status file and sampler seed are its own.
        name = f"worker{slot.index}-{slot.generation}"
        seed = sampler_seed(slot)
        slot.generation += 1
        slot.status_path = str(spec_dir / f"{name}.json")
        spec_path = spec_dir / f"spec-{name}.json"
        atomic_write_text(spec_path, json.dumps({**spec.__dict__, "status_path": slot.status_path, "sampler_seed": seed}))
        slot.log_path = str(spec_dir / f"{name}.log")
        with open(slot.log_path, "wb") as log:
            # A new session: the terminal's Ctrl-C reaches only the supervisor, which decides.
            slot.proc = subprocess.Popen(
                [sys.executable, "-m", "kdsearch.search.worker", str(spec_path)],
                env=gpu_worker_env(slot), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        spawned[name] = slot.proc

    def flush_time() -> None:
        nonlocal last_flush
        now = time.monotonic()
        add_time_spent(study, now - last_flush)
        last_flush = now

    def recover() -> None:
        nonlocal last_recover
        last_recover = time.monotonic()
        outcome.stale_recovered += recover_stale(study, cfg.study.max_retries)

    for slot in slots:
        spawn(slot)
    try:
        while not all(s.done for s in slots):
            time.sleep(POLL_S)
            # Ctrl-C: first -> finish the running trial; second -> interrupt it now.
            if stop.requests > stop_level_sent:
                sig = signal.SIGUSR1 if stop.requests == 1 else signal.SIGTERM
                for s in slots:
                    if s.proc is not None and s.proc.poll() is None:
                        s.proc.send_signal(sig)
                stop_level_sent = stop.requests
                progress("stopping", None, "finishing the running trial (Ctrl-C again to stop now)"
                         if stop.requests == 1 else "interrupting the running trial")
            statuses = {s.index: _read_status(s.status_path) for s in slots}
            for index, st in statuses.items():
                if st.get("device") and index not in devices_announced:
                    devices_announced.add(index)
                    note(f"worker {index}: {format_device_banner(st['device'])}")
            if not ready_announced and any(st.get("ready") for st in statuses.values()):
                ready_announced = True
                if on_ready is not None:
                    teachers = next((st.get("teachers") for st in statuses.values() if st.get("teachers")), {})
                    on_ready(outcome, teachers or {})
            lead = next((st for st in statuses.values() if st.get("phase") not in (None, "idle", "stopped")), None)
            if lead:
                prefix = f"#{lead['trial']} " if lead.get("trial") is not None else ""
                progress(lead.get("phase", ""), lead.get("fraction"), prefix + str(lead.get("message", "")))
            for s in slots:
                if s.done or s.proc is None:
                    continue
                st = statuses[s.index]
                code = s.proc.poll()
                started = st.get("trial_started_at")
                if code is None and started is not None and time.time() - started > min_box_s + grace_s \
                        and time.time() - started > trial_box_s(st.get("trial")) + grace_s:
                    # Hard limit: kill the worker (its trial cannot be trusted to stop), store FAIL
                    # timeout, and let the code below replace the worker. A worker that SIGKILL
                    # does not end in time (stuck in the kernel) is recorded as lost and left behind.
                    reaped = _kill(s.proc)
                    trial = _find_trial(study, st.get("trial"))
                    if trial is not None and mark_failed(
                        study, trial, "timeout",
                        f"ran {time.time() - started:.0f}s > box {trial_box_s(st.get('trial')):.0f}s + grace {grace_s:.0f}s"
                    ):
                        outcome.timeouts.append(trial.number)
                    code = s.proc.poll()
                    if not reaped and code is None:
                        _lose_worker(study, s, st, cfg.study.max_retries, outcome)
                        code = -signal.SIGKILL
                if code is None:
                    continue
                if code == 0:
                    s.done, s.stop_reason = True, str(st.get("stop_reason", "done"))
                    continue
                if code == EXIT_USER_ERROR:
                    raise KDSearchError(str(st.get("fatal", "worker failed during preparation")))
                if st.get("phase") == "crashed" and not st.get("ready"):
                    raise KDSearchError(
                        f"worker {s.index} crashed while preparing: {st.get('crash', 'unknown error')} (log: {s.log_path})"
                    )
                # Killed or crashed: its running trial is stale; recover it now and replace the worker.
                recover()
                s.deaths_in_row = deaths_in_row(s.deaths_in_row, st)
                if stop.requests or time.time() >= spec.deadline_epoch_s:
                    s.done, s.stop_reason = True, f"worker exited with {code}"
                elif s.deaths_in_row >= MAX_DEATHS_IN_A_ROW:
                    s.done = True
                    s.stop_reason = f"worker {s.index} died {s.deaths_in_row} times in a row (last log: {s.log_path})"
                else:
                    spawn(s)
            now = time.monotonic()
            if now - last_recover >= recover_every_s:
                recover()  # workers on other hosts, or a trial whose heartbeat just expired
            if now - last_flush >= TIME_FLUSH_EVERY_S:
                flush_time()
            for t in study.get_trials(deepcopy=False):
                if t.state.is_finished() and t.number not in seen_finished:
                    seen_finished.add(t.number)
                    if on_trial_end is not None:
                        wall = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_start and t.datetime_complete else 0.0
                        on_trial_end(t, wall)
            snapshot.tick()
    finally:
        _stop_workers(study, slots, cfg.study.max_retries, outcome)
        Path(spec.slot_lock).unlink(missing_ok=True)
        outcome.wall_s = time.monotonic() - t0
        flush_time()
    new = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(tr.INVOCATION) == invocation]
    outcome.trials_complete = sum(t.state == TrialState.COMPLETE for t in new)
    outcome.trials_failed = sum(t.state == TrialState.FAIL for t in new)
    outcome.trials_pruned = sum(t.state == TrialState.PRUNED for t in new)
    snapshot.tick(force=True)
    reasons = sorted({s.stop_reason for s in slots if s.stop_reason})
    outcome.stop_reason = "; ".join(reasons) or "done"
    if stop.requests:
        outcome.stop_reason = "interrupted (Ctrl-C)"
    keep_all = os.environ.get(KEEP_WORKER_FILES_ENV, "").strip() not in ("", "0")
    outcome.kept_logs = tidy_worker_files(spec_dir, spawned, new, remove=not keep_all)
    return outcome


def deaths_in_row(previous: int, status: dict[str, Any]) -> int:
    """A slot's count of worker deaths in a row without a finished trial, after one more death.

    ``status`` is the dead worker's last status file. A worker that finished a trial (stored it
    and lived on: ``trials_finished``) before dying starts the count again at this death; one
    that finished none adds to it. ``trials_done`` would not do: it also counts the trial the
    worker died in, so a worker that crashes in every trial would reset the count each time and
    be respawned for ever.
    """
    return 1 if status.get("trials_finished") else previous + 1


def tidy_worker_files(
    folder: Path, spawned: dict[str, subprocess.Popen[bytes]], trials: list[FrozenTrial], *, remove: bool = True
) -> list[str]:
    """After a run that ended without an error: remove the spec, status and log files of every
    worker that exited 0 and stored no FAIL trial; keep the others' for a post-mortem, and the
    folder only while it holds any. Returns the log paths a post-mortem needs (``remove=False``
    finds them and deletes nothing).

    ``spawned`` maps each worker's file stem (``worker0-1``) to its finished process; ``trials``
    are this run's, whose ``worker`` attr names the host and pid that ran them.
    """
    host = socket.gethostname()
    failed_pids = {
        (t.user_attrs.get(tr.WORKER) or {}).get("pid")
        for t in trials
        if t.state == TrialState.FAIL and (t.user_attrs.get(tr.WORKER) or {}).get("host") == host
    }
    kept: list[str] = []
    for name, proc in spawned.items():
        files = [folder / f"spec-{name}.json", folder / f"{name}.json", folder / f"{name}.log"]
        if proc.returncode != 0 or proc.pid in failed_pids:
            kept.append(str(files[2]))
            continue
        if not remove:
            continue
        for f in files:
            f.unlink(missing_ok=True)
    try:
        folder.rmdir()  # only when empty
    except OSError:
        pass
    return kept


def _kill(proc: subprocess.Popen[bytes], wait_s: float = KILL_WAIT_S) -> bool:
    """SIGKILL a worker's process group and wait at most ``wait_s`` for it to end.

    True when it ended (and was reaped). False when it is still there: a process blocked
    uninterruptibly in the kernel (a GPU driver call after a device fault, a dead network mount)
    dies only when that call returns, and an unbounded wait would hang the whole run on it. The
    caller then records the worker as lost (:func:`_lose_worker`) and goes on. A worker frozen with
    SIGSTOP is no such case: SIGKILL ends a stopped process.
    """
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        return False
    return True


def _lose_worker(
    study: optuna.Study, slot: _Slot, status: dict[str, Any], max_retries: int, outcome: SearchOutcome,
    wait_s: float = KILL_WAIT_S,
) -> None:
    """Record a worker that did not end after SIGKILL as lost and leave it behind.

    Its trial, if it is still RUNNING, is failed the way a dead worker's is (the recovery path):
    FAIL ``stale`` with the reason, and its parameters re-queued at most ``max_retries`` times. A
    trial already stored (a timeout) is left as it is.
    """
    proc = slot.proc
    pid = proc.pid if proc is not None else status.get("pid")
    why = f"worker {slot.index} (pid {pid}) still there {wait_s:g}s after SIGKILL (stuck in the kernel?); left behind"
    outcome.lost_workers.append(why)
    _log.warning("%s", why)
    slot.proc = None  # not waited for again; its Popen stays in the run's list (its files are kept)
    trial = _find_trial(study, status.get("trial"))
    if trial is not None and mark_failed(study, trial, "stale", why):
        outcome.stale_recovered.append(trial.number)
        requeue(study, trial, max_retries)


def _stop_workers(
    study: optuna.Study, slots: list[_Slot], max_retries: int, outcome: SearchOutcome,
    term_wait_s: float = TERM_WAIT_S, kill_wait_s: float = KILL_WAIT_S,
) -> None:
    """End every worker still running, in bounded time: SIGTERM (each stores its running trial as
    FAIL ``interrupted``), at most ``term_wait_s`` for all of them together, then SIGKILL and at
    most ``kill_wait_s`` each; a worker still there after that is lost (:func:`_lose_worker`)."""
    for s in slots:
        if s.proc is not None and s.proc.poll() is None:
            s.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + term_wait_s
    for s in slots:
        if s.proc is None:
            continue
        try:
            s.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            if not _kill(s.proc, kill_wait_s):
                _lose_worker(study, s, _read_status(s.status_path), max_retries, outcome, kill_wait_s)


class TrialBoxes:
    """The KD box of a running trial in wall seconds (box / speed in a rehearsal), for the
    supervisor's hard limit (box + grace).

    With one ``study.trial_time`` that is the box. With a searched one (a list) it is the trial's
    own: user attr ``box_s``, which :func:`~kdsearch.search.objective.run_trial` stores as the
    trial starts, read from storage once and remembered; until the trial has stored it, the
    longest box counts (a limit never shorter than the trial's).
    """

    def __init__(self, cfg: StudyConfig, study: optuna.Study) -> None:
        self.cfg = cfg
        self.study = study
        self._known: dict[int, float] = {}

    def __call__(self, number: Any) -> float:
        longest = rehearsal_wall_s(self.cfg, self.cfg.study.trial_time_s)
        if not self.cfg.study.box_searched or not isinstance(number, int):
            return longest
        if number not in self._known:
            trial = _find_trial(self.study, number)
            box = trial.user_attrs.get(tr.BOX_S) if trial is not None else None
            if not isinstance(box, (int, float)):
                return longest
            self._known[number] = rehearsal_wall_s(self.cfg, float(box))
        return self._known[number]


def _find_trial(study: optuna.Study, number: int | None) -> FrozenTrial | None:
    if number is None:
        return None
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.number == number:
            return t
    return None


def _visible_gpus() -> list[str]:
    """The CUDA_VISIBLE_DEVICES entries to pin workers to: the inherited list (indices, GPU-UUIDs
    or MIG ids, passed on as written) cut to the devices torch sees, else ``0..n-1``."""
    try:
        import torch

        n = torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        n = 0
    if n == 0:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if ids:
            return ids[:n]
    return [str(i) for i in range(n)]

