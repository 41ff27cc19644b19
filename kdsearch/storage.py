"""The one door to study storage: URLs, opening, loading, run folders and the artifact store.

Every floor above this one (search, report, export, the dashboard and the commands) reaches a
study through here; this module imports only ``kdsearch.config``, ``kdsearch.errors`` and Optuna.

Storage URLs:

- default: an Optuna ``JournalFileBackend`` file at ``<run_dir>/<study>/journal.log`` (safe for
  several processes on one machine; optuna-dashboard opens it directly);
- ``journal:PATH`` or a bare path: a journal file elsewhere;
- ``sqlite:///PATH``: one process;
- ``postgresql://...`` / ``mysql://...``: Optuna's RDB storage with heartbeats, the distributed
  engine that workers on any number of hosts join.

The run folder of a study (:func:`run_paths`) holds the journal, the artifact store (student
checkpoints) and the workers' status files. The teacher-logit caches and the fitted teachers are
found by their content key, so they live beside the studies, in ``<run_dir>/_cache/`` (a name no
study can take: study names start with a letter or digit), shared by every study of the run
folder: a second study with the same teacher, data and views loads the first one's cache.

Optuna internals: Optuna has no public accessor for a study's storage, and no public way to list
the trials whose RDB heartbeat expired without also failing them before kdsearch can store why.
Those two reaches (:func:`study_storage`, :func:`stale_trial_ids`) are here and nowhere else.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import JournalFileOpenLock
from optuna.trial import FrozenTrial

from kdsearch.config import StudyConfig, validate_storage_url
from kdsearch.errors import ConfigError, StorageError
from kdsearch.rdb_snapshot import is_database_study, snapshot_file
from kdsearch.rdb_snapshot import resume as resume_snapshot
from kdsearch.storage_faults import (
    RETRY_ENV,
    RetryingRDBStorage,
    SafeJournalFileBackend,
    TornJournalError,
    repair_journal,
    retry_transient,
)

__all__ = [
    "SHARED_CACHE_DIR",
    "shared_cache_paths",
    "CacheEntry",
    "list_caches",
    "remove_cache",
    "HEARTBEAT_INTERVAL_S",
    "HEARTBEAT_GRACE_S",
    "INTERVAL_ENV",
    "GRACE_ENV",
    "FAULT_DIR_ENV",
    "RETRY_ENV",
    "RetryingRDBStorage",
    "SafeJournalFileBackend",
    "TornJournalError",
    "repair_journal",
    "retry_transient",
    "RunPaths",
    "run_paths",
    "make_folder",
    "check_study_name",
    "default_storage_url",
    "storage_url_for",
    "resolve_storage_url",
    "redact_url",
    "heartbeat_settings",
    "open_storage",
    "JOURNAL_LOCK_GRACE_S",
    "journal_lock_grace_s",
    "load_study",
    "artifact_store",
    "study_storage",
    "trial_id",
    "heartbeat_interval_s",
    "stale_trial_ids",
]

SHARED_CACHE_DIR = "_cache"  # <run_dir>/_cache: the caches every study of the run folder shares
FITTED_TEACHERS_DIR = "_teachers"  # <cache_dir>/_teachers with --cache-dir (a key folder is hex, never "_...")
HEARTBEAT_INTERVAL_S = 30  # RDB heartbeats: a RUNNING trial whose heartbeat is older than
HEARTBEAT_GRACE_S = 120  # this grace is failed as stale by the next worker that asks.
INTERVAL_ENV = "KDSEARCH_HEARTBEAT_INTERVAL_S"  # whole seconds; override the heartbeat defaults
GRACE_ENV = "KDSEARCH_HEARTBEAT_GRACE_S"  # (e.g. in tests)
FAULT_DIR_ENV = "KDSEARCH_FAULT_DIR"  # test-only: a folder of journal write-fault tokens (the soak)

StaleTrialCallback = Callable[[optuna.Study, FrozenTrial], None]


# ----------------------------------------------------------------------------------------------
# Run folders and URLs


@dataclass(frozen=True)
class RunPaths:
    """The folders of one study's run: storage file, artifacts, workers' files, and the caches
    it uses (``cache``: teacher logits, ``teachers``: fitted teachers; shared by the run folder's
    studies unless ``teacher.cache.dir`` moves the logit caches elsewhere)."""

    root: Path
    journal: Path
    artifacts: Path
    cache: Path
    teachers: Path
    workers: Path

    def ensure(self) -> None:
        """Create every folder; one that cannot be created is a one-line ConfigError."""
        shared = self.root.parent / SHARED_CACHE_DIR / "logits"
        for p in (self.root, self.artifacts, self.cache, self.teachers, self.workers):
            moved = self.cache != shared and p in (self.cache, self.teachers)  # teacher.cache.dir set
            make_folder(p, "teacher.cache.dir" if moved else "study.run_dir")


def make_folder(folder: Path, field: str) -> None:
    """``mkdir -p folder``; a folder that cannot be created (``/proc/...``, read-only, a file in
    the way) is a one-line ConfigError naming ``field``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            field, f"cannot create the folder {str(folder)!r} ({exc.strerror or type(exc).__name__})", None,
            "choose a writable folder",
        ) from None


