"""Faults in real runs: injected OOM/NaN/error/hang, SIGKILL of a worker or of the whole run, Ctrl-C.

Each scenario runs the real CLI; the ones that signal a run start ``python -m kdsearch.cli`` as a
subprocess and find the worker through its status file in ``<run_dir>/<study>/workers/``.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from kdsearch.commands.optimize import EXIT_ALL_FAILED
from kdsearch.search.recovery import pid_alive

from cli_helpers import run_cli
from search_helpers import (
    assert_stale_and_retried,
    assert_unchanged,
    distilling_worker,
    finish,
    kill_group,
    open_study,
    optimize_args,
    seed_study_folder,
    snapshot_complete,
    start_cli,
    wait_for,
    worker_statuses,
)

# The smoke study's 2 s box reaches the injection step (3) easily; a short grace makes a hang quick,
# yet leaves room for the fixed-cost measurement before the box and the one after it on a busy CPU.
FAST = ("--set", "study.grace=8s", "--set", "measure.max_time=1s")


@pytest.mark.parametrize(
    ("inject", "reason", "detail"),
    [("oom", "oom", "OutOfMemoryError: injected"), ("nan", "diverged", "loss nan"),
     ("error", "error", "RuntimeError: injected error")],
)
def test_injected_failure_is_stored_and_the_study_goes_on(
    smoke_run: Path, tmp_path: Path, inject: str, reason: str, detail: str
) -> None:
    seed_study_folder(smoke_run, tmp_path, inject)
    n = 1 if inject == "nan" else 2  # oom and error: the same worker's next trial is clean
    code = run_cli(*optimize_args(tmp_path, inject, "--n-trials", str(n), *FAST,
                                  "--set", f"debug.inject={inject}", "--set", "debug.inject_trial=0"))
    # A run whose every trial failed says so in its exit code; with a clean trial after it, 0.
    assert code == (EXIT_ALL_FAILED if n == 1 else 0)
    trials = open_study(tmp_path, inject).get_trials()
    assert len(trials) == n
    failed = trials[0]
    assert failed.state == TrialState.FAIL
    assert failed.user_attrs["fail_reason"] == reason
    assert detail in failed.user_attrs["fail_detail"], failed.user_attrs["fail_detail"]
    if inject == "oom":
        # The peak KD memory is recorded (None on the CPU, where CUDA memory is not measurable).
        assert "peak_kd_memory_mb" in failed.user_attrs
    if n == 2:
        # Same worker, next trial clean; the failed params are not re-queued.
        after = trials[1]
        assert after.state == TrialState.COMPLETE
        assert after.user_attrs["worker"]["pid"] == failed.user_attrs["worker"]["pid"]
        assert "retry_of" not in after.user_attrs


def test_a_hanging_trial_is_killed_as_timeout_and_its_worker_replaced(smoke_run: Path, tmp_path: Path) -> None:
    seed_study_folder(smoke_run, tmp_path, "hang")
    t0 = time.monotonic()
    code = run_cli(*optimize_args(tmp_path, "hang", "--n-trials", "2", *FAST,
                                  "--set", "debug.inject=hang", "--set", "debug.inject_trial=0"))
    assert code == 0
    hung, after = open_study(tmp_path, "hang").get_trials()
    assert hung.state == TrialState.FAIL and hung.user_attrs["fail_reason"] == "timeout"
    assert "box 2s + grace 8s" in hung.user_attrs["fail_detail"]
    # Killed at box + grace (10 s), not at the end of the run; a new worker ran the next trial.
    assert (hung.datetime_complete - hung.datetime_start).total_seconds() < 20
    assert after.state == TrialState.COMPLETE
    assert after.user_attrs["worker"]["pid"] != hung.user_attrs["worker"]["pid"]
    assert not pid_alive(hung.user_attrs["worker"]["pid"])
    # The killed worker's files stay for a post-mortem; its clean replacement's are removed.
    (kept,) = worker_statuses(tmp_path, "hang")
    assert kept["pid"] == hung.user_attrs["worker"]["pid"]
    assert time.monotonic() - t0 < 90


@pytest.mark.parametrize("storage", ["journal", "sqlite"])
def test_sigkill_of_a_worker_mid_trial_leaves_a_stale_trial_that_is_retried(
    copy_run: Path, tmp_path: Path, storage: str
) -> None:
    """Journal: resume the session smoke run (3 COMPLETE trials). sqlite: a new study there."""
    run_dir, study, url = copy_run, "smoke", None
    extra = ["--n-trials", "2"]
    if storage == "sqlite":
        study, url = "sq", f"sqlite:///{tmp_path}/sq.db"
        seed_study_folder(copy_run, run_dir, study)
        extra = ["--n-trials", "3", "--storage", url]
    log = tmp_path / "optimize.log"
    first_new = len(open_study(run_dir, study, url).trials) if storage == "journal" else 1
    proc = start_cli(optimize_args(run_dir, study, *extra), log)
    try:
        st = wait_for(lambda: distilling_worker(run_dir, study, min_trial=first_new), 60, "a trial in distil", log)
        before = snapshot_complete(run_dir, study, url)
        assert before, "no COMPLETE trial to compare"
        os.kill(st["pid"], signal.SIGKILL)
        code = finish(proc, log)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert code == 0, log.read_text()
    trials = open_study(run_dir, study, url).get_trials()
    assert_stale_and_retried(trials, st["trial"])
    assert "is gone" in trials[st["trial"]].user_attrs["fail_detail"]  # the supervisor's pid check
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert_unchanged(before, snapshot_complete(run_dir, study, url))


def test_restart_after_a_sigkill_of_the_whole_run_recovers_the_orphaned_trial(copy_run: Path, tmp_path: Path) -> None:
    log = tmp_path / "optimize.log"
    proc = start_cli(optimize_args(copy_run, "smoke", "--n-trials", "1"), log)
    try:
        st = wait_for(lambda: distilling_worker(copy_run, "smoke", min_trial=3), 60, "trial 3 in distil", log)
        before = snapshot_complete(copy_run, "smoke")
        kill_group(proc)  # the supervisor's process group: the CLI, not its workers' own sessions
    finally:
        if proc.poll() is None:
            kill_group(proc)
    # The workers die with their supervisor, leaving the trial RUNNING as after a power cut.
    wait_for(lambda: not pid_alive(st["pid"]), 10, "the orphaned worker to exit")
    assert open_study(copy_run, "smoke").trials[st["trial"]].state == TrialState.RUNNING
    assert run_cli(*optimize_args(copy_run, "smoke", "--n-trials", "1")) == 0
    trials = open_study(copy_run, "smoke").get_trials()
    assert len(trials) == 5
    retry = assert_stale_and_retried(trials, st["trial"])
    assert retry.number == 4
    assert_unchanged(before, snapshot_complete(copy_run, "smoke"))


def _signal_while_distilling(
    args: list[str], log: Path, run_dir: Path, name: str, signals: list[signal.Signals], min_trial: int = 0
) -> tuple[int, dict]:
    """Start ``kdsearch optimize``, wait until a trial (number >= ``min_trial``) is distilling, send
    ``signals`` 0.7 s apart (the supervisor polls every 0.5 s), and return (exit code, status)."""
    proc = start_cli(args, log)
    try:
        st = wait_for(lambda: distilling_worker(run_dir, name, min_trial=min_trial), 60,
                      f"trial >= {min_trial} in distil", log)
        for i, sig in enumerate(signals):
            if i:
                time.sleep(0.7)
            proc.send_signal(sig)
        code = finish(proc, log)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    return code, st


def test_ctrl_c_once_finishes_the_trial_twice_interrupts_it(smoke_run: Path, tmp_path: Path) -> None:
    seed_study_folder(smoke_run, tmp_path, "cc")
    args = optimize_args(tmp_path, "cc", "--n-trials", "5")
    log = tmp_path / "optimize.log"

    # Once: the running trial completes, no new one starts, the run ends (exit 130: interrupted).
    code, st = _signal_while_distilling(args, log, tmp_path, "cc", [signal.SIGINT])
    assert code == 130, log.read_text()
    study = open_study(tmp_path, "cc")
    assert [(t.number, t.state) for t in study.trials] == [(st["trial"], TrialState.COMPLETE)]
    spent_1 = study.user_attrs["time_spent_s"]
    assert spent_1 > 0

    # Twice: the running trial stops now as FAIL interrupted.
    code, st = _signal_while_distilling(args, log, tmp_path, "cc", [signal.SIGINT, signal.SIGINT], min_trial=1)
    assert code == 130, log.read_text()
    study = open_study(tmp_path, "cc")
    assert len(study.trials) == 2
    stopped = study.trials[1]
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["fail_reason"] == "interrupted"
    assert stopped.datetime_complete is not None
    # Budget is per invocation; the total over both runs is in time_spent_s.
    assert study.user_attrs["time_spent_s"] > spent_1


def test_sigterm_interrupts_the_running_trial_like_a_second_ctrl_c(smoke_run: Path, tmp_path: Path) -> None:
    seed_study_folder(smoke_run, tmp_path, "term")
    log = tmp_path / "optimize.log"
    code, st = _signal_while_distilling(optimize_args(tmp_path, "term", "--n-trials", "5"), log, tmp_path, "term",
                                        [signal.SIGTERM])
    assert code == 130, log.read_text()
    study = open_study(tmp_path, "term")
    stopped = [t for t in study.trials if t.number == st["trial"]][0]
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["fail_reason"] == "interrupted"
    assert not any(t.state == TrialState.RUNNING for t in study.trials)
