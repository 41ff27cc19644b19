"""Storage faults (issue 19's soak): a journal append cut short by a full disk, a journal that
already holds a torn record, transient journal and database errors in ordinary storage calls.

Every fault is faked or confined to a subprocess (a file-size limit, an injected ``OSError``, an
``OperationalError`` raised in place of a database call), so the tests need no root, no full
disk and no database server.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
from optuna.exceptions import StorageInternalError
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from kdsearch.errors import StorageError
from kdsearch.storage import FAULT_DIR_ENV, RETRY_ENV, load_study, open_storage, retry_transient

from cli_helpers import ROOT, run_cli


def _journal_study(path: Path, name: str = "s") -> optuna.Study:
    return optuna.create_study(storage=open_storage(f"journal:{path}"), study_name=name, directions=["maximize"])


def _lines_all_json(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n"), data[-80:]
    return [json.loads(line) for line in data.splitlines()]


def _disconnect() -> StorageInternalError:
    """What Optuna's RDBStorage raises while PostgreSQL restarts: its StorageInternalError with
    SQLAlchemy's OperationalError underneath."""
    broken = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
    try:
        raise StorageInternalError("An exception is raised during the commit.") from broken
    except StorageInternalError as exc:
        return exc


# ----------------------------------------------------------------------------------------------
# A full disk: the append either lands whole or leaves nothing


_FSIZE_CHILD = r"""
import json, resource, signal, sys, os
sys.path.insert(0, sys.argv[3])
import optuna
from kdsearch.storage import open_storage
path, limit_extra = sys.argv[1], int(sys.argv[2])
optuna.logging.set_verbosity(optuna.logging.ERROR)
study = optuna.load_study(study_name="s", storage=open_storage(f"journal:{path}", create=False))
trial = study.trials[0]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the limit then fails write() with EFBIG
size = os.path.getsize(path)
resource.setrlimit(resource.RLIMIT_FSIZE, (size + limit_extra, resource.RLIM_INFINITY))
try:
    study._storage.set_trial_user_attr(trial._trial_id, "big", "x" * 4000)
    print("no error")
except Exception as exc:  # the error the disk gave
    print(type(exc).__name__, getattr(exc, "errno", None))
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
study._storage.set_trial_user_attr(trial._trial_id, "after", 1)
"""


