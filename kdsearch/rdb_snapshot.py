"""Snapshots of a database study's finished trials, so that opening it reads only what changed.

Optuna's RDB storage rebuilds every trial from its rows on each open: one SQLAlchemy object per
parameter, value, attribute and intermediate value. A soaked 3,000-trial PostgreSQL study holds
about 40 rows per trial, and `kdsearch trials --pareto` spent most of its 7 s there
(benchmarks/RESULTS.md, issue 19). Within one process Optuna already avoids the re-read: its
``_CachedStorage`` keeps the finished trials (which never change again) and asks the database only
for the unfinished ones and those created since. This module keeps that cache across processes:

* :func:`save` writes the finished trials the process's cache holds to
  ``<run_dir>/<study>/rdb-trials.snapshot`` (a JSON header line, then the pickled trials; written
  to a temporary file and renamed, so a reader sees the old file or the new one). The supervisor
  saves every :data:`SAVE_EVERY_TRIALS` newly finished trials and when it stops; a command that
  read that many trials past the snapshot saves too.
* :func:`restore` puts them back into a freshly loaded study's cache, so its first
  ``get_trials`` asks the database for the rest only (Optuna's own delta query).

A snapshot is used only for the study it was written for: the same Optuna version, the same
database (the URL's sha256; no password is written), the same study id and name, its first and
last trials as the database holds them (a study deleted and made again can get its id back);
and after the first read the trial numbers must run 0..n-1 with no gap (a trial committed late with a lower id
than one already read would leave one). Otherwise it is ignored and the study is read whole; a
snapshot can only make an open faster, never change what it reads. Journal studies have their
own snapshot (:mod:`kdsearch.storage_faults`); SQLite files are databases too and get this one.

Like the journal snapshot this reads Optuna internals (``_CachedStorage`` and its per-study
info); if a future Optuna changes them, :func:`restore` and :func:`save` do nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.storages._cached_storage import _CachedStorage, _StudyInfo
from optuna.trial import FrozenTrial

_log = logging.getLogger("kdsearch.storage")

SNAPSHOT_FILE = "rdb-trials.snapshot"
SAVE_EVERY_TRIALS = 100  # newly finished trials between two saves (the journal snapshot's step)
FORMAT = 1

__all__ = ["SAVE_EVERY_TRIALS", "SNAPSHOT_FILE", "SnapshotSaver", "is_database_study", "restore", "resume", "save", "snapshot_file"]


def snapshot_file(study_dir: str | Path) -> Path:
    """The snapshot of the study whose run folder is ``study_dir`` (``<run_dir>/<study>``)."""
    return Path(study_dir) / SNAPSHOT_FILE


def _cache_of(study: optuna.Study) -> tuple[_CachedStorage, int] | None:
    """Optuna's trial cache behind ``study`` and the study's id, or None (not a database study,
    or an Optuna whose cache looks different)."""
    storage: BaseStorage = study._storage  # no public accessor; see kdsearch.storage.study_storage
    if not isinstance(storage, _CachedStorage) or not isinstance(getattr(storage, "_studies", None), dict):
        return None
    backend = getattr(storage, "_backend", None)
    if not isinstance(getattr(backend, "url", None), str):
        return None
    # The study's id as it loaded (private too; asking the storage by name would be a database
    # query at every supervisor poll).
    return storage, study._study_id


def is_database_study(study: optuna.Study) -> bool:
    """Whether ``study`` lives in a database behind Optuna's trial cache (what a snapshot serves)."""
    return _cache_of(study) is not None


def _key(storage: _CachedStorage, study_id: int, study_name: str) -> dict[str, Any]:
    url: str = storage._backend.url
    return {"format": FORMAT, "optuna": optuna.__version__, "url_sha256": hashlib.sha256(url.encode()).hexdigest(),
            "study_id": study_id, "study_name": study_name}


def save(study: optuna.Study, path: Path) -> int | None:
    """Write the finished trials that ``study``'s cache holds to ``path``; return how many, or
    None when there is nothing to write (not a database study, no finished trial) or the write
    failed (logged: a snapshot only makes later opens faster)."""
    found = _cache_of(study)
    if found is None:
        return None
    storage, study_id = found
    with storage._lock:
        info = storage._studies.get(study_id)
        if info is None:
            return None
        last = info.last_finished_trial_id
        finished = [t for t in info.trials.values() if t.state.is_finished() and t._trial_id <= last]
        unfinished = sorted(t._trial_id for t in info.trials.values() if t._trial_id <= last and not t.state.is_finished())
    if not finished:
        return None
    payload = pickle.dumps(sorted(finished, key=lambda t: t.number), protocol=pickle.HIGHEST_PROTOCOL)
    header = {**_key(storage, study_id, study.study_name), "trials": len(finished), "last_finished_trial_id": last,
              "unfinished_trial_ids": unfinished, "saved_at": time.time(),
              "payload_sha256": hashlib.sha256(payload).hexdigest()}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(json.dumps(header).encode() + b"\n" + payload)
        os.replace(tmp, path)
    except OSError as exc:
        _log.warning("storage: could not save the trial snapshot %s (%s); opens read every trial", path, exc)
        tmp.unlink(missing_ok=True)
        return None
    return len(finished)


