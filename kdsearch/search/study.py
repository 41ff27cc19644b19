"""Study storage, sampler and resume rules.

Storage:
- default: an Optuna ``JournalFileBackend`` file at ``<run_dir>/<study>/journal.log`` (safe for
  several processes on one machine; optuna-dashboard opens it directly);
- ``journal:PATH`` or a bare path: a journal file elsewhere;
- ``sqlite:///PATH``: one process;
- ``postgresql://...`` / ``mysql://...``: Optuna's RDB storage with heartbeats, the distributed
  engine that workers on any number of hosts join.

Re-running a study resumes it. It never silently starts a new one: a stored study whose search
signature (space, objectives, constraints, data, teachers, time box) differs is an error naming the
difference.
"""

from __future__ import annotations

import json
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

from kdsearch import __version__
from kdsearch.config import StudyConfig, config_to_dict
from kdsearch.errors import ConfigError, StorageError, StudyMismatchError
from kdsearch.search.recovery import heartbeat_settings, stale_trial_callback
from kdsearch.search.space import grid_search_space

__all__ = [
    "RunPaths",
    "run_paths",
    "open_storage",
    "make_sampler",
    "create_or_resume",
    "load_study",
    "add_time_spent",
    "signature_diff",
    "HEARTBEAT_INTERVAL_S",
    "HEARTBEAT_GRACE_S",
]

HEARTBEAT_INTERVAL_S = 30  # RDB heartbeats: a RUNNING trial whose heartbeat is older than
HEARTBEAT_GRACE_S = 120  # this grace is failed as stale by the next worker that asks.
# Both can be overridden with KDSEARCH_HEARTBEAT_INTERVAL_S / KDSEARCH_HEARTBEAT_GRACE_S.


@dataclass(frozen=True)
class RunPaths:
    """The folders of one study's run: storage file, artifacts, caches, fitted teachers."""

    root: Path
    journal: Path
    artifacts: Path
    cache: Path
    teachers: Path
    workers: Path

    def ensure(self) -> None:
        for p in (self.root, self.artifacts, self.cache, self.teachers, self.workers):
            p.mkdir(parents=True, exist_ok=True)


def run_paths(run_dir: str | Path, study_name: str, cache_dir: str | None = None) -> RunPaths:
    root = Path(run_dir) / study_name
    return RunPaths(
        root=root,
        journal=root / "journal.log",
        artifacts=root / "artifacts",
        cache=Path(cache_dir) if cache_dir else root / "cache",
        teachers=root / "teachers",
        workers=root / "workers",
    )


def storage_url_for(cfg: StudyConfig) -> str:
    """The storage URL the study uses (the default journal file when none is given)."""
    if cfg.study.storage:
        return cfg.study.storage
    return f"journal:{run_paths(cfg.study.run_dir, cfg.study.name).journal}"


def open_storage(url: str, *, create: bool = True, max_retry: int = 1) -> BaseStorage:
    """Open a storage URL. Journal paths must exist unless ``create``; RDB gets heartbeats."""
    if url.startswith(("postgresql", "mysql", "sqlite:")):
        kwargs: dict[str, Any] = {}
        if not url.startswith("sqlite:"):
            interval_s, grace_s = heartbeat_settings(HEARTBEAT_INTERVAL_S, HEARTBEAT_GRACE_S)
            kwargs = {
                "heartbeat_interval": interval_s,
                "grace_period": grace_s,
                "heartbeat_stale_trial_callback": stale_trial_callback(max_retry),
            }
        if url.startswith("sqlite:") and not create:
            path = Path(url.removeprefix("sqlite:///"))
            if not path.is_file():
                raise StorageError(f"--storage: no sqlite file at {str(path)!r}; run `kdsearch optimize` first")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(_driver_url(url), engine_kwargs=_engine_kwargs(url), **kwargs)
        except ImportError as exc:
            missing = getattr(exc.__cause__, "name", None) or exc.name or "its driver"
            raise StorageError(
                f"--storage: the database driver for {url.split(':', 1)[0]!r} is not installed "
                f"(no module {missing!r}); pip install 'kdsearch[postgres]'"
            ) from None
        except Exception as exc:  # sqlalchemy raises many types; all mean "cannot open"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StorageError(f"--storage: cannot open {_redact(url)!r}: {first}") from None
    path = Path(url.removeprefix("journal:"))
    if not create and not path.is_file():
        raise StorageError(
            f"--storage: no study storage at {str(path)!r}; check --run-dir/--study-name or run `kdsearch optimize` first"
        )
    if path.exists() and path.is_dir():
        raise StorageError(f"--storage: {str(path)!r} is a folder, not a journal file")
    path.parent.mkdir(parents=True, exist_ok=True)
    # The open-lock works on every POSIX file system (NFS included), unlike symlink locks.
    return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))


