"""A day of kdsearch in minutes: thousands of rehearsed trials through the live stack, with faults.

Every trial replays a recorded row of ``benchmarks/search_table/table.jsonl`` (the study's
``rehearsal`` section, :mod:`kdsearch.search.rehearsal`), so a 30 s box takes ``30 / speed`` wall
seconds; everything else is the real thing: ``kdsearch optimize`` (the supervisor) and its
``kdsearch.search.worker`` processes, the sampler, screening on a fixed-cost constraint, the rung
pruner, constraints, the storage (a journal file, or a real PostgreSQL server) and recovery.

Each *leg* (storage x number of objectives x trials) runs one study to its trial count while the
driver injects faults, each ``--rounds`` times, spread over the run:

* ``storage``: journal -- one append raises ``OSError`` before writing (a token in
  ``KDSEARCH_FAULT_DIR``, :data:`kdsearch.storage.FAULT_DIR_ENV`; every other round the token is
  for a heartbeat write); PostgreSQL -- the server is restarted (``pg_ctl restart -m fast``), so
  every open connection breaks (only with the private cluster this script starts);
* ``worker-kill``: SIGKILL of a worker that is running a trial;
* ``worker-stop``: SIGSTOP of a worker running a trial, left frozen until the supervisor's hard
  limit (box / speed + grace) kills it (SIGCONT after the limit + 30 s if it never does);
* ``supervisor-kill``: SIGKILL of ``kdsearch optimize`` itself (its workers die with it), then
  ``kdsearch optimize`` again on the same study (resume);
* ``disk-full``: the run folder is a small tmpfs (``mount -t tmpfs``, root only); a filler file
  takes every free byte for ``--disk-full-s`` seconds, then is removed. Without tmpfs the fault
  is skipped, and the JSON says so.

Figures (printed, and written to ``--out`` as JSON): trials lost (left RUNNING or WAITING, FAIL
without a reason, a finished box stored FAIL whose worker the driver did not kill), duplicates
(two finished runs of one trial's parameters through re-queueing), the fail reasons, the rung
decision time (the ``on_eval`` call, storage write and read included) against the number of
competitors, p50 and p99, storage bytes per trial at 300 / 1,000 / 3,000 trials, the
supervisor's RSS across the run, and the wall time of ``kdsearch trials --pareto`` and
``kdsearch report`` on the soaked study.

Sampler: ``random`` by default. MO-TPE's cost per ask grows with the number of trials (its Parzen
estimators and the hypervolume-based split over every finished trial), so 3,000 trials on two
shared cores would measure the sampler, not the stack around it; ``--sampler tpe`` runs it anyway.

    python benchmarks/soak.py --leg journal:4:3000 --leg postgres:3:3000 --out /tmp/soak.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "benchmarks" / "search_table" / "table.jsonl"
FAULTS = ("storage", "worker-kill", "worker-stop", "supervisor-kill", "disk-full")
THRESHOLDS = (300, 1000, 3000)
TERMINAL = ("COMPLETE", "PRUNED", "FAIL")


@dataclass(frozen=True)
class Leg:
    """One soaked study: its storage, how many objectives, how many trials."""

    storage: str  # "journal" | "postgres"
    objectives: int  # 3 or 4
    trials: int
    faults: tuple[str, ...] | None = None  # None: --faults

    @classmethod
    def parse(cls, text: str) -> Leg:
        try:
            storage, n_obj, n, *rest = text.split(":")
            faults = tuple(f for f in rest[0].split("+") if f) if rest else None
            leg = cls(storage, int(n_obj), int(n), faults)
        except (ValueError, IndexError):
            raise SystemExit(f"--leg: {text!r} is not STORAGE:OBJECTIVES:TRIALS[:FAULT+FAULT], "
                             "e.g. journal:4:3000") from None
        if leg.storage not in ("journal", "postgres") or leg.objectives not in (3, 4) or leg.trials < 1 \
                or len(rest) > 1 or any(f not in FAULTS for f in leg.faults or ()):
            raise SystemExit(f"--leg: {text!r}: storage journal|postgres, objectives 3|4, trials >= 1, "
                             f"faults among {'+'.join(FAULTS)}")
        return leg

    @property
    def name(self) -> str:
        tag = "" if self.faults is None else "-" + "-".join(self.faults or ("nofault",))
        return f"soak-{self.storage}-{self.objectives}obj-{self.trials}{tag}"


@dataclass
class Settings:
    """What every leg shares (the CLI flags)."""

    workers: int = 4
    box_s: float = 30.0
    speed: float = 30.0  # a 30 s box replays in 1 s
    # Wall seconds. On a loaded 2-core machine a live worker can go seconds without running, so
    # a tight grace would fail live trials as timeout or stale; the heartbeat's grace is above
    # the supervisor's limit (box / speed + grace), so a frozen worker meets the limit first.
    grace_s: float = 10.0
    heartbeat_interval_s: int = 3
    heartbeat_grace_s: int = 15
    eta: int = 3
    min_fraction: float | None = None  # study.pruning.min_fraction; None: kdsearch's default (1/27)
    sampler: str = "random"
    seed: int = 0
    faults: tuple[str, ...] = FAULTS
    rounds: int = 3
    disk_full_s: float = 2.0
    tmpfs_mb: int = 1536
    leg_timeout_s: float = 1800.0
    max_size_mb: float = 2.0  # the constraint: model_size_mb <= this (screens before the box)
    cli: bool = True  # time `kdsearch trials --pareto` and `kdsearch report` on the soaked study
    cli_repeats: int = 3  # each command this many times (the median is `wall_s`)
    keep: Path | None = None  # copy each soaked study here (a journal) with its run folder, to profile later


# ----------------------------------------------------------------------------------------------
# The study file


def study_config(leg: Leg, s: Settings, run_dir: Path, storage_url: str | None) -> dict[str, Any]:
    """The soaked study: the table's VGG space, rungs on, one fixed-cost constraint, a rehearsal."""
    objectives = {"val_accuracy": "maximize", "macs": "minimize", "params": "minimize"}
    if leg.objectives == 4:
        objectives["latency_ms_b1"] = "minimize"
    study: dict[str, Any] = {
        "name": leg.name, "run_dir": str(run_dir), "sampler": s.sampler, "seed": s.seed, "budget": "30d",
        "trial_time": f"{s.box_s:g}s", "grace": f"{s.grace_s:g}s",
        "pruning": {"enabled": True, "eta": s.eta,
                    **({"min_fraction": s.min_fraction} if s.min_fraction is not None else {})},
    }
    if storage_url:
        study["storage"] = storage_url
    return {
        "study": study,
        "student": {"family": "vgg", "resolution": [16, 32],
                    "vgg": {"depth": [2, 3, 4, 5, 8], "width": {"low": 0.0625, "high": 0.5, "log": True}}},
        "distill": {"temperature": {"low": 2.0, "high": 6.0, "log": True}, "alpha": {"low": 0.5, "high": 0.9},
                    "eval_every_fraction": 0.25},
        "objectives": objectives,
        "constraints": {"model_size_mb": s.max_size_mb},
        "measure": {"max_time": f"{min(0.5, s.grace_s / 2):g}s"},
        "rehearsal": {"table": str(TABLE), "speed": s.speed},
    }


