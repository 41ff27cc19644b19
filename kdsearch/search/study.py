"""Sampler, creating and resuming a study, and the time it has used.

Opening storage (URLs, run folders, artifacts) is :mod:`kdsearch.storage`. Re-running a study
resumes it. It never silently starts a new one: a stored study whose search signature (space,
objectives, constraints, data, teachers, time box) differs is an error naming the difference.
"""

from __future__ import annotations

import json
import socket
import time
import warnings
from typing import Any

import optuna

from kdsearch import trial_record as tr
from kdsearch._version import __version__
from kdsearch.config import StudyConfig, config_to_dict
from kdsearch.errors import ConfigError, StorageError, StudyMismatchError
from kdsearch.search.recovery import stale_trial_callback
from kdsearch.search.samplers import RungTPESampler
from kdsearch.search.space import grid_search_space
from kdsearch.storage import open_storage, storage_url_for

__all__ = [
    "make_sampler",
    "create_or_resume",
    "add_time_spent",
    "signature_diff",
]


def make_sampler(cfg: StudyConfig) -> optuna.samplers.BaseSampler:
    """The sampler named in the study file, seeded. Constraints reach it through set_constraint."""
    s = cfg.study
    name = s.sampler
    if name == "tpe":
        return optuna.samplers.TPESampler(
            seed=s.seed, n_startup_trials=s.n_startup_trials, multivariate=True, constant_liar=True
        )
    if name.startswith("tpe-"):  # tpe-impute, tpe-bohb: TPE that learns from PRUNED trials
        return RungTPESampler(mode=name.removeprefix("tpe-"), seed=s.seed, n_startup_trials=s.n_startup_trials,
                              multivariate=True, constant_liar=True)
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
    storage = open_storage(url, create=create, stale_trial_callback=stale_trial_callback(cfg.study.max_retries))
    names = {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    resumed = cfg.study.name in names
    current = _normalise(cfg.search_signature())
    if resumed:
        study = optuna.load_study(study_name=cfg.study.name, storage=storage, sampler=make_sampler(cfg))
        stored = study.user_attrs.get(tr.SIGNATURE)
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
    study.set_user_attr(tr.SIGNATURE, current)
    # Key order kept (not _normalise): the order of `objectives` is the order of the study's values,
    # and `kdsearch worker` rebuilds its config from this attr.
    study.set_user_attr(tr.CONFIG, json.loads(json.dumps(config_to_dict(cfg))))
    study.set_user_attr(tr.KDSEARCH_VERSION, __version__)
    study.set_user_attr(tr.CREATED_ON_HOST, socket.gethostname())
    study.set_user_attr(tr.CREATED_AT, time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    study.set_user_attr(tr.TIME_SPENT_S, 0.0)
    return study, False


def add_time_spent(study: optuna.Study, seconds: float) -> float:
    """Add this invocation's wall time to the study's total; return the new total (s).

    Not atomic across concurrent workers: each worker adds its own share when it stops, and the
    worst case of a race is one worker's share lost from the displayed total, never a trial.
    """
    total = float(study.user_attrs.get(tr.TIME_SPENT_S, 0.0)) + float(seconds)
    study.set_user_attr(tr.TIME_SPENT_S, total)
    return total