def shared_cache_paths(run_dir: str | Path) -> tuple[Path, Path]:
    """(teacher-logit caches, fitted teachers) shared by every study of ``run_dir``."""
    base = Path(run_dir) / SHARED_CACHE_DIR
    return base / "logits", base / "teachers"


def run_paths(run_dir: str | Path, study_name: str, cache_dir: str | None = None) -> RunPaths:
    """The run folder layout of ``study_name`` under ``run_dir``. ``cache_dir`` moves the logit
    caches out of the run folder's shared ``_cache/logits``, and the fitted teachers with them
    (``<cache_dir>/_teachers``): a fitted teacher's weights are part of its caches' key."""
    root = Path(run_dir) / study_name
    logits, teachers = shared_cache_paths(run_dir)
    if cache_dir:  # one cache folder for several run folders: the fitted teachers go with it
        logits, teachers = Path(cache_dir), Path(cache_dir) / FITTED_TEACHERS_DIR
    return RunPaths(
        root=root,
        journal=root / "journal.log",
        artifacts=root / "artifacts",
        cache=logits,
        teachers=teachers,
        workers=root / "workers",
    )


# The files of a teacher-logit cache folder (written by kdsearch.distill.teacher_cache, which
# this floor cannot import; a test keeps the names equal).
CACHE_MANIFEST_FILE = "manifest.json"
CACHE_USAGE_FILE = "used_by.json"


@dataclass(frozen=True)
class CacheEntry:
    """One teacher-logit cache folder, as ``kdsearch cache`` lists it (read from its manifest)."""

    key: str  # the full content key (sha256 hex)
    folder: Path
    nbytes: int  # bytes on disk, every file of the folder
    manifest: dict[str, Any]  # empty when the folder holds no finished build
    studies: list[str]  # the studies that built or loaded it (used_by.json)

    @property
    def complete(self) -> bool:
        """A finished build (its manifest is written last)."""
        return bool(self.manifest)

    def describe(self) -> dict[str, Any]:
        """JSON-ready: key, folder, size, what the key is made of, when and how fast it was built."""
        m = self.manifest
        teacher = m.get("teacher") if isinstance(m.get("teacher"), dict) else {}
        return {
            "key": self.key,
            "folder": str(self.folder),
            "nbytes": self.nbytes,
            "complete": self.complete,
            "teacher": teacher.get("label") or teacher.get("name"),
            "teacher_name": teacher.get("name"),
            "weights_sha256": teacher.get("weights_sha256"),
            "dataset": m.get("dataset"),
            "dataset_fingerprint": m.get("dataset_fingerprint"),
            "num_images": m.get("num_images"),
            "views": m.get("views"),
            "topk": m.get("topk"),
            "build_dtype": m.get("build_dtype"),
            "created": m.get("created"),
            "build_time_s": m.get("build_time_s"),
            "studies": list(self.studies),
        }