# ----------------------------------------------------------------------------------------------
# PostgreSQL: a private cluster, as .ci/run starts one


class PgCluster:
    """``initdb`` into a temp folder and ``pg_ctl start`` on 127.0.0.1 at a private port (as root,
    the server runs as the ``postgres`` user); or the server of ``KDSEARCH_TEST_PG_URL``, which
    this script cannot restart (the ``storage`` fault is then skipped on PostgreSQL legs)."""

    def __init__(self) -> None:
        self.external = os.environ.get("KDSEARCH_TEST_PG_URL", "").strip() or None
        self.data: Path | None = None
        self.port = 0
        self.bin: Path | None = None

    @property
    def can_restart(self) -> bool:
        return self.external is None

    def _as_postgres(self, *cmd: str) -> None:
        subprocess.run(["su", "postgres", "-c", " ".join(cmd)], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=120)

    def start(self) -> None:
        if self.external:
            return
        versions = sorted(Path("/usr/lib/postgresql").iterdir(), key=lambda p: [int(x) for x in p.name.split(".")])
        self.bin = versions[-1] / "bin"
        self.data = Path(tempfile.mkdtemp(prefix="kdsearch-soak-pg-"))
        shutil.chown(self.data, "postgres")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self._as_postgres(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres")
        self._pg_ctl("start")

    def _pg_ctl(self, action: str) -> None:
        assert self.bin is not None and self.data is not None
        opts = f"'-p {self.port} -k /tmp -c listen_addresses=127.0.0.1 -c max_connections=200'"
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.data / "log"),
                          "-m", "fast", "-w", action)

    def restart(self) -> None:
        self._pg_ctl("restart")

    def stop(self) -> None:
        if self.external or self.data is None:
            return
        with contextlib.suppress(Exception):
            self._pg_ctl("stop")
        shutil.rmtree(self.data, ignore_errors=True)

    def admin_url(self) -> str:
        return self.external or f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def new_database(self, name: str) -> str:
        from urllib.parse import urlsplit, urlunsplit  # noqa: PLC0415

        import psycopg  # noqa: PLC0415 - only PostgreSQL legs need it

        parts = urlsplit(self.admin_url())
        with psycopg.connect(urlunsplit(parts._replace(scheme="postgresql")), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return urlunsplit(parts._replace(scheme="postgresql", path=f"/{name}"))

    @staticmethod
    def database_bytes(url: str) -> int | None:
        import psycopg  # noqa: PLC0415

        try:
            with psycopg.connect(url, connect_timeout=5) as conn:
                row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
                return int(row[0]) if row else None
        except psycopg.Error:
            return None


# ----------------------------------------------------------------------------------------------
# The run folder: a small tmpfs when this machine allows it (the disk-full fault needs one)


@contextlib.contextmanager
def run_folder(base: Path, tmpfs_mb: int) -> Iterator[tuple[Path, str]]:
    """A fresh run folder, on a tmpfs of ``tmpfs_mb`` MB when ``mount -t tmpfs`` works here; yields
    (folder, how) where how says which."""
    base.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="run-", dir=base))
    mounted = False
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={tmpfs_mb}m", "tmpfs", str(folder)],
                           capture_output=True, text=True)
        mounted = r.returncode == 0
    how = f"tmpfs of {tmpfs_mb} MB (mount -t tmpfs)" if mounted else "plain folder (no tmpfs: not root or mount refused)"
    try:
        yield folder, how
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def fill_disk(folder: Path, hold_s: float) -> dict[str, Any]:
    """Take every free byte of ``folder``'s file system for ``hold_s`` seconds, then give it back."""
    filler = folder / ".soak-filler"
    written = 0
    chunk = b"\0" * (4 << 20)
    t0 = time.monotonic()
    try:
        with open(filler, "wb", buffering=0) as fh:
            while True:
                try:
                    written += fh.write(chunk)
                except OSError:
                    break
            small = b"\0" * 4096
            while True:  # the last few KB too
                try:
                    written += fh.write(small)
                except OSError:
                    break
        time.sleep(hold_s)
    finally:
        filler.unlink(missing_ok=True)
    return {"filled_mb": round(written / 2**20, 1), "held_s": round(time.monotonic() - t0, 2)}


