"""Helpers for the robustness tests: real `kdsearch optimize` processes on real storages.

Every run here is the smoke study (studies/smoke.yaml). A new study folder gets a copy of the
session smoke run's fitted teacher and teacher-logit cache (both keyed by content, not by study
name), so a worker is ready in a few seconds instead of fitting the teacher again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import optuna
from optuna.trial import FrozenTrial, TrialState

from kdsearch import trial_record as tr
from kdsearch.checkpoint import sha256_file
from kdsearch.storage import SHARED_CACHE_DIR, default_storage_url, load_study

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "studies" / "smoke.yaml"
T = TypeVar("T")


def seed_study_folder(smoke_run: Path, run_dir: Path, study: str) -> None:
    """Give ``run_dir`` (so its study ``study``) the smoke run's fitted teacher and logit cache,
    which every study of a run folder shares (``<run_dir>/_cache``)."""
    (run_dir / study).mkdir(parents=True, exist_ok=True)
    if run_dir.resolve() != smoke_run.resolve():  # a new study in the smoke run's (copied) folder has it
        shutil.copytree(smoke_run / SHARED_CACHE_DIR, run_dir / SHARED_CACHE_DIR, dirs_exist_ok=True)


def optimize_args(run_dir: Path, study: str, *extra: str) -> list[str]:
    return ["optimize", "--config", str(SMOKE), "--run-dir", str(run_dir), "--study-name", study, "--plain", *extra]


def start_cli(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``python -m kdsearch.cli ARGS`` in its own session (so a test can kill its whole group)."""
    full_env = dict(os.environ if env is None else env)
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), full_env.get("PYTHONPATH", "")) if p)
    with open(log, "ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "kdsearch.cli", *args], cwd=ROOT, env=full_env,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 120.0) -> int:
    """Wait for a CLI process; on timeout kill its group and fail with its log."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise AssertionError(f"kdsearch did not finish in {timeout_s:.0f}s; log:\n{tail(log)}") from None


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def wait_for(pred: Callable[[], T | None], timeout_s: float, what: str, log: Path | None = None) -> T:
    """Poll ``pred`` every 0.1 s until it returns something truthy."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}" + (f"; log:\n{tail(log)}" if log else ""))


def worker_statuses(run_dir: Path, study: str) -> list[dict[str, Any]]:
    """Every worker status file of the study (all runs), oldest first."""
    out: list[dict[str, Any]] = []
    for path in sorted((run_dir / study / "workers").glob("*/worker*.json"), key=lambda p: p.stat().st_mtime):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        data["_path"] = str(path)
        out.append(data)
    return out


def distilling_worker(run_dir: Path, study: str, min_trial: int = 0) -> dict[str, Any] | None:
    """The status of a worker that is distilling trial >= ``min_trial`` right now, if any."""
    for st in worker_statuses(run_dir, study):
        if st.get("phase") == "distil" and st.get("trial") is not None and st["trial"] >= min_trial:
            return st
    return None


def open_study(run_dir: Path, study: str, storage: str | None = None) -> optuna.Study:
    return load_study(storage or default_storage_url(run_dir, study), study)


def artifact_sha(run_dir: Path, study: str, artifact_id: str) -> str:
    return sha256_file(run_dir / study / "artifacts" / artifact_id)


def snapshot_complete(run_dir: Path, study: str, storage: str | None = None) -> dict[int, tuple[Any, ...]]:
    """number -> (params, values, user_attrs, artifact sha256) of every COMPLETE trial."""
    out: dict[int, tuple[Any, ...]] = {}
    for t in open_study(run_dir, study, storage).get_trials(states=(TrialState.COMPLETE,)):
        out[t.number] = (t.params, t.values, t.user_attrs,
                         artifact_sha(run_dir, study, t.user_attrs["artifact_id"]))
    return out