def test_a_journal_append_cut_short_by_the_file_size_limit_leaves_no_partial_line(tmp_path: Path) -> None:
    path = tmp_path / "journal.log"
    study = _journal_study(path)
    study.enqueue_trial({})
    before = path.read_bytes()
    out = subprocess.run([sys.executable, "-c", _FSIZE_CHILD, str(path), "100", str(ROOT)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("OSError"), out.stdout  # EFBIG: the write was cut after 100 bytes
    records = _lines_all_json(path)  # no torn line: every record is whole JSON
    assert path.read_bytes().startswith(before)
    assert not any("big" in (r.get("user_attr") or {}) for r in records)
    reopened = load_study(f"journal:{path}", "s")
    assert reopened.trials[0].user_attrs == {"after": 1}


class _HalfThenENOSPC:
    """``os.write`` that writes half of the first call's bytes for real, then fails like a full disk."""

    def __init__(self, real) -> None:
        self.real, self.calls = real, 0

    def __call__(self, fd: int, data: bytes) -> int:
        self.calls += 1
        if self.calls == 1:
            self.real(fd, bytes(data[: len(data) // 2]))
            raise OSError(28, "No space left on device")
        return self.real(fd, data)


def test_a_full_disk_mid_append_is_truncated_and_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    import kdsearch.storage as storage_mod

    path = tmp_path / "journal.log"
    study = _journal_study(path)
    fake = _HalfThenENOSPC(storage_mod.os.write)
    monkeypatch.setattr(storage_mod.os, "write", fake)
    with caplog.at_level(logging.WARNING, logger="kdsearch.storage"):
        trial = study.ask()  # the create-trial record: half written, cut, then written whole
    monkeypatch.undo()
    assert fake.calls >= 2
    records = _lines_all_json(path)
    assert sum(r["op_code"] == 4 for r in records) == 1  # one CREATE_TRIAL, no duplicate
    study.tell(trial, 0.5)
    assert load_study(f"journal:{path}", "s").trials[0].state == TrialState.COMPLETE
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2, [r.getMessage() for r in warned]  # the incident and its end, once each


def test_an_unterminated_tail_left_by_a_crash_is_dropped_before_the_next_append(tmp_path: Path) -> None:
    path = tmp_path / "journal.log"
    study = _journal_study(path)
    study.enqueue_trial({})
    with open(path, "ab") as fh:  # a writer killed mid-line, nothing after it
        fh.write(b'{"op_code":8,"worker_id":"w","trial_id":0,"user_attr":{"lost":')
    reopened = load_study(f"journal:{path}", "s")  # Optuna skips an unterminated last line
    reopened._storage.set_trial_user_attr(reopened.trials[0]._trial_id, "after", 2)
    _lines_all_json(path)
    assert load_study(f"journal:{path}", "s").trials[0].user_attrs == {"after": 2}


# ----------------------------------------------------------------------------------------------
# A journal torn by an older version: a clear error, and a repair that keeps a backup


def _torn_journal(run_dir: Path) -> tuple[Path, int, int]:
    """A study ``s`` in ``run_dir`` whose journal has a half record glued to the next one, with
    more records after it (what ENOSPC left before the fix). Returns (path, tear offset, trials before)."""
    path = run_dir / "s" / "journal.log"
    path.parent.mkdir(parents=True)
    study = _journal_study(path)
    for v in (0.1, 0.2):
        study.tell(study.ask(), v)
    good = path.read_bytes()
    study.ask()  # a CREATE_TRIAL record, then glue half a record in front of the next one
    lines = path.read_bytes()[len(good):]
    with open(path, "wb") as fh:
        fh.write(good + b'{"op_code":8,"worker_id":"w","trial_id":2,"user_at' + lines)
    with open(path, "ab") as fh:
        fh.write(lines)
    return path, len(good), 2


def test_a_torn_journal_gives_one_line_naming_the_file_the_offset_and_the_fix(tmp_path: Path) -> None:
    path, offset, _ = _torn_journal(tmp_path)
    with pytest.raises(StorageError) as err:
        load_study(f"journal:{path}", "s").get_trials()
    msg = str(err.value)
    assert str(path) in msg and f"byte {offset}" in msg and "kdsearch repair" in msg, msg
    assert "\n" not in msg


def test_repair_truncates_the_torn_tail_after_a_backup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, offset, n_before = _torn_journal(tmp_path)
    original = path.read_bytes()
    args = ("repair", "--study-name", "s", "--run-dir", tmp_path)
    assert run_cli(*args) == 0  # without --yes: says what it would do, changes nothing
    assert path.read_bytes() == original and f"byte {offset}" in capsys.readouterr().out
    assert run_cli(*args, "--yes") == 0
    out = capsys.readouterr().out
    backups = list(path.parent.glob("journal.log.torn-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == original and str(backups[0]) in out
    assert path.read_bytes() == original[:offset]
    study = load_study(f"journal:{path}", "s")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * n_before
    assert run_cli(*args, "--yes") == 0 and "nothing to repair" in capsys.readouterr().out


def test_repair_refuses_a_database_url(tmp_path: Path) -> None:
    assert run_cli("repair", "--study-name", "s", "--storage", f"sqlite:///{tmp_path}/x.db") == 2


# ----------------------------------------------------------------------------------------------
# Transient errors in ordinary storage calls are retried


def test_a_transient_journal_error_in_ask_set_user_attr_and_tell_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The soak's injected journal write errors (``KDSEARCH_FAULT_DIR``): one per storage call."""
    faults = tmp_path / "faults"
    faults.mkdir()
    monkeypatch.setenv(FAULT_DIR_ENV, str(faults))
    path = tmp_path / "journal.log"
    study = _journal_study(path)
    (faults / "journal-write-1").touch()
    trial = study.ask()  # the create-trial write fails once
    (faults / "journal-write-2").touch()
    trial.set_user_attr("box", 1)  # a trial's own attr
    (faults / "journal-write-3").touch()
    study.tell(trial, 0.5)
    assert sorted(p.name for p in faults.iterdir()) == [f"claimed-journal-write-{i}" for i in (1, 2, 3)]
    records = _lines_all_json(path)
    assert sum(r["op_code"] == 4 for r in records) == 1
    t = load_study(f"journal:{path}", "s").trials[0]
    assert t.state == TrialState.COMPLETE and t.user_attrs == {"box": 1} and t.values == [0.5]


def test_retry_gives_up_after_its_bounded_time_with_a_clear_message(caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def always_down() -> None:
        calls.append(1)
        raise _disconnect()

    with caplog.at_level(logging.WARNING, logger="kdsearch.storage"), pytest.raises(StorageError) as err:
        retry_transient(always_down, "reading the trials", total_s=0.3, first_s=0.01)
    msg = str(err.value)
    assert "reading the trials" in msg and "server closed the connection" in msg and "0.3" in msg, msg
    assert len(calls) >= 3
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1  # logged once


def test_errors_that_are_not_transient_are_raised_at_once() -> None:
    calls = []

    def broken() -> None:
        calls.append(1)
        raise KeyError("no such trial")

    with pytest.raises(KeyError):
        retry_transient(broken, "x", total_s=5.0)
    integrity = sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("duplicate key"))
    for exc in (OSError(13, "Permission denied"), StorageInternalError("x"), integrity):
        calls.clear()

        def fails(exc: Exception = exc) -> None:
            calls.append(1)
            raise exc

        with pytest.raises(type(exc)):
            retry_transient(fails, "x", total_s=5.0)
        assert len(calls) == 1


def _sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> optuna.Study:
    monkeypatch.setenv(RETRY_ENV, "10")
    return optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 's.db'}"), study_name="s")


def _fail_once(monkeypatch: pytest.MonkeyPatch, name: str, *, land: bool = False) -> list[int]:
    """Make ``RDBStorage.<name>`` raise a disconnect once (after doing its work when ``land``:
    the commit went through, its answer was lost)."""
    real = getattr(RDBStorage, name)
    calls: list[int] = []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            if land:
                real(self, *args, **kwargs)
            raise _disconnect()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(RDBStorage, name, flaky)
    return calls


def test_a_database_restart_during_ask_reads_and_attrs_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study = _sqlite(tmp_path, monkeypatch)
    for name in ("_create_new_trial", "_get_trials", "set_trial_user_attr"):  # what Optuna's cache calls
        _fail_once(monkeypatch, name)
    trial = study.ask()
    trial.set_user_attr("k", 1)
    assert [t.user_attrs for t in study.get_trials()] == [{"k": 1}]


def test_a_tell_whose_commit_landed_is_not_told_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study = _sqlite(tmp_path, monkeypatch)
    trial = study.ask()
    calls = _fail_once(monkeypatch, "set_trial_state_values", land=True)
    study.tell(trial, 0.7)  # the answer to the commit was lost: it is read back, not repeated
    assert len(calls) == 1
    t = study.trials[0]
    assert t.state == TrialState.COMPLETE and t.values == [0.7]


def test_a_tell_that_did_not_land_is_repeated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study = _sqlite(tmp_path, monkeypatch)
    trial = study.ask()
    calls = _fail_once(monkeypatch, "set_trial_state_values")
    study.tell(trial, 0.7)
    assert len(calls) == 2 and study.trials[0].state == TrialState.COMPLETE


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_the_supervisors_stale_recovery_survives_a_database_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The soak's crash: StorageInternalError from recover_stale -> stale_trial_ids."""
    from kdsearch.search.recovery import recover_stale
    from kdsearch.storage import RetryingRDBStorage

    monkeypatch.setenv(RETRY_ENV, "10")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = RetryingRDBStorage(f"sqlite:///{tmp_path / 'hb.db'}", heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(storage=storage, study_name="hb")
    calls = _fail_once(monkeypatch, "_get_stale_trial_ids")
    assert recover_stale(study, max_retries=1) == []
    assert len(calls) == 2


def test_no_record_is_appended_after_a_torn_last_line(tmp_path: Path) -> None:
    """A whole-looking last line that is not JSON (torn and glued by an older version): Optuna
    skips it while it is last, but any record after it would make the journal unreadable."""
    path = tmp_path / "journal.log"
    study = _journal_study(path)
    study.enqueue_trial({})
    good = path.read_bytes()
    with open(path, "ab") as fh:
        fh.write(b'{"op_code":8,"worker_id":"w","trial_id":0,"user_attr":{"lo{"op_code":8}\n')
    reopened = load_study(f"journal:{path}", "s")
    with pytest.raises(StorageError, match=f"byte {len(good)}"):
        _set_attr_of_trial_0(reopened)
    assert path.read_bytes().startswith(good) and path.read_bytes().count(b"\n") == good.count(b"\n") + 1


def _set_attr_of_trial_0(study: optuna.Study) -> None:
    from kdsearch.storage import study_storage, trial_id

    study_storage(study).set_trial_user_attr(trial_id(study, 0), "after", 1)


# ----------------------------------------------------------------------------------------------
# Journal snapshots: an open starts from the newest snapshot, and only ever one that fits


def _trials_of(path: Path) -> list[tuple]:
    """The stored trials as plain tuples, read by Optuna's own journal backend (no snapshot)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(storage=JournalStorage(JournalFileBackend(str(path))), study_name="s")
    return [(t.number, t.state, t.values, t.params, t.user_attrs) for t in study.get_trials(deepcopy=False)]


def _snapshot_study(path: Path, n_trials: int) -> None:
    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("a", trial.number)
        return trial.suggest_float("x", 0, 1)

    _journal_study(path).optimize(objective, n_trials=n_trials)


def _open_counting_parsed_records(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[tuple], int]:
    import optuna.storages.journal._file as journal_file

    parsed = []
    real_loads = journal_file.json.loads
    monkeypatch.setattr(journal_file.json, "loads", lambda b, *a, **k: parsed.append(1) or real_loads(b, *a, **k))
    study = optuna.load_study(storage=open_storage(f"journal:{path}"), study_name="s")
    monkeypatch.setattr(journal_file.json, "loads", real_loads)
    return [(t.number, t.state, t.values, t.params, t.user_attrs) for t in study.get_trials(deepcopy=False)], len(parsed)


def test_an_open_starts_from_the_snapshot_and_reads_the_same_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kdsearch.storage_faults import snapshot_path

    path = tmp_path / "journal.log"
    _snapshot_study(path, 130)  # trial ids 100 (and 0) snapshot; 30 trials after it
    assert snapshot_path(path).is_file()
    records = len(path.read_bytes().splitlines())
    trials, parsed = _open_counting_parsed_records(path, monkeypatch)
    assert trials == _trials_of(path)
    assert len(trials) == 130
    assert parsed < records / 3, (parsed, records)  # only the records after the snapshot are parsed


def test_a_snapshot_that_no_longer_fits_the_journal_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kdsearch.storage_faults import snapshot_path

    path = tmp_path / "journal.log"
    _snapshot_study(path, 110)
    snap = snapshot_path(path).read_bytes()
    records = len(path.read_bytes().splitlines())
    # the journal cut before the snapshot's end and written again (as after a repair): same length, other records
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2].rsplit(b"\n", 1)[0] + b"\n")
    study = optuna.load_study(storage=open_storage(f"journal:{path}"), study_name="s")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=60)
    snapshot_path(path).write_bytes(snap)  # the old snapshot back in place
    trials, parsed = _open_counting_parsed_records(path, monkeypatch)
    assert trials == _trials_of(path)
    assert parsed >= len(path.read_bytes().splitlines()) - 1  # replayed whole

    # damaged, or from another Optuna version: ignored as well
    for bad in (snap[:-10] + b"0123456789", snap.replace(optuna.__version__.encode(), b"0.0.0", 1)):
        snapshot_path(path).write_bytes(bad)
        assert _open_counting_parsed_records(path, monkeypatch)[0] == _trials_of(path)
    assert records > 0


def test_repair_removes_the_snapshot(tmp_path: Path) -> None:
    from kdsearch.storage_faults import repair_journal, snapshot_path

    path = tmp_path / "journal.log"
    _snapshot_study(path, 105)
    with path.open("ab") as fh:
        fh.write(b'{"op_code": 4, "broken\n{"op_code": 0}\n')
    assert repair_journal(path, apply=True).backup is not None
    assert not snapshot_path(path).exists()
    assert len(_trials_of(path)) == 105


def test_a_lock_left_by_a_killed_writer_is_broken_well_inside_the_heartbeat_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The soak: a worker SIGKILLed while it held the journal lock stalled every heartbeat for
    Optuna's 30 s lock grace, and the supervisor failed a live trial as stale (grace 15 s)."""
    import time

    from kdsearch.storage import GRACE_ENV, JOURNAL_LOCK_GRACE_S, journal_lock_grace_s

    assert journal_lock_grace_s() == JOURNAL_LOCK_GRACE_S == 30  # the default journal grace is 60 s
    monkeypatch.setenv(GRACE_ENV, "15")
    assert journal_lock_grace_s() == 3
    path = tmp_path / "journal.log"
    study = _journal_study(path)
    Path(f"{path}.lock").touch()  # what a writer killed inside the lock leaves
    t0 = time.monotonic()
    study.set_user_attr("after", 1)
    waited_s = time.monotonic() - t0
    assert 3 <= waited_s < 7.5, waited_s  # broken after the 3 s lock grace, half the 15 s heartbeat grace
    assert optuna.load_study(storage=open_storage(f"journal:{path}"), study_name="s").user_attrs["after"] == 1


def test_a_second_query_on_the_broken_session_is_transient_too() -> None:
    """The 3,000-trial PostgreSQL soak: during a restart Optuna's ``_get_trials`` met the broken
    connection, ran its second query on the same session, and got SQLAlchemy's
    ``PendingRollbackError``, wrapped in ``StorageInternalError``; taken as permanent, it ended
    the supervisor. A fresh session (the retry) goes through."""
    from kdsearch.storage_faults import is_transient_storage_error

    broken = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("terminating connection due to administrator command"))
    try:
        try:
            raise broken
        except sqlalchemy.exc.OperationalError:
            raise sqlalchemy.exc.PendingRollbackError("Can't reconnect until invalid transaction is rolled back") from None
    except sqlalchemy.exc.PendingRollbackError as pending:
        try:
            raise StorageInternalError("An exception is raised during the commit.") from pending
        except StorageInternalError as exc:
            wrapped = exc
    assert is_transient_storage_error(wrapped)
    data_error = sqlalchemy.exc.DataError("INSERT", {}, Exception("value too long"))
    try:
        raise StorageInternalError("An exception is raised during the commit.") from data_error
    except StorageInternalError as exc:
        assert not is_transient_storage_error(exc)  # bad data stays permanent