# ----------------------------------------------------------------------------------------------
# Processes


def cli_env(fault_dir: Path, s: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["KDSEARCH_FAULT_DIR"] = str(fault_dir)
    env["KDSEARCH_HEARTBEAT_INTERVAL_S"] = str(s.heartbeat_interval_s)
    env["KDSEARCH_HEARTBEAT_GRACE_S"] = str(s.heartbeat_grace_s)
    env["KDSEARCH_KEEP_WORKER_FILES"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def start_optimize(config: Path, leg: Leg, s: Settings, n_trials: int, env: dict[str, str], log: Path
                   ) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "kdsearch.cli", "optimize", "--config", str(config), "--workers", str(s.workers),
            "--n-trials", str(n_trials), "--plain"]
    with open(log, "ab") as fh:
        fh.write(f"\n=== {dt.datetime.now(dt.UTC).isoformat()} {' '.join(args[2:])}\n".encode())
        fh.flush()
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def children(pid: int) -> list[int]:
    """Worker processes of supervisor ``pid`` (``python -m kdsearch.search.worker``)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid and b"kdsearch.search.worker" in (entry / "cmdline").read_bytes():
                out.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def busy_workers(run_dir: Path, study: str, pids: list[int]) -> list[int]:
    """Those of ``pids`` whose status file says they are inside a trial."""
    busy = []
    for path in (run_dir / study / "workers").glob("*/worker*.json"):
        try:
            st = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if st.get("pid") in pids and st.get("trial") is not None and st.get("phase") not in ("idle", "ready"):
            busy.append(int(st["pid"]))
    return busy


def pid_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


# ----------------------------------------------------------------------------------------------
# Counting trials while the run goes


class TrialCounter:
    """How many trials the study holds, by state, read cheaply every poll."""

    def __init__(self, leg: Leg, run_dir: Path, storage_url: str | None) -> None:
        self.leg, self.run_dir, self.url = leg, run_dir, storage_url
        self._study: Any = None

    def counts(self) -> Counter[str]:
        if self.leg.storage == "postgres":
            return self._pg_counts()
        try:
            if self._study is None:
                from kdsearch.storage import default_storage_url, load_study  # noqa: PLC0415

                self._study = load_study(default_storage_url(self.run_dir, self.leg.name), self.leg.name)
            return Counter(t.state.name for t in self._study.get_trials(deepcopy=False))
        except Exception:  # noqa: BLE001 - not created yet, or a write in progress: next poll
            return Counter()

    def _pg_counts(self) -> Counter[str]:
        import psycopg  # noqa: PLC0415

        states = {0: "RUNNING", 1: "COMPLETE", 2: "PRUNED", 3: "FAIL", 4: "WAITING"}
        assert self.url is not None
        try:
            with psycopg.connect(self.url, connect_timeout=5) as conn:
                rows = conn.execute(
                    "SELECT t.state, count(*) FROM trials t JOIN studies s ON s.study_id = t.study_id "
                    "WHERE s.study_name = %s GROUP BY t.state", (self.leg.name,)).fetchall()
        except psycopg.Error:
            return Counter()
        out: Counter[str] = Counter()
        for state, n in rows:
            name = state if isinstance(state, str) else states.get(int(state), str(state))
            out[str(name)] += int(n)
        return out

    def storage_bytes(self) -> int | None:
        if self.leg.storage == "postgres":
            assert self.url is not None
            return PgCluster.database_bytes(self.url)
        try:
            return (self.run_dir / self.leg.name / "journal.log").stat().st_size
        except OSError:
            return None


# ----------------------------------------------------------------------------------------------
# One leg


@dataclass
class LegLog:
    """What the driver did and saw during one leg."""

    leg: dict[str, Any]
    run_folder: str = ""
    faults: list[dict[str, Any]] = field(default_factory=list)
    skipped_faults: dict[str, str] = field(default_factory=dict)
    supervisor_runs: list[dict[str, Any]] = field(default_factory=list)
    rss: list[list[float]] = field(default_factory=list)  # [elapsed_s, trials, rss_mb, supervisor run]
    storage: list[list[float]] = field(default_factory=list)  # [trials, bytes] at each threshold
    killed_pids: list[int] = field(default_factory=list)
    wall_s: float = 0.0
    timed_out: bool = False
    last_proc: Any = None  # the running `kdsearch optimize` (not written out)
    unrecoverable: str | None = None  # why the leg stopped early: `kdsearch optimize` cannot resume


def fault_plan(leg: Leg, s: Settings, pg: PgCluster | None, tmpfs: bool, log: LegLog) -> list[tuple[int, str]]:
    """(trial count, fault) pairs: ``rounds`` of each fault, interleaved, between 5% and 90% of the run."""
    kinds = []
    for kind in (s.faults if leg.faults is None else leg.faults):
        if kind == "disk-full" and not tmpfs:
            log.skipped_faults[kind] = "the run folder is not a tmpfs (mount -t tmpfs needs root)"
            continue
        if kind == "storage" and leg.storage == "postgres" and pg is not None and not pg.can_restart:
            log.skipped_faults[kind] = "KDSEARCH_TEST_PG_URL's server is not ours to restart"
            continue
        kinds.append(kind)
    events = [kind for _ in range(s.rounds) for kind in kinds]
    if not events:
        return []
    lo, hi = max(1, int(0.05 * leg.trials)), max(2, int(0.9 * leg.trials))
    step = (hi - lo) / len(events)
    return [(int(lo + i * step), kind) for i, kind in enumerate(events)]


def run_leg(leg: Leg, s: Settings, base: Path, pg: PgCluster | None, rng: random.Random) -> dict[str, Any]:
    log = LegLog(leg=asdict(leg))
    with run_folder(base, s.tmpfs_mb) as (run_dir, how):
        log.run_folder = how
        tmpfs = how.startswith("tmpfs")
        fault_dir = Path(tempfile.mkdtemp(prefix="faults-", dir=base))  # not on the tmpfs: it must stay writable
        url = pg.new_database(leg.name.replace("-", "_")) if leg.storage == "postgres" and pg else None
        config = base / f"{leg.name}.yaml"
        config.write_text(yaml.safe_dump(study_config(leg, s, run_dir, url), sort_keys=False))
        out_log = base / f"{leg.name}.log"
        out_log.unlink(missing_ok=True)
        env = cli_env(fault_dir, s)
        counter = TrialCounter(leg, run_dir, url)
        plan = fault_plan(leg, s, pg, tmpfs, log)
        t0 = time.monotonic()
        proc = start_optimize(config, leg, s, leg.trials, env, out_log)
        try:
            _drive(leg, s, proc, log, counter, plan, config, env, out_log, run_dir, fault_dir, pg, rng, t0)
        finally:
            _kill_group(log.last_proc or proc)
            log.last_proc = None
        log.wall_s = round(time.monotonic() - t0, 1)
        for p in sorted(fault_dir.iterdir()):  # who hit each injected journal error
            rec = next((f for f in log.faults if p.name.removeprefix("claimed-") in f.get("what", "")), None)
            if rec is None:
                continue
            try:
                rec["claimed_by"] = json.loads(p.read_text()) if p.name.startswith("claimed-") else None
            except (OSError, ValueError):
                rec["claimed_by"] = "unreadable"
        shutil.rmtree(fault_dir, ignore_errors=True)
        try:
            figures = analyse(leg, run_dir, url, log)
        except Exception as exc:  # noqa: BLE001 - an unreadable study is this leg's finding
            figures = {"unreadable_study": f"{type(exc).__name__}: {str(exc)[:300]}"}
        figures["logs"] = keep_logs(run_dir / leg.name / "workers", base / f"{leg.name}-workers", out_log)
        figures["cli"] = cli_timings(leg, run_dir, url, base, s.cli_repeats) if s.cli else {}
        if s.keep is not None:
            figures["kept"] = keep_study(leg, run_dir, url, s.keep)
    return {"log": {k: v for k, v in asdict(log).items() if k != "last_proc"}, "figures": figures}


def _drive(leg: Leg, s: Settings, proc: subprocess.Popen[bytes], log: LegLog, counter: TrialCounter,
           plan: list[tuple[int, str]], config: Path, env: dict[str, str], out_log: Path, run_dir: Path,
           fault_dir: Path, pg: PgCluster | None, rng: random.Random, t0: float) -> None:
    """Watch one leg until its trials are stored: sample, inject the planned faults, resume the
    supervisor whenever it exits before the end (killed by the driver, or crashed)."""
    run_index = 0
    run_t0 = time.monotonic()
    stopped: dict[int, float] = {}  # frozen worker pid -> when
    thresholds = [n for n in THRESHOLDS if n <= leg.trials] or [leg.trials]
    last_rss = 0.0
    kill_requested = False
    while True:
        time.sleep(0.5)
        counts = counter.counts()
        n_all = sum(counts.values())
        n_done = sum(counts[k] for k in TERMINAL)
        now = time.monotonic()
        if now - last_rss >= 2.0 and proc.poll() is None:
            last_rss = now
            r = rss_mb(proc.pid)
            if r is not None:
                log.rss.append([round(now - t0, 1), n_done, round(r, 1), run_index])
        while thresholds and n_done >= thresholds[0]:
            size = counter.storage_bytes()
            log.storage.append([n_done, size if size is not None else -1])
            thresholds.pop(0)
        for pid, since in list(stopped.items()):
            limit = s.box_s / s.speed + s.grace_s
            if pid_gone(pid):
                rec = next(f for f in log.faults if f.get("pid") == pid and f["kind"] == "worker-stop")
                rec["ended_after_s"] = round(now - since, 2)
                rec["ended_by"] = "supervisor kill (hard limit)" if not kill_requested else "gone"
                del stopped[pid]
            elif now - since > limit + 30:
                os.kill(pid, signal.SIGCONT)
                rec = next(f for f in log.faults if f.get("pid") == pid and f["kind"] == "worker-stop")
                rec["ended_by"] = f"SIGCONT by the driver: the supervisor had not acted after {now - since:.0f}s"
                del stopped[pid]
        if proc.poll() is not None:
            log.supervisor_runs.append({"run": run_index, "exit_code": proc.returncode,
                                        "wall_s": round(now - run_t0, 1), "killed_by_driver": kill_requested,
                                        "trials_at_exit": n_done})
            if n_done >= leg.trials and counts["RUNNING"] == 0 and not kill_requested:
                break
            crashes = [r for r in log.supervisor_runs if r["exit_code"] != 0 and not r["killed_by_driver"]]
            if len(crashes) >= 3 and crashes[-1]["trials_at_exit"] == crashes[-3]["trials_at_exit"]:
                log.unrecoverable = ("kdsearch optimize exited non-zero 3 times in a row without a trial stored: "
                                     + _last_error(out_log))
                break
            if now - t0 > s.leg_timeout_s:
                log.timed_out = True
                break
            for pid in list(stopped):  # a frozen worker of a dead supervisor: let it die
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
                stopped.pop(pid)
            remaining = max(1, leg.trials - (n_all - counts["WAITING"]))
            kill_requested = False
            run_index += 1
            run_t0 = time.monotonic()
            proc = start_optimize(config, leg, s, remaining, env, out_log)
            log.last_proc = proc
            continue
        if now - t0 > s.leg_timeout_s:
            log.timed_out = True
            _interrupt(proc)
            continue
        if plan and n_done >= plan[0][0] and not stopped:
            at, kind = plan.pop(0)
            rec = inject(kind, leg, s, proc, run_dir, fault_dir, pg, rng, log)
            rec.update({"kind": kind, "at_trials": n_done, "at_s": round(now - t0, 1)})
            log.faults.append(rec)
            if kind == "worker-stop" and rec.get("pid"):
                stopped[rec["pid"]] = time.monotonic()
            if kind == "supervisor-kill" and rec.get("pid"):
                kill_requested = True


def _last_error(log: Path) -> str:
    """The last line of the last traceback in ``log`` (the error a resume dies of)."""
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    errors = [ln for ln in lines if ln[:1].isalpha() and ("Error" in ln.split(":")[0] or "Exception" in ln.split(":")[0])]
    return (errors or lines or ["(empty log)"])[-1][:300]


def _interrupt(proc: subprocess.Popen[bytes]) -> None:
    """Ctrl-C twice (running trials stored FAIL ``interrupted``), as a user ends a run; SIGKILL
    only if it has not ended 60 s later."""
    for _ in range(2):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=55)
    _kill_group(proc)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def inject(kind: str, leg: Leg, s: Settings, proc: subprocess.Popen[bytes], run_dir: Path, fault_dir: Path,
           pg: PgCluster | None, rng: random.Random, log: LegLog) -> dict[str, Any]:
    """Inject one fault now; returns what was done."""
    if kind == "storage":
        if leg.storage == "postgres":
            assert pg is not None
            t = time.monotonic()
            pg.restart()
            return {"what": "pg_ctl restart -m fast", "took_s": round(time.monotonic() - t, 2)}
        n = sum(1 for f in log.faults if f["kind"] == "storage")
        name = f"journal-write-{'heartbeat-' if n % 2 else ''}{n}"
        (fault_dir / name).write_text("")
        return {"what": f"token {name}: the next {'heartbeat ' if n % 2 else ''}journal append raises OSError"}
    if kind in ("worker-kill", "worker-stop"):
        pids = children(proc.pid)
        busy = busy_workers(run_dir, leg.name, pids) or pids
        if not busy:
            return {"what": "no worker alive to hit"}
        pid = rng.choice(busy)
        os.kill(pid, signal.SIGKILL if kind == "worker-kill" else signal.SIGSTOP)
        log.killed_pids.append(pid)
        return {"what": "SIGKILL" if kind == "worker-kill" else "SIGSTOP", "pid": pid}
    if kind == "supervisor-kill":
        workers = children(proc.pid)
        log.killed_pids.extend(workers)
        os.kill(proc.pid, signal.SIGKILL)
        return {"what": "SIGKILL of kdsearch optimize, then kdsearch optimize again", "pid": proc.pid,
                "workers": workers}
    if kind == "disk-full":
        return {"what": "filler file takes the tmpfs", **fill_disk(run_dir, s.disk_full_s)}
    raise ValueError(kind)


# ----------------------------------------------------------------------------------------------
# Figures


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def decision_times(trials: list[Any]) -> list[tuple[int, int, float]]:
    """(trial number, competitors, wall s of the on_eval call that decided) of every rung decision."""
    out = []
    for t in trials:
        reh = t.user_attrs.get("rehearsal") or {}
        hooks = reh.get("on_eval_s") or []
        pruning = t.user_attrs.get("pruning") or {}
        for d in pruning.get("decisions") or []:
            rung = float(d.get("rung", 0.0))
            # the first evaluation at or past the rung (fractions are stored rounded to 5 digits)
            secs = next((float(s) for f, s in hooks if float(f) >= rung - 1e-4), None)
            if secs is not None and "n_competitors" in d:
                out.append((t.number, int(d["n_competitors"]), secs))
    return out


def analyse(leg: Leg, run_dir: Path, url: str | None, log: LegLog) -> dict[str, Any]:
    """The soak's figures from the stored study (and what the driver logged)."""
    from kdsearch.storage import default_storage_url, load_study  # noqa: PLC0415

    study = load_study(url or default_storage_url(run_dir, leg.name), leg.name)
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    killed = set(log.killed_pids)

    def pid(t: Any) -> Any:
        return (t.user_attrs.get("worker") or {}).get("pid")

    fails = [t for t in trials if t.state.name == "FAIL"]
    no_reason = [t.number for t in fails if not t.user_attrs.get("fail_reason")]
    boxes_done_fail = [t for t in fails if "kd_history" in t.user_attrs]
    # A box that finished and was then stored FAIL: by the hard limit (a slow decision or store,
    # FAIL timeout), or as stale while its worker lived on (a heartbeat that died: lost).
    not_killed = [t for t in boxes_done_fail if pid(t) not in killed]
    unexplained = [t.number for t in not_killed if t.user_attrs.get("fail_reason") != "timeout"]
    box_then_timeout = [t.number for t in not_killed if t.user_attrs.get("fail_reason") == "timeout"]
    lineage: Counter[int] = Counter()
    for t in trials:
        if t.state.name in ("COMPLETE", "PRUNED"):
            lineage[int(t.user_attrs.get("retry_of", t.number))] += 1
    duplicates = sum(n - 1 for n in lineage.values() if n > 1)
    decisions = decision_times(trials)
    by_bin: dict[str, dict[str, Any]] = {}
    for lo, hi in ((0, 100), (100, 300), (300, 1000), (1000, 3000), (3000, 10**9)):
        secs = [x for _, n, x in decisions if lo <= n < hi]
        if secs:
            by_bin[f"{lo}-{hi if hi < 10**9 else 'inf'}"] = {
                "decisions": len(secs), "p50_s": _pct(secs, 0.5), "p99_s": _pct(secs, 0.99), "max_s": max(secs)}
    last = [x for num, _, x in decisions if num >= 0.9 * len(trials)]
    finished = sum(states[k] for k in TERMINAL)
    storage = [{"trials": n, "bytes": b, "bytes_per_trial": round(b / n) if b > 0 and n else None}
               for n, b in log.storage]
    for prev, cur in zip(storage, storage[1:], strict=False):
        if prev["bytes"] > 0 and cur["bytes"] > 0 and cur["trials"] > prev["trials"]:
            cur["marginal_bytes_per_trial"] = round((cur["bytes"] - prev["bytes"]) / (cur["trials"] - prev["trials"]))
    rss_runs: dict[int, list[list[float]]] = {}
    for _, n, mb, run in log.rss:
        rss_runs.setdefault(int(run), []).append([n, mb])
    return {
        "trials": len(trials),
        "finished": finished,
        "states": dict(states),
        "lost": {
            "left_running": [t.number for t in trials if t.state.name == "RUNNING"],
            "left_waiting": [t.number for t in trials if t.state.name == "WAITING"],
            "fail_without_reason": no_reason,
            "finished_box_stored_fail_unexplained": unexplained,
            "total": len(no_reason) + len(unexplained) + states["RUNNING"],
        },
        "finished_box_stored_fail_after_driver_kill": len(boxes_done_fail) - len(not_killed),
        "finished_box_then_timeout": box_then_timeout,
        "duplicates": duplicates,
        "fail_reasons": dict(Counter(str(t.user_attrs.get("fail_reason")) for t in fails)),
        "pruned_at_rung": dict(Counter(str(t.user_attrs.get("pruned_rung")) for t in trials
                                       if t.state.name == "PRUNED")),
        "screened": sum(1 for t in trials if t.user_attrs.get("screened")),
        "rung_decision_s": {
            "decisions": len(decisions),
            "max_competitors": max((n for _, n, _ in decisions), default=0),
            "by_competitors": by_bin,
            "last_10pct_of_trials": {"decisions": len(last), "p50_s": _pct(last, 0.5), "p99_s": _pct(last, 0.99)},
        },
        "storage": storage,
        "supervisor_rss_mb": {str(run): {"first": pts[0], "last": pts[-1], "max_mb": max(p[1] for p in pts),
                                         "samples": len(pts)} for run, pts in rss_runs.items()},
    }


def keep_logs(workers: Path, dest: Path, supervisor_log: Path) -> dict[str, Any]:
    """Copy the workers' logs and status files out of the run folder (which goes with the tmpfs)
    and count what they say: tracebacks, OSErrors, database errors."""
    dest.mkdir(parents=True, exist_ok=True)
    counts: Counter[str] = Counter()
    for path in workers.glob("*/worker*.*"):
        with contextlib.suppress(OSError):
            shutil.copy2(path, dest / f"{path.parent.name}-{path.name}")
    for path in [*dest.glob("*.log"), supervisor_log]:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for word in ("Traceback", "OSError", "OperationalError", "No space left", "injected transient"):
            counts[word] += text.count(word)
    crashed = []
    for path in dest.glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            st = json.loads(path.read_text())
            if st.get("phase") == "crashed":
                crashed.append({"file": path.name, "crash": st.get("crash")})
    return {"folder": str(dest), "mentions": dict(counts), "crashed_workers": crashed}


def keep_study(leg: Leg, run_dir: Path, url: str | None, keep: Path) -> str:
    """Copy the soaked study out of the leg's (temporary) run folder: the run folder itself, and on
    a database leg the study copied into a journal file beside it (``optuna.copy_study``), so that
    the CLI can be profiled on it later without a server. Returns where it went."""
    import optuna  # noqa: PLC0415

    dest = keep / leg.name
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("*.lock"))
    if url:
        from optuna.storages.journal import JournalFileBackend, JournalStorage  # noqa: PLC0415

        target = JournalStorage(JournalFileBackend(str(dest / leg.name / "journal.log")))
        optuna.copy_study(from_study_name=leg.name, from_storage=url, to_storage=target)
    return str(dest)