def assert_unchanged(before: dict[int, tuple[Any, ...]], after: dict[int, tuple[Any, ...]]) -> None:
    for number, snap in before.items():
        assert number in after, f"COMPLETE trial {number} is no longer COMPLETE"
        assert after[number] == snap, f"COMPLETE trial {number} changed"


def assert_stale_and_retried(trials: list[FrozenTrial], number: int) -> FrozenTrial:
    """Trial ``number`` is FAIL stale and exactly one later trial re-ran its params to COMPLETE."""
    stale = trials[number]
    assert stale.state == TrialState.FAIL, (stale.state, stale.user_attrs.get("fail_reason"))
    assert stale.user_attrs["fail_reason"] == "stale", stale.user_attrs
    retries = [t for t in trials if t.user_attrs.get("retry_of") == number]
    assert len(retries) == 1, [(t.number, t.state) for t in retries]
    retry = retries[0]
    assert retry.number > number and retry.params == stale.params
    assert retry.state == TrialState.COMPLETE, (retry.state, retry.user_attrs.get("fail_detail"))
    assert retry.user_attrs["retry_count"] == 1
    return retry


def assert_no_storage_errors(run_dir: Path, study: str) -> None:
    """No worker log mentions a traceback or a storage error; no worker crashed."""
    for log in (run_dir / study / "workers").glob("*/worker*.log"):
        text = log.read_text(errors="replace")
        assert "Traceback" not in text and "Error" not in text, f"{log}:\n{text[-3000:]}"
    for st in worker_statuses(run_dir, study):
        assert st.get("phase") == "stopped", st


def rung_competitors(trials: list[FrozenTrial], trial: FrozenTrial, k: int, n_competitors: int,
                     digest: str) -> list[Any]:
    """The rung-``k`` vectors ``trial``'s stored decision was taken against, rebuilt from the other
    trials' own ``rung_<k>`` attrs (the decision stores no vectors): those of the same objective
    names and bracket written before ``trial``'s, in the order of their write times. A write
    within half a second of ``trial``'s may have landed on either side of its read, so those are
    tried both ways; the set whose keys give the stored ``digest`` (and count) is the one.
    Fails when no such set exists."""
    from itertools import combinations  # noqa: PLC0415

    from kdsearch.search.pruning import RungEntry, competitors_digest  # noqa: PLC0415

    attr = tr.rung_key(k)
    mine = trial.user_attrs[attr]
    same = [t for t in trials if t.number != trial.number and isinstance(t.user_attrs.get(attr), dict)
            and t.user_attrs[attr]["names"] == mine["names"]
            and t.user_attrs[attr].get("bracket") == mine.get("bracket")]
    at = {t.number: t.user_attrs[attr]["time_unix_s"] for t in same}
    sure = [t for t in same if at[t.number] < mine["time_unix_s"] - 0.5]
    close = [t for t in same if abs(at[t.number] - mine["time_unix_s"]) <= 0.5]
    for r in range(len(close) + 1):
        for extra in combinations(close, r):
            chosen = [*sure, *extra]
            if len(chosen) == n_competitors - 1 and competitors_digest(t.number for t in chosen) == digest:
                return [RungEntry(t.number, tuple(t.user_attrs[attr]["values"])) for t in chosen]
    raise AssertionError(f"trial {trial.number} rung {k}: no set of earlier rung records matches its stored "
                         f"decision ({n_competitors - 1} competitors, digest {digest})")


class BigAllocator:
    """Allocator counters of a device whose training peak is ``peak_mb`` above an empty baseline;
    counts the segments opened on it (each real training segment resets the peak)."""

    def __init__(self, peak_mb: float) -> None:
        self.peak_mb = peak_mb
        self.resets = 0

    def synchronize(self) -> None:
        return None

    def allocated_bytes(self) -> int:
        return 0

    def peak_bytes(self) -> int:
        return int(self.peak_mb * 1e6)

    def reset_peak(self) -> None:
        self.resets += 1