def _driver_url(url: str) -> str:
    """``postgresql://`` means SQLAlchemy's psycopg2 dialect; kdsearch's ``postgres`` extra installs
    psycopg 3, so a bare ``postgresql://`` uses it when it is installed."""
    if url.startswith("postgresql://"):
        import importlib.util

        if importlib.util.find_spec("psycopg") is not None:
            return "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite:"):
        # A dashboard reading while a worker writes: wait for the lock instead of failing at once.
        return {"connect_args": {"timeout": 60}}
    return {"pool_pre_ping": True}


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def make_sampler(cfg: StudyConfig) -> optuna.samplers.BaseSampler:
    """The sampler named in the study file, seeded. Constraints reach it through set_constraint."""
    s = cfg.study
    name = s.sampler
    if name == "tpe":
        return optuna.samplers.TPESampler(
            seed=s.seed, n_startup_trials=s.n_startup_trials, multivariate=True, constant_liar=True
        )
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s.seed, population_size=s.population_size)
    if name == "nsga3":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.NSGAIIISampler(seed=s.seed, population_size=s.population_size)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if name == "grid":
        return optuna.samplers.GridSampler(grid_search_space(cfg), seed=s.seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=s.seed, n_startup_trials=s.n_startup_trials)
    raise ConfigError("study.sampler", "unknown sampler", name)  # unreachable: validated on load


def signature_diff(stored: Any, current: Any, prefix: str = "") -> list[str]:
    """Human-readable differences between two signatures (nested dicts/lists)."""
    diffs: list[str] = []
    if isinstance(stored, dict) and isinstance(current, dict):
        for key in sorted(set(stored) | set(current)):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in stored:
                diffs.append(f"{path} added ({current[key]!r})")
            elif key not in current:
                diffs.append(f"{path} removed (was {stored[key]!r})")
            else:
                diffs.extend(signature_diff(stored[key], current[key], path))
    elif stored != current:
        diffs.append(f"{prefix}: stored {stored!r}, now {current!r}")
    return diffs


def _normalise(obj: Any) -> Any:
    # Round-trip through JSON so tuples vs lists and int vs float keys compare as stored.
    return json.loads(json.dumps(obj, sort_keys=True))


def create_or_resume(cfg: StudyConfig, *, create: bool = True) -> tuple[optuna.Study, bool]:
    """Create the study, or resume it after checking its signature. Returns (study, resumed)."""
    url = storage_url_for(cfg)
    storage = open_storage(url, create=create, max_retry=cfg.study.max_retries)
    names = {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    resumed = cfg.study.name in names
    current = _normalise(cfg.search_signature())
    if resumed:
        study = optuna.load_study(study_name=cfg.study.name, storage=storage, sampler=make_sampler(cfg))
        stored = study.user_attrs.get("signature")
        if stored is None:
            raise StudyMismatchError(
                f"study {cfg.study.name!r} exists in {url!r} but was not made by kdsearch; choose another --study-name"
            )
        diffs = signature_diff(stored, current)
        if diffs:
            more = f" (and {len(diffs) - 2} more)" if len(diffs) > 2 else ""
            raise StudyMismatchError(
                f"study {cfg.study.name!r} was stored with a different search: {'; '.join(diffs[:2])}{more}; "
                "use a new --study-name, or restore the stored settings"
            )
        return study, True
    if not create:
        raise StorageError(f"--study-name: no study {cfg.study.name!r} in {url!r}; known: {sorted(names) or 'none'}")
    study = optuna.create_study(
        study_name=cfg.study.name,
        storage=storage,
        directions=cfg.directions,
        sampler=make_sampler(cfg),
        load_if_exists=True,  # two workers racing to create the same study both succeed
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(cfg.metric_names)
    study.set_user_attr("signature", current)
    # Key order kept (not _normalise): the order of `objectives` is the order of the study's values,
    # and `kdsearch worker` rebuilds its config from this attr.
    study.set_user_attr("config", json.loads(json.dumps(config_to_dict(cfg))))
    study.set_user_attr("kdsearch_version", __version__)
    study.set_user_attr("created_on_host", socket.gethostname())
    study.set_user_attr("created_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    study.set_user_attr("time_spent_s", 0.0)
    return study, False


def load_study(storage_url: str, study_name: str) -> optuna.Study:
    """Open an existing study for reading (report, trials, export). One-line errors otherwise."""
    storage = open_storage(storage_url, create=False)
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False))
    if study_name not in names:
        raise StorageError(f"--study-name: no study {study_name!r} in {_redact(storage_url)!r}; known: {names or 'none'}")
    return optuna.load_study(study_name=study_name, storage=storage)


def default_storage_url(run_dir: str | Path, study_name: str) -> str:
    return f"journal:{run_paths(run_dir, study_name).journal}"


def artifact_store(paths: RunPaths) -> FileSystemArtifactStore:
    paths.artifacts.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(paths.artifacts))


def add_time_spent(study: optuna.Study, seconds: float) -> float:
    """Add this invocation's wall time to the study's total; return the new total (s).

    Not atomic across concurrent workers: each worker adds its own share when it stops, and the
    worst case of a race is one worker's share lost from the displayed total, never a trial.
    """
    total = float(study.user_attrs.get("time_spent_s", 0.0)) + float(seconds)
    study.set_user_attr("time_spent_s", total)
    return total
