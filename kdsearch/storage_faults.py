"""What kdsearch does when its storage fails: transient errors are retried, a journal append lands
whole or not at all, and a journal torn by an older version is named, not half-read.

* **Transient errors** (:func:`is_transient_storage_error`): an ``OSError`` of a full or flaky disk
  on the journal (``ENOSPC``, ``EIO``, ``ESTALE``, ...), and SQLAlchemy's ``OperationalError`` /
  ``DisconnectionError`` (also wrapped in Optuna's ``StorageInternalError``) while a database
  restarts or drops connections. :func:`retry_transient` retries a call with a doubling backoff
  (:data:`RETRY_FIRST_S`, at most :data:`RETRY_MAX_WAIT_S` between tries), logs one warning when
  an incident starts and one when it ends, and gives up with a one-line :class:`StorageError`
  after :func:`storage_retry_s` seconds (``KDSEARCH_STORAGE_RETRY_S``, default
  :data:`STORAGE_RETRY_S`). Anything else (a missing trial, a duplicate key, a finished trial, a
  permission error) is raised at once.
* **Where the retry sits**: below Optuna, so that every storage call of the supervisor, the workers
  and a trial's own ``set_user_attr`` is covered without a wrapper at each call site.
  :class:`SafeJournalFileBackend` retries one journal append (which, being all-or-nothing, cannot
  land twice) and one read; :class:`RetryingRDBStorage` retries one database call. A tell whose
  commit may have landed before the connection broke is read back before it is repeated: a
  trial already in the told state is not told again.
* **Journal appends are all-or-nothing.** Optuna's ``JournalFileBackend`` writes a record with
  one buffered write; a full disk cuts it, the next record is glued to the half line, and every
  later read fails. :class:`SafeJournalFileBackend` appends under Optuna's own file lock, and on an
  error truncates the file back to its length before the write. A line left unfinished at the end
  by a writer that died mid-write (no newline: no reader ever took it for a record) is dropped
  before the next append.
* **A torn journal** (a broken record followed by others, left by an older version) is reported
  as :class:`TornJournalError`, naming the file, the byte offset and ``kdsearch repair``, which
  truncates the journal there after a backup (:func:`repair_journal`). Truncation is the
  consistent repair: every process stopped reading at the torn record, so every write after it
  was refused to its writer.

* **Journal snapshots** (Optuna's ``BaseJournalSnapshot``, which its Redis backend implements):
  every 100th trial, the process that creates it saves Optuna's replayed state to
  ``<journal>.snapshot``, and opening the study starts from the newest snapshot instead of
  replaying every record (at 3,000 trials, about 1.4 s of the 2 s an open took). A snapshot names
  the record it stops at, its byte offset, a hash of the journal bytes just before that offset and
  the Optuna version; one that does not match the journal (cut by ``kdsearch repair``, written by
  another version, damaged) is ignored and the journal replayed whole, so a snapshot can only
  make an open faster, never different.

Floor 4, beside :mod:`kdsearch.storage`, which opens the storages through these classes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import optuna
from optuna.exceptions import StorageInternalError
from optuna.storages import RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.storages.journal._base import BaseJournalSnapshot  # where Optuna's Redis backend takes it from
from optuna.trial import TrialState

from kdsearch.errors import ConfigError, StorageError

__all__ = [
    "RETRY_ENV",
    "STORAGE_RETRY_S",
    "RETRY_FIRST_S",
    "RETRY_MAX_WAIT_S",
    "TransientRetry",
    "backoff_s",
    "TornJournalError",
    "SafeJournalFileBackend",
    "RetryingRDBStorage",
    "JournalRepair",
    "is_transient_storage_error",
    "retry_transient",
    "storage_retry_s",
    "find_torn_record",
    "repair_journal",
    "snapshot_path",
]

STORAGE_RETRY_S = 120.0  # how long a storage call is retried before the run gives up
RETRY_ENV = "KDSEARCH_STORAGE_RETRY_S"  # seconds; overrides STORAGE_RETRY_S (e.g. in tests)
RETRY_FIRST_S = 0.25  # the first retry comes this soon, then twice as late each time
RETRY_MAX_WAIT_S = 5.0  # ... but never later than this after the previous try

# OSError numbers a full, busy or flaky disk (or network file system) gives, that go away by
# themselves. EACCES, EROFS, ENOENT, EFBIG (a file-size limit) and the like are raised at once.
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EIO", "EAGAIN", "EINTR", "EBUSY", "ESTALE",
                                      "ETIMEDOUT", "ENOLCK") if hasattr(errno, name)
)

_log = logging.getLogger("kdsearch.storage")
T = TypeVar("T")


def storage_retry_s() -> float:
    """Seconds a storage call is retried: ``KDSEARCH_STORAGE_RETRY_S``, else :data:`STORAGE_RETRY_S`."""
    text = os.environ.get(RETRY_ENV, "").strip()
    if not text:
        return STORAGE_RETRY_S
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(RETRY_ENV, "must be a number of seconds >= 0", text) from None
    if not value >= 0:
        raise ConfigError(RETRY_ENV, "must be a number of seconds >= 0", text)
    return value


def backoff_s(failures_in_row: int, first_s: float, cap_s: float) -> float:
    """The wait before the next try after ``failures_in_row`` failed ones: ``first_s``, twice as
    long after each further failure, never more than ``cap_s`` (0 after none). The one schedule
    of kdsearch's storage retries: :class:`TransientRetry` and the trial heartbeat's beats
    (:class:`kdsearch.search.recovery.TrialHeartbeat`)."""
    if failures_in_row <= 0:
        return 0.0
    return min(first_s * 2 ** (failures_in_row - 1), cap_s)


def is_transient_storage_error(exc: BaseException) -> bool:
    """True for an error that a retry a little later may not meet: a full or flaky disk under the
    journal, or a database connection that broke or could not be made (the server restarting).

    Optuna's RDB storage wraps SQLAlchemy's errors in ``StorageInternalError``; the cause (or the
    error being handled when it was raised) decides.
    A ``StorageInternalError`` of any other cause (bad data) and SQLAlchemy's ``IntegrityError``
    are not transient.
    """
    if isinstance(exc, StorageError):
        return False
    if isinstance(exc, OSError):
        return exc.errno in _TRANSIENT_ERRNOS
    sa_exc = sys.modules.get("sqlalchemy.exc")  # no SQLAlchemy error exists unless it was loaded
    if sa_exc is None:
        return False
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 5:
        if isinstance(cur, sa_exc.IntegrityError):
            return False
        # PendingRollbackError: a query of the same session after the connection broke (Optuna's
        # _get_trials runs a second query when the first fails); a fresh session goes through.
        if isinstance(cur, (sa_exc.OperationalError, sa_exc.DisconnectionError, sa_exc.TimeoutError,
                            sa_exc.PendingRollbackError)):
            return True
        if isinstance(cur, sa_exc.DBAPIError) and cur.connection_invalidated:
            return True
        cur, seen = cur.__cause__ or cur.__context__, seen + 1
    return False


def _first_line(exc: BaseException) -> str:
    # Optuna's StorageInternalError says only "during the commit": the database's own error is its cause.
    cause = exc.__cause__ if isinstance(exc, StorageInternalError) and exc.__cause__ is not None else exc
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return f"{type(cause).__name__}: {text[:300]}"


class TransientRetry:
    """The backoff of one incident: call :meth:`failed` with each error (it sleeps, or raises),
    :meth:`succeeded` when a try gets through. :func:`retry_transient` is the usual way in; a
    generator that must resume where it stopped (a journal read) uses the object directly."""

    def __init__(self, what: str, *, total_s: float | None = None, first_s: float = RETRY_FIRST_S,
                 max_wait_s: float = RETRY_MAX_WAIT_S) -> None:
        self.what = what
        self.total_s = storage_retry_s() if total_s is None else total_s
        self.failures = 0
        self._first_s = first_s
        self._max_wait_s = max_wait_s
        self._start: float | None = None

    def failed(self, exc: Exception) -> None:
        """Sleep before the next try; re-raise ``exc`` when it is not transient, or a
        :class:`StorageError` when the incident has lasted :attr:`total_s`."""
        if not is_transient_storage_error(exc):
            raise exc
        now = time.monotonic()
        if self._start is None:
            self._start = now
            _log.warning("storage: %s failed (%s); retrying for up to %g s", self.what, _first_line(exc), self.total_s)
        self.failures += 1
        elapsed = now - self._start
        wait_s = backoff_s(self.failures, self._first_s, self._max_wait_s)
        if elapsed + wait_s > self.total_s:
            raise StorageError(
                f"storage unreachable: {self.what} failed for {elapsed:.1f} s ({self.failures} tries, limit "
                f"{self.total_s:g} s, {RETRY_ENV}); last error {_first_line(exc)}; check the disk or the "
                "database, then run the same command again to resume"
            ) from exc
        time.sleep(wait_s)

    def succeeded(self) -> None:
        if self.failures:
            elapsed = time.monotonic() - (self._start or time.monotonic())
            _log.warning("storage: %s went through after %d failed tries (%.1f s)", self.what, self.failures, elapsed)


def retry_transient(call: Callable[[], T], what: str, *, total_s: float | None = None,
                    first_s: float = RETRY_FIRST_S, max_wait_s: float = RETRY_MAX_WAIT_S) -> T:
    """``call()``, retried while it raises a transient storage error (see the module docstring).

    ``what`` names the call in the log and in the error (``"writing the journal ..."``).
    ``call`` must be safe to repeat after a failed try: the classes below make it so.
    """
    retry = TransientRetry(what, total_s=total_s, first_s=first_s, max_wait_s=max_wait_s)
    while True:
        try:
            out = call()
        except Exception as exc:  # noqa: BLE001 - failed() re-raises what is not transient
            retry.failed(exc)
            continue
        retry.succeeded()
        return out


# ----------------------------------------------------------------------------------------------
# The journal file


class TornJournalError(StorageError):
    """A journal with a broken record followed by others: Optuna cannot read past it."""

    def __init__(self, path: str | Path, offset: int, line: int) -> None:
        self.path, self.offset, self.line = str(path), offset, line
        super().__init__(
            f"--storage: the journal {str(path)!r} has a torn record at byte {offset} (line {line}), "
            "left by a write cut short (a full disk or a crash); run `kdsearch repair --storage "
            f"{path} --yes` to cut the journal there (it keeps a backup; the trials stored before "
            "stay, a trial running then is re-run)"
        )


def find_torn_record(path: str | Path) -> tuple[int, int] | None:
    """(byte offset, 1-based line) of the journal's first line that is not a whole JSON record,
    an unfinished last line included; None when every line is whole."""
    offset = 0
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, start=1):
            try:
                whole = line.endswith(b"\n") and isinstance(json.loads(line), dict)
            except ValueError:
                whole = False
            if not whole:
                return offset, number
            offset += len(line)
    return None


SNAPSHOT_SUFFIX = ".snapshot"
_SNAPSHOT_TAIL_BYTES = 4096  # the journal bytes before a snapshot's offset that its hash covers


def snapshot_path(journal: str | Path) -> Path:
    """Where the journal's snapshot lives: ``<journal>.snapshot``, beside it."""
    journal = Path(journal)
    return journal.with_name(journal.name + SNAPSHOT_SUFFIX)


