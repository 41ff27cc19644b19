"""Distributed runs on a real PostgreSQL server (``KDSEARCH_TEST_PG_URL``; `.ci/run` starts one).

Without the variable the tests skip locally and fail under ``CI=true``; a server that cannot be
reached always fails. Each test gets a fresh database, dropped afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from optuna.trial import TrialState

from kdsearch.storage import GRACE_ENV, INTERVAL_ENV

from search_helpers import (
    artifact_sha,
    assert_no_storage_errors,
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
)

_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Decided at collection, before the session smoke run is built for nothing.
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(
        not os.environ.get("KDSEARCH_TEST_PG_URL") and not _CI,
        reason="PostgreSQL tests: set KDSEARCH_TEST_PG_URL=postgresql://USER@HOST:PORT/DB (see .ci/run)",
    ),
]


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty database on the test server; dropped after the test."""
    base = os.environ.get("KDSEARCH_TEST_PG_URL", "")
    if not base:  # only under CI=true (skipped otherwise, see pytestmark)
        pytest.fail("CI=true but KDSEARCH_TEST_PG_URL is not set: .ci/run starts PostgreSQL and sets it")
    import psycopg

    parts = urlsplit(base)
    scheme = parts.scheme.split("+", 1)[0]  # postgresql+psycopg:// -> postgresql:// for libpq
    try:
        admin = psycopg.connect(urlunsplit(parts._replace(scheme=scheme)), autocommit=True, connect_timeout=10)
    except psycopg.Error as exc:
        why = " ".join(str(exc).split()) or type(exc).__name__
        pytest.fail(f"cannot reach PostgreSQL at KDSEARCH_TEST_PG_URL={base!r}: {why}", pytrace=False)
    name = f"kdsearch_t_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def test_optimize_and_a_joining_worker_share_a_postgres_study(smoke_run: Path, tmp_path: Path, pg_url: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`optimize --workers 2` plus `kdsearch worker --workers 2` (the command another host runs):
    four worker processes on one study finish exactly 3 + 3 trials."""
    monkeypatch.setenv("KDSEARCH_KEEP_WORKER_FILES", "1")  # the logs are read below, after clean runs
    seed_study_folder(smoke_run, tmp_path, "pg4")
    log = tmp_path / "run.log"
    main = start_cli(optimize_args(tmp_path, "pg4", "--storage", pg_url, "--workers", "2", "--n-trials", "3",
                                   "--set", "study.trial_time=1s"), log)
    joiner = None
    try:
        wait_for(lambda: _study_exists(pg_url), 60, "the study in PostgreSQL", log)
        joiner = start_cli(["worker", "--study-name", "pg4", "--storage", pg_url, "--run-dir", str(tmp_path),
                            "--workers", "2", "--n-trials", "3", "--plain"], log)
        assert finish(main, log) == 0, log.read_text()
        assert finish(joiner, log) == 0, log.read_text()
    finally:
        for proc in (main, joiner):
            if proc is not None and proc.poll() is None:
                kill_group(proc)
    trials = open_study(tmp_path, "pg4", pg_url).get_trials()
    assert [t.number for t in trials] == list(range(6))
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6, [t.user_attrs.get("fail_detail") for t in trials]
    invocations = {t.user_attrs["invocation"] for t in trials}
    assert len(invocations) == 2 and all(
        sum(t.user_attrs["invocation"] == inv for t in trials) == 3 for inv in invocations
    )
    ids = {t.user_attrs["artifact_id"] for t in trials}
    assert len(ids) == 6
    # The joining worker rebuilt its config from storage: its values are in the study's order too.
    for t in trials:
        assert t.values == [t.user_attrs["val_accuracy"], t.user_attrs["macs"]], t.number
    for t in trials:
        assert artifact_sha(tmp_path, "pg4", t.user_attrs["artifact_id"]) == t.user_attrs["weights_sha256"]
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) >= 3
    assert_no_storage_errors(tmp_path, "pg4")
    # The supervisor left a snapshot of the finished trials; an open from it reads the same study.
    from kdsearch.rdb_snapshot import snapshot_file
    from kdsearch.storage import load_study

    snap = snapshot_file(tmp_path / "pg4")
    assert snap.is_file() and json.loads(snap.read_bytes().split(b"\n", 1)[0])["trials"] >= 3
    reopened = load_study(pg_url, "pg4", tmp_path).get_trials()
    assert [(t.number, t.state, t.values, t.user_attrs) for t in reopened] == [
        (t.number, t.state, t.values, t.user_attrs) for t in trials]


def test_sigkill_of_a_worker_on_postgres_is_found_by_heartbeat(
    smoke_run: Path, tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Optuna heartbeats (every 1 s, stale after 4 s here) fail the dead worker's trial as stale
    and RetryHeartbeatStaleTrialCallback re-queues its params once."""
    monkeypatch.setenv(INTERVAL_ENV, "1")
    monkeypatch.setenv(GRACE_ENV, "4")
    seed_study_folder(smoke_run, tmp_path, "pgk")
    log = tmp_path / "run.log"
    proc = start_cli(optimize_args(tmp_path, "pgk", "--storage", pg_url, "--n-trials", "4"), log)
    try:
        st = wait_for(lambda: distilling_worker(tmp_path, "pgk", min_trial=1), 60, "trial 1 in distil", log)
        before = snapshot_complete(tmp_path, "pgk", pg_url)
        assert before
        os.kill(st["pid"], signal.SIGKILL)
        code = finish(proc, log)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert code == 0, log.read_text()
    trials = open_study(tmp_path, "pgk", pg_url).get_trials()
    assert_stale_and_retried(trials, st["trial"])
    assert "no heartbeat" in trials[st["trial"]].user_attrs["fail_detail"]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert_unchanged(before, snapshot_complete(tmp_path, "pgk", pg_url))


def _study_exists(url: str) -> bool:
    import optuna

    from kdsearch.storage import open_storage

    try:
        summaries = optuna.get_all_study_summaries(open_storage(url, create=False), include_best_trial=False)
    except Exception:  # noqa: BLE001 - the tables may not exist yet
        return False
    return any(s.study_name == "pg4" and s.user_attrs.get("config") for s in summaries)