def cli_timings(leg: Leg, run_dir: Path, url: str | None, base: Path, repeats: int = 3) -> dict[str, Any]:
    """Wall time of ``kdsearch trials --pareto`` and ``kdsearch report`` on the soaked study, each
    run ``repeats`` times (``wall_s`` is the median, ``walls_s`` every run). On a database leg each
    is also timed without the trial snapshot the supervisor left (``cold_walls_s``: the snapshot
    moved aside for that run, then put back), i.e. what a first open from another run folder costs."""
    from kdsearch.rdb_snapshot import snapshot_file  # noqa: PLC0415

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    common = ["--study-name", leg.name, "--run-dir", str(run_dir), *(["--storage", url] if url else [])]
    snapshot = snapshot_file(run_dir / leg.name)
    out: dict[str, Any] = {}
    for label, args in (("trials_pareto", ["trials", "--pareto", *common]),
                        ("report", ["report", *common, "--out", str(base / f"{leg.name}-report.html")])):

        def once(args: list[str] = args) -> tuple[float, subprocess.CompletedProcess[bytes]]:
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "kdsearch.cli", *args], cwd=ROOT, env=env, capture_output=True,
                               timeout=600)
            return round(time.perf_counter() - t, 2), r

        walls, cold, code, err = [], [], 0, ""
        for _ in range(max(1, repeats)):
            wall, r = once()
            walls.append(wall)
            code, err = code or r.returncode, err or (r.stderr.decode(errors="replace")[-500:] if r.returncode else "")
            if url and snapshot.is_file():
                aside = snapshot.with_name(snapshot.name + ".aside")
                snapshot.rename(aside)
                try:
                    wall, r = once()
                finally:
                    aside.replace(snapshot)  # the cold run's own save (if any) is replaced by the original
                cold.append(wall)
                code, err = code or r.returncode, err or (r.stderr.decode(errors="replace")[-500:] if r.returncode else "")
        out[label] = {"wall_s": statistics.median(walls), "walls_s": walls, "exit_code": code}
        if cold:
            out[label]["cold_walls_s"] = cold
        if code != 0:
            out[label]["stderr"] = err
    return out