def list_caches(cache_dir: str | Path) -> list[CacheEntry]:
    """The teacher-logit caches under ``cache_dir``, oldest first (an unfinished build is listed
    with an empty manifest, under its folder name, so it can be removed too)."""
    root = Path(cache_dir)
    if not root.is_dir():
        return []
    out: list[CacheEntry] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")):
        manifest = _read_json(folder / CACHE_MANIFEST_FILE)
        usage = _read_json(folder / CACHE_USAGE_FILE)
        studies = usage.get("studies") if isinstance(usage.get("studies"), dict) else {}
        nbytes = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        key = str(manifest.get("key") or folder.name)
        out.append(CacheEntry(key, folder, nbytes, manifest, sorted(studies)))
    return sorted(out, key=lambda e: (float(e.manifest.get("created_unix") or 0.0), e.folder.name))


def remove_cache(entry: CacheEntry) -> None:
    """Delete one cache folder and its lock file. A study that needs it again rebuilds it."""
    shutil.rmtree(entry.folder)
    Path(str(entry.folder) + ".lock").unlink(missing_ok=True)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_study_name(name: str | None, flag: str = "--study-name") -> None:
    """A study name is also a folder name: 1-128 letters, digits, ``_``, ``.`` or ``-``."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", name or ""):
        raise ConfigError(flag, "must be 1-128 letters, digits, '_', '.' or '-'", name)


def default_storage_url(run_dir: str | Path, study_name: str) -> str:
    """The journal file in the study's run folder."""
    return f"journal:{run_paths(run_dir, study_name).journal}"


def storage_url_for(cfg: StudyConfig) -> str:
    """The storage URL the study uses (the default journal file when none is given)."""
    if cfg.study.storage:
        return cfg.study.storage
    return default_storage_url(cfg.study.run_dir, cfg.study.name)


def resolve_storage_url(storage: str | None, run_dir: str | Path, study_name: str, flag: str = "--storage") -> str:
    """The URL a command reads: ``storage`` validated (errors name ``flag``), else the default."""
    if storage:
        try:
            validate_storage_url(storage)
        except ConfigError as exc:
            raise ConfigError(flag, exc.rule, storage) from None
        return str(storage)
    return default_storage_url(run_dir, study_name)


