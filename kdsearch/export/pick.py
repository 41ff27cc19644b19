"""Which trial to export: a trial number, or a ``--pick`` rule over the feasible Pareto front."""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from kdsearch.errors import ConfigError
from kdsearch.report.pareto import pick_trial

__all__ = ["select_trial", "number_ranges"]


def number_ranges(numbers: list[int]) -> str:
    """``[0, 1, 2, 4, 7, 8]`` -> ``"0-2, 4, 7-8"`` (sorted input; ``"none"`` when empty)."""
    if not numbers:
        return "none"
    out: list[str] = []
    start = prev = numbers[0]
    for n in numbers[1:] + [None]:  # type: ignore[list-item]
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(out)


def select_trial(study: optuna.Study, trial_number: int | None, pick: str | None) -> FrozenTrial:
    """The COMPLETE trial named by ``trial_number`` or selected by the ``pick`` rule
    (:func:`kdsearch.report.pareto.pick_trial`). Exactly one of the two must be given."""
    if (trial_number is None) == (pick is None):
        raise ConfigError("--trial/--pick", "give exactly one of --trial K or --pick RULE", None)
    if pick is not None:
        return pick_trial(study, pick)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    complete = sorted(n for n, t in trials.items() if t.state == TrialState.COMPLETE)
    t = trials.get(int(trial_number))  # type: ignore[arg-type]
    if t is None or t.state != TrialState.COMPLETE:
        what = "does not exist" if t is None else f"is {t.state.name}"
        raise ConfigError(
            "--trial",
            f"must be a COMPLETE trial of study {study.study_name!r}; trial {trial_number} {what}",
            trial_number,
            f"COMPLETE trials: {number_ranges(complete)}",
        )
    return t