# ----------------------------------------------------------------------------------------------


def soak(legs: list[Leg], s: Settings, base: Path, seed: int = 0) -> dict[str, Any]:
    """Run every leg; returns the JSON document (settings, legs, environment)."""
    rng = random.Random(seed)
    pg = PgCluster() if any(leg.storage == "postgres" for leg in legs) else None
    results: dict[str, Any] = {}
    try:
        if pg is not None:
            pg.start()
        for leg in legs:
            print(f"== {leg.name}", flush=True)
            results[leg.name] = run_leg(leg, s, base, pg, rng)
            print(summary_line(leg.name, results[leg.name]), flush=True)
            (base / f"{leg.name}.json").write_text(json.dumps(results[leg.name], indent=1, default=str))
    finally:
        if pg is not None:
            pg.stop()
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_at_end": os.getloadavg()},
        "settings": {**asdict(s), "faults": list(s.faults)},
        "legs": results,
    }


def summary_line(name: str, result: dict[str, Any]) -> str:
    f, lg = result["figures"], result["log"]
    if "unreadable_study" in f:
        return f"{name}: the study cannot be read after the run: {f['unreadable_study']} ({lg.get('unrecoverable')})"
    rd = f["rung_decision_s"]["last_10pct_of_trials"]
    fmt = (lambda v: "n/a" if v is None else f"{v:.3f}")  # noqa: E731
    st = " ".join(f"{k}={v}" for k, v in sorted(f["states"].items()))
    return (f"{name}: {f['trials']} trials ({st}) in {lg['wall_s']:.0f}s; lost {f['lost']['total']}, "
            f"duplicates {f['duplicates']}; faults {len(lg['faults'])}; rung decision p50/p99 (last 10%) "
            f"{fmt(rd['p50_s'])}/{fmt(rd['p99_s'])} s at up to {f['rung_decision_s']['max_competitors']} competitors"
            + (f"; trials --pareto {f['cli']['trials_pareto']['wall_s']} s, report {f['cli']['report']['wall_s']} s"
               if f["cli"] else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--leg", action="append", type=Leg.parse, help="STORAGE:OBJECTIVES:TRIALS (repeatable), "
                   "e.g. journal:4:3000; default journal:4:3000 and postgres:3:3000")
    d = Settings()
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--box-s", type=float, default=d.box_s, help="study.trial_time (s of box)")
    p.add_argument("--speed", type=float, default=d.speed, help="rehearsal.speed: box seconds per wall second")
    p.add_argument("--grace-s", type=float, default=d.grace_s, help="study.grace (wall s)")
    p.add_argument("--heartbeat", type=int, nargs=2, default=[d.heartbeat_interval_s, d.heartbeat_grace_s],
                   metavar=("INTERVAL_S", "GRACE_S"))
    p.add_argument("--sampler", default=d.sampler)
    p.add_argument("--min-fraction", type=float, default=None,
                   help="study.pruning.min_fraction, the first rung (default: kdsearch's, 1/27)")
    p.add_argument("--faults", default=",".join(d.faults), help=f"comma list of {', '.join(FAULTS)}, or none")
    p.add_argument("--rounds", type=int, default=d.rounds, help="times each fault is injected per leg")
    p.add_argument("--tmpfs-mb", type=int, default=d.tmpfs_mb)
    p.add_argument("--leg-timeout-s", type=float, default=d.leg_timeout_s)
    p.add_argument("--cli-repeats", type=int, default=d.cli_repeats,
                   help="times each CLI command is timed on the soaked study (the median is reported)")
    p.add_argument("--keep", type=Path, default=None,
                   help="copy each soaked study (as a journal) and its run folder here, to profile the CLI later")
    p.add_argument("--work-dir", type=Path, default=None, help="configs, logs, reports (default: a temp folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the JSON here")
    a = p.parse_args(argv)
    faults = tuple(f for f in a.faults.split(",") if f and f != "none")
    bad = [f for f in faults if f not in FAULTS]
    if bad:
        p.error(f"--faults: unknown {bad}; known: {', '.join(FAULTS)}")
    s = Settings(workers=a.workers, box_s=a.box_s, speed=a.speed, grace_s=a.grace_s,
                 heartbeat_interval_s=a.heartbeat[0], heartbeat_grace_s=a.heartbeat[1], sampler=a.sampler,
                 min_fraction=a.min_fraction,
                 seed=a.seed, faults=faults, rounds=a.rounds, tmpfs_mb=a.tmpfs_mb, leg_timeout_s=a.leg_timeout_s,
                 cli_repeats=a.cli_repeats, keep=a.keep)
    legs = a.leg or [Leg("journal", 4, 3000), Leg("postgres", 3, 3000)]
    base = a.work_dir or Path(tempfile.mkdtemp(prefix="kdsearch-soak-"))
    doc = soak(legs, s, base, a.seed)
    text = json.dumps(doc, indent=1, default=str)
    if a.out:
        a.out.write_text(text)
    print(f"figures: {a.out or '(stdout below)'}; work folder {base}")
    if not a.out:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