def redact_url(url: str) -> str:
    """``scheme://user:password@host/db`` -> ``scheme://***@host/db`` (for messages)."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


# ----------------------------------------------------------------------------------------------
# Opening


def heartbeat_settings(default_interval_s: float, default_grace_s: float) -> tuple[int, int]:
    """(interval, grace) in whole seconds: :data:`INTERVAL_ENV` / :data:`GRACE_ENV`, else the defaults.

    Optuna's RDB heartbeats take positive integers; the grace is raised to at least two intervals
    so that one late beat never fails a live trial.
    """
    interval = _env_seconds(INTERVAL_ENV, default_interval_s)
    grace = _env_seconds(GRACE_ENV, default_grace_s)
    return interval, max(grace, 2 * interval)


JOURNAL_LOCK_GRACE_S = 30  # Optuna's own default: a lock file untouched this long is broken


def journal_lock_grace_s() -> int:
    """How long a journal lock file left by a killed process blocks every writer before it is
    broken, s: Optuna's 30 s, or a quarter of a shorter heartbeat grace (:data:`GRACE_ENV`, at
    least 3 s). A worker killed while it holds the lock stalls every heartbeat for this long; were
    it longer than the heartbeat grace, the supervisor would fail the live trials of the other
    workers as stale (the soak saw it at a 15 s grace). An append holds the lock for one write."""
    grace = _env_seconds(GRACE_ENV, 4 * JOURNAL_LOCK_GRACE_S)
    return max(3, min(JOURNAL_LOCK_GRACE_S, grace // 4))


def _env_seconds(name: str, default: float) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return max(int(round(default)), 1)
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(name, "must be a whole number of seconds >= 1", text) from None
    if value < 1:
        raise ConfigError(name, "must be a whole number of seconds >= 1", text)
    return value


def open_storage(
    url: str, *, create: bool = True, stale_trial_callback: StaleTrialCallback | None = None
) -> BaseStorage:
    """Open a storage URL. Journal and sqlite files must exist unless ``create``.

    RDB URLs get Optuna heartbeats (:func:`heartbeat_settings`); ``stale_trial_callback`` is what
    the storage runs for a trial whose heartbeat expired (the search passes its re-queue rule).
    """
    if url.startswith(("postgresql", "mysql", "sqlite:")):
        kwargs: dict[str, Any] = {}
        if not url.startswith("sqlite:"):
            interval_s, grace_s = heartbeat_settings(HEARTBEAT_INTERVAL_S, HEARTBEAT_GRACE_S)
            kwargs = {
                "heartbeat_interval": interval_s,
                "grace_period": grace_s,
                "heartbeat_stale_trial_callback": stale_trial_callback,
            }
        if url.startswith("sqlite:") and not create:
            path = Path(url.removeprefix("sqlite:///"))
            if not path.is_file():
                raise StorageError(f"--storage: no sqlite file at {str(path)!r}; run `kdsearch optimize` first")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                # Database calls retry transient errors (a server restarting), see storage_faults.
                return RetryingRDBStorage(_driver_url(url), engine_kwargs=_engine_kwargs(url), **kwargs)
        except ImportError as exc:
            missing = getattr(exc.__cause__, "name", None) or exc.name or "its driver"
            raise StorageError(
                f"--storage: the database driver for {url.split(':', 1)[0]!r} is not installed "
                f"(no module {missing!r}); pip install 'kdsearch[postgres]'"
            ) from None
        except Exception as exc:  # sqlalchemy raises many types; all mean "cannot open"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StorageError(f"--storage: cannot open {redact_url(url)!r}: {first}") from None
    path = Path(url.removeprefix("journal:"))
    if not create and not path.is_file():
        raise StorageError(
            f"--storage: no study storage at {str(path)!r}; check --run-dir/--study-name or run `kdsearch optimize` first"
        )
    if path.exists() and path.is_dir():
        raise StorageError(f"--storage: {str(path)!r} is a folder, not a journal file")
    make_folder(path.parent, "--run-dir/--storage")
    # The open-lock works on every POSIX file system (NFS included), unlike symlink locks.
    lock = JournalFileOpenLock(str(path), grace_period=journal_lock_grace_s())
    fault_dir = os.environ.get(FAULT_DIR_ENV, "").strip()
    if fault_dir:  # test-only: the soak's transient journal write errors
        return JournalStorage(_FaultyJournalBackend(str(path), lock_obj=lock, fault_dir=fault_dir))
    # Appends land whole or not at all, transient errors are retried, a torn journal is named
    # with its offset and the repair (storage_faults.SafeJournalFileBackend).
    return JournalStorage(SafeJournalFileBackend(str(path), lock_obj=lock))


class _FaultyJournalBackend(SafeJournalFileBackend):
    """A journal file whose next write fails once per token in ``fault_dir`` (:data:`FAULT_DIR_ENV`).

    Test-only, for the soak (``benchmarks/soak.py``): a file named ``journal-write-*`` in that
    folder is one transient write error. The process whose append claims it (removes it; only
    one can: it renames it ``claimed-<name>`` and writes its pid and the failed write there) raises
    :class:`OSError` before writing a byte, as a full or flaky disk would (one try of the append:
    the backend's retry then writes it); a token
    named ``journal-write-heartbeat-*`` is claimed only by a heartbeat write. Nothing else changes.
    """

    def __init__(self, file_path: str, lock_obj: Any, fault_dir: str) -> None:
        super().__init__(file_path, lock_obj=lock_obj)
        self._fault_dir = Path(fault_dir)

    def _append_once(self, data: bytes, logs: list[dict[str, Any]]) -> None:
        heartbeat = any("heartbeat_at" in (log.get("user_attr") or {}) for log in logs)
        try:
            names = sorted(p.name for p in self._fault_dir.iterdir() if p.name.startswith("journal-write-"))
        except OSError:
            names = []
        for name in names:
            if name.startswith("journal-write-heartbeat-") and not heartbeat:
                continue
            claimed = self._fault_dir / f"claimed-{name}"
            try:
                (self._fault_dir / name).rename(claimed)
            except OSError:  # another process claimed it first
                continue
            with contextlib.suppress(OSError):  # who failed which write, for the soak's figures
                claimed.write_text(json.dumps({"pid": os.getpid(), "argv": sys.argv[:3], "writes": [
                    {"op_code": log.get("op_code"), "keys": sorted(log.get("user_attr") or {})} for log in logs]}))
            raise OSError(errno.EIO, f"injected transient journal write error ({FAULT_DIR_ENV} token {name})")
        super()._append_once(data, logs)


def _driver_url(url: str) -> str:
    """``postgresql://`` means SQLAlchemy's psycopg2 dialect; kdsearch's ``postgres`` extra installs
    psycopg 3, so a bare ``postgresql://`` uses it when it is installed."""
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is not None:
        return "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite:"):
        # A dashboard reading while a worker writes: wait for the lock instead of failing at once.
        return {"connect_args": {"timeout": 60}}
    return {"pool_pre_ping": True}