def _read(path: Path, key: dict[str, Any]) -> tuple[dict[str, Any], list[FrozenTrial]] | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        _log.warning("storage: could not read the trial snapshot %s (%s); reading every trial", path, exc)
        return None
    try:
        end = data.index(b"\n")
        header = json.loads(data[:end])
    except ValueError:
        why: str | None = "no readable header"
    else:
        why = next((f"{k} {header.get(k)!r}, not {v!r}" for k, v in key.items() if header.get(k) != v), None)
        if why is None and hashlib.sha256(data[end + 1:]).hexdigest() != header.get("payload_sha256"):
            why = "damaged"
    if why is not None:
        _log.info("storage: trial snapshot %s not used (%s); reading every trial", path, why)
        return None
    try:
        trials = pickle.loads(data[end + 1:])
    except Exception as exc:  # an unpicklable payload of a matching header: a different Optuna build
        _log.info("storage: trial snapshot %s not used (%s); reading every trial", path, exc)
        return None
    return header, trials


def _unlike_database(storage: _CachedStorage, trials: list[FrozenTrial]) -> str | None:
    """Why the snapshot's first and last trials are not the database's (a study deleted and made
    again under the same name can get the same study id back, as SQLite gives), or None."""
    if not trials:
        return "no trials"
    for t in {trials[0]._trial_id: trials[0], trials[-1]._trial_id: trials[-1]}.values():
        try:
            stored = storage._backend.get_trial(t._trial_id)
        except KeyError:
            return f"trial id {t._trial_id} is not in the database"
        if (stored.number, stored.state, stored.datetime_start, stored.datetime_complete) != (
                t.number, t.state, t.datetime_start, t.datetime_complete):
            return f"trial {t.number} differs from the database's"
    return None


def restore(study: optuna.Study, path: Path) -> int:
    """Fill ``study``'s (still empty) trial cache from the snapshot at ``path`` and check it
    against the database (one read of the trials changed since, which a caller would make anyway);
    return the number of trials restored, 0 when none was used."""
    found = _cache_of(study)
    if found is None:
        return 0
    storage, study_id = found
    read = _read(path, _key(storage, study_id, study.study_name))
    if read is None:
        return 0
    header, trials = read
    why = _unlike_database(storage, trials)
    if why is not None:
        _log.info("storage: trial snapshot %s not used (%s); reading every trial", path, why)
        return 0
    with storage._lock:
        # Loading a study caches its directions only; trials already read leave nothing to gain.
        info = storage._studies.setdefault(study_id, _StudyInfo())
        if info.trials or info.unfinished_trial_ids or info.last_finished_trial_id != -1:
            return 0
        info.last_finished_trial_id = int(header["last_finished_trial_id"])
        info.unfinished_trial_ids = {int(i) for i in header["unfinished_trial_ids"]}
        for t in trials:
            info.trials[t.number] = t
            storage._trial_id_to_study_id_and_number[t._trial_id] = (study_id, t.number)
            storage._study_id_and_number_to_trial_id[(study_id, t.number)] = t._trial_id
    numbers = [t.number for t in study.get_trials(deepcopy=False)]
    if numbers != list(range(len(numbers))):
        _log.info("storage: trial snapshot %s not used (trial numbers have a gap after it); reading every trial", path)
        with storage._lock:
            for t in info.trials.values():
                storage._trial_id_to_study_id_and_number.pop(t._trial_id, None)
                storage._study_id_and_number_to_trial_id.pop((study_id, t.number), None)
            info.trials, info.unfinished_trial_ids, info.last_finished_trial_id = {}, set(), -1
        return 0
    return len(trials)


class SnapshotSaver:
    """Saves ``study``'s snapshot at ``path`` whenever at least :data:`SAVE_EVERY_TRIALS` more
    trials finished than the last save (or the restore) covered; :meth:`tick` is cheap otherwise."""

    def __init__(self, study: optuna.Study, path: Path, covered: int = 0) -> None:
        self.study, self.path, self.covered = study, path, covered

    def finished_in_cache(self) -> int:
        found = _cache_of(self.study)
        if found is None:
            return 0
        storage, study_id = found
        info = storage._studies.get(study_id)
        return 0 if info is None else sum(t.state.is_finished() for t in info.trials.values())

    def tick(self, force: bool = False) -> int | None:
        """Save if due (or ``force`` and anything new); return the trials saved, else None."""
        if _cache_of(self.study) is None:
            return None
        n = self.finished_in_cache()
        if n - self.covered < (1 if force else SAVE_EVERY_TRIALS):
            return None
        saved = save(self.study, self.path)
        if saved is not None:
            self.covered = saved
        return saved


def resume(study: optuna.Study, path: Path) -> SnapshotSaver:
    """Restore ``study``'s snapshot at ``path`` (:func:`restore`) and return the saver that keeps
    it current from there (the supervisor's and the commands' start)."""
    return SnapshotSaver(study, path, covered=restore(study, path))