def _tail_sha256(fd: int, offset: int) -> str:
    start = max(0, offset - _SNAPSHOT_TAIL_BYTES)
    return hashlib.sha256(os.pread(fd, offset - start, start)).hexdigest()


class SafeJournalFileBackend(JournalFileBackend, BaseJournalSnapshot):
    """Optuna's journal file, with appends that land whole or not at all, transient errors retried,
    a torn record reported as :class:`TornJournalError`, and snapshots of the replayed state (see
    the module docstring).

    The lock is Optuna's (``JournalFileOpenLock``, passed in), the same every writer of the file
    takes, so the length read before a write is the length to go back to.
    """

    def __init__(self, file_path: str, lock_obj: JournalFileOpenLock) -> None:
        super().__init__(file_path, lock_obj=lock_obj)
        self._append_lock = lock_obj
        self._read_through = 0  # records read by the last read_logs that ran to the end

    def save_snapshot(self, snapshot: bytes) -> None:
        """Save Optuna's pickled replay state, taken right after it read every record up to
        :attr:`_read_through` (``JournalStorage`` syncs, then snapshots, under its lock). Written to
        a temporary file and renamed, so a reader sees the old snapshot or the new one. A snapshot
        that cannot be written is skipped: it only makes later opens faster."""
        n = self._read_through
        offset = self._log_number_offset.get(n)
        if n == 0 or offset is None:
            return
        target = snapshot_path(self._file_path)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(self._file_path, os.O_RDONLY)
            try:
                tail = _tail_sha256(fd, offset)
            finally:
                os.close(fd)
            header = {"optuna": optuna.__version__, "records": n, "offset": offset, "tail_sha256": tail,
                      "snapshot_sha256": hashlib.sha256(snapshot).hexdigest()}
            tmp.write_bytes(json.dumps(header).encode() + b"\n" + snapshot)
            os.replace(tmp, target)
        except OSError as exc:
            _log.warning("storage: could not save the journal snapshot %s (%s); opens replay the journal", target, exc)
            tmp.unlink(missing_ok=True)

    def load_snapshot(self) -> bytes | None:
        """The saved replay state, if it still describes the start of this journal (see the module
        docstring); else None, and Optuna replays the journal whole. A usable snapshot also tells
        the reader where its record starts, so the records before it are not even scanned."""
        target = snapshot_path(self._file_path)
        try:
            data = target.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            _log.warning("storage: could not read the journal snapshot %s (%s); replaying the journal", target, exc)
            return None
        why = self._snapshot_mismatch(data)
        if why is not None:
            _log.info("storage: journal snapshot %s not used (%s); replaying the journal", target, why)
            return None
        header_end = data.index(b"\n")
        header = json.loads(data[:header_end])
        self._log_number_offset[int(header["records"])] = int(header["offset"])
        return data[header_end + 1:]

    def _snapshot_mismatch(self, data: bytes) -> str | None:
        """Why ``data`` (a snapshot file) must not be used for this journal, or None."""
        try:
            header_end = data.index(b"\n")
            header = json.loads(data[:header_end])
            records, offset = int(header["records"]), int(header["offset"])
        except (ValueError, KeyError, TypeError):
            return "no readable header"
        if header.get("optuna") != optuna.__version__:
            return f"written by Optuna {header.get('optuna')}, this is {optuna.__version__}"
        if hashlib.sha256(data[header_end + 1:]).hexdigest() != header.get("snapshot_sha256"):
            return "damaged"
        fd = os.open(self._file_path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if records <= 0 or not 0 < offset <= size or os.pread(fd, 1, offset - 1) != b"\n":
                return f"it ends at byte {offset}, which is not a record boundary of the journal ({size} bytes)"
            if _tail_sha256(fd, offset) != header.get("tail_sha256"):
                return "the journal before its end changed (cut and written again)"
        finally:
            os.close(fd)
        return None

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode("utf-8")
        retry_transient(lambda: self._append_once(data, logs), f"writing the journal {self._file_path}")

    def _append_once(self, data: bytes, logs: list[dict[str, Any]]) -> None:
        """One try: under the lock, drop an unfinished tail, write, and cut back on an error."""
        self._append_lock.acquire()
        try:
            fd = os.open(self._file_path, os.O_RDWR | os.O_APPEND)
            try:
                size = self._drop_unfinished_tail(fd, os.fstat(fd).st_size)
                try:
                    written = 0
                    while written < len(data):
                        written += os.write(fd, data[written:])
                except BaseException:
                    try:
                        os.ftruncate(fd, size)
                    except OSError as cut:  # the next append drops the unfinished line anyway
                        _log.warning("storage: could not cut the journal %s back to %d bytes (%s)",
                                     self._file_path, size, cut)
                    raise
                try:
                    os.fsync(fd)
                except OSError as exc:
                    # The whole record is in the file, and other processes may have read it: cutting
                    # it now would undo it for them, raising would get it written twice.
                    _log.warning("storage: fsync of the journal %s failed (%s); the record stays", self._file_path, exc)
            finally:
                os.close(fd)
        finally:
            self._append_lock.release()

    def _drop_unfinished_tail(self, fd: int, size: int) -> int:
        """The length to append at: ``size``, less an unfinished last line (a writer died in it).
        A finished last line that is not JSON (a torn journal) raises :class:`TornJournalError`."""
        if size == 0:
            return 0
        if os.pread(fd, 1, size - 1) == b"\n":
            start = self._line_start(fd, size - 1)
            try:
                json.loads(os.pread(fd, size - start, start))
            except ValueError:
                where = find_torn_record(self._file_path)
                raise TornJournalError(self._file_path, *(where or (start, 0))) from None
            return size
        start = self._line_start(fd, size)
        os.ftruncate(fd, start)
        _log.warning("storage: dropped an unfinished record of %d bytes at byte %d of the journal %s "
                     "(a writer stopped in the middle of it)", size - start, start, self._file_path)
        return start

    @staticmethod
    def _line_start(fd: int, end: int) -> int:
        """Offset just after the last newline before ``end`` (0 when there is none)."""
        pos = end
        while pos > 0:
            chunk_start = max(0, pos - 65536)
            chunk = os.pread(fd, pos - chunk_start, chunk_start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                return chunk_start + i + 1
            pos = chunk_start
        return 0

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        retry = TransientRetry(f"reading the journal {self._file_path}")
        n = log_number_from
        while True:
            try:
                for log in super().read_logs(n):
                    n += 1
                    yield log
            except ValueError:  # json.JSONDecodeError or Optuna's "Invalid log format": a torn record
                where = find_torn_record(self._file_path)
                if where is None:
                    raise
                raise TornJournalError(self._file_path, *where) from None
            except Exception as exc:  # noqa: BLE001 - failed() re-raises what is not transient
                retry.failed(exc)  # resumes at record n: the records yielded are not yielded again
                continue
            retry.succeeded()
            self._read_through = n
            return


@dataclass(frozen=True)
class JournalRepair:
    """What :func:`repair_journal` found and did."""

    path: Path
    offset: int | None  # where the journal was (or would be) cut; None: nothing to repair
    line: int | None
    dropped_bytes: int
    backup: Path | None  # the copy of the journal as it was (None when nothing was changed)


def repair_journal(path: str | Path, *, apply: bool) -> JournalRepair:
    """Cut the journal at its first torn record, after copying it to ``<journal>.torn-<time>``.

    With ``apply`` False it only says what it would do. Run it while no process writes the study
    (``kdsearch optimize`` stopped): the lock keeps a writer out during the cut, but a running
    process would have read past the cut point.
    """
    path = Path(path)
    lock = JournalFileOpenLock(str(path))
    lock.acquire()
    try:
        where = find_torn_record(path)
        size = path.stat().st_size
        if where is None:
            return JournalRepair(path, None, None, 0, None)
        offset, line = where
        if not apply:
            return JournalRepair(path, offset, line, size - offset, None)
        backup = path.with_name(f"{path.name}.torn-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
        shutil.copy2(path, backup)
        os.truncate(path, offset)
        snapshot_path(path).unlink(missing_ok=True)  # it may describe records past the cut
        return JournalRepair(path, offset, line, size - offset, backup)
    finally:
        lock.release()


# ----------------------------------------------------------------------------------------------
# The database

# The RDBStorage methods that talk to the database, the private ones included: Optuna's cache
# wrapper (_CachedStorage, which Optuna puts around every RDBStorage) calls those.
_RDB_CALLS = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
    "get_study_system_attrs", "get_all_studies", "create_new_trial", "_create_new_trial", "set_trial_param",
    "_set_trial_param", "get_trial_param", "get_trial_id_from_study_id_trial_number", "get_trial_number_from_id",
    "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr", "get_trial",
    "get_all_trials", "_get_trials", "get_n_trials", "get_best_trial", "_get_best_trial_id",
    "get_trial_params", "get_trial_user_attrs", "get_trial_system_attrs", "record_heartbeat",
    "_get_stale_trial_ids",
)


class RetryingRDBStorage(RDBStorage):
    """Optuna's RDB storage whose database calls are retried on transient errors.

    One call is one transaction, retried whole; a call made inside another (``create_new_trial``
    calls ``_create_new_trial``) is retried by the outer one only. ``set_trial_state_values`` to a
    finished state (a tell) reads the trial back before a retry: when the earlier try's commit
    landed and only its answer was lost, the trial is already in that state and is not told
    again. A re-queued trial whose claim landed unseen (``RUNNING``) is lost to its worker and
    recovered like a worker that died before its first heartbeat
    (:func:`kdsearch.search.recovery.recover_stale`); a trial created twice the same way too.
    """

    _depth = threading.local()

    def _retried(self, name: str, call: Callable[[], T]) -> T:
        depth = getattr(self._depth, "n", 0)
        if depth:
            return call()
        self._depth.n = 1
        try:
            return retry_transient(call, f"the database call {name}")
        finally:
            self._depth.n = 0

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Any = None) -> bool:
        tries = 0

        def once() -> bool:
            nonlocal tries
            tries += 1
            if tries > 1 and state.is_finished():
                stored = RDBStorage.get_trial(self, trial_id)
                if stored.state == state and (values is None or list(stored.values or []) == list(values)):
                    _log.warning("storage: trial %d was already stored %s; not told again", stored.number, state.name)
                    return True
            return RDBStorage.set_trial_state_values(self, trial_id, state, values)

        return self._retried("set_trial_state_values", once)


def _retrying(name: str) -> Callable[..., Any]:
    def method(self: RetryingRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return self._retried(name, lambda: getattr(super(RetryingRDBStorage, self), name)(*args, **kwargs))

    method.__name__ = name
    method.__doc__ = f"``RDBStorage.{name}``, retried on transient errors."
    return method


for _name in _RDB_CALLS:
    if hasattr(RDBStorage, _name):
        setattr(RetryingRDBStorage, _name, _retrying(_name))
del _name