def load_study(storage_url: str, study_name: str, run_dir: str | Path | None = None) -> optuna.Study:
    """Open an existing study for reading (report, trials, export). One-line errors otherwise.

    With ``run_dir``, a database study starts from its trial snapshot in the study's run folder
    (:mod:`kdsearch.rdb_snapshot`): its trials are read at once, only those changed since the
    snapshot from the database, and the snapshot is brought up to date when it lagged by
    :data:`~kdsearch.rdb_snapshot.SAVE_EVERY_TRIALS` or more.
    """
    storage = open_storage(storage_url, create=False)
    names = sorted(optuna.get_all_study_names(storage))  # summaries would deep-copy every trial
    if study_name not in names:
        raise StorageError(
            f"--study-name: no study {study_name!r} in {redact_url(storage_url)!r}; known: {names or 'none'}"
        )
    study = optuna.load_study(study_name=study_name, storage=storage)
    if run_dir is not None and is_database_study(study):
        saver = resume_snapshot(study, snapshot_file(run_paths(run_dir, study_name).root))
        if not saver.covered:
            study.get_trials(deepcopy=False)  # the read every caller makes; the saver counts it
        saver.tick()
    return study


def artifact_store(paths: RunPaths) -> FileSystemArtifactStore:
    """The study's checkpoint store (created if missing)."""
    paths.artifacts.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(paths.artifacts))


# ----------------------------------------------------------------------------------------------
# Trial-level access for recovery (the one place that reaches into Optuna)


def study_storage(study: optuna.Study) -> BaseStorage:
    """The storage behind ``study``.

    Optuna has no public accessor (``Study._storage`` is private), and recovery must write to
    trials that belong to other processes, which only :class:`~optuna.storages.BaseStorage`'s
    public methods can. This and :mod:`kdsearch.rdb_snapshot` (which fills Optuna's trial cache
    behind it) are the only reads of the private attribute in kdsearch.
    """
    return study._storage


def trial_id(study: optuna.Study, number: int) -> int:
    """The storage id of trial ``number`` of ``study`` (public BaseStorage lookups only)."""
    storage = study_storage(study)
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)


def heartbeat_interval_s(study: optuna.Study) -> int | None:
    """The Optuna heartbeat interval (s) of the study's storage; None when it has no heartbeats.

    RDB storages opened by :func:`open_storage` have them (also behind Optuna's cache wrapper);
    journal files and sqlite do not.
    """
    get = getattr(study_storage(study), "get_heartbeat_interval", None)
    return get() if callable(get) else None


def stale_trial_ids(study: optuna.Study) -> list[int]:
    """Storage ids of RUNNING trials whose Optuna heartbeat is older than the grace period.

    Optuna's public ``optuna.storages.fail_stale_trials`` fails these trials first, after which
    they refuse the ``fail_reason`` user attr kdsearch stores; the list itself is only available
    through the storage's private ``_get_stale_trial_ids``. Empty without heartbeats.
    """
    if heartbeat_interval_s(study) is None:
        return []
    storage: Any = study_storage(study)
    return list(storage._get_stale_trial_ids(storage.get_study_id_from_name(study.study_name)))
