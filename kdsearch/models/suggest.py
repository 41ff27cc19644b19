"""Suggesting a :class:`~kdsearch.config.Space` as an Optuna parameter: the one place that calls
``trial.suggest_*``. The search space (``kdsearch.search.space``) uses it for the study-wide
parameters, and each student family's ``suggest`` for its own architecture parameters."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kdsearch.config.space import Space

if TYPE_CHECKING:
    import optuna

__all__ = ["suggest_space"]


def suggest_space(trial: optuna.trial.BaseTrial, name: str, space: Space) -> Any:
    """The value of Optuna parameter ``name`` drawn from ``space``.

    A fixed value (one choice) is returned as is and never suggested, so it does not appear in
    ``trial.params``. Choices become a categorical parameter; an integer range ``suggest_int``
    (step 1 unless given); a float range ``suggest_float`` (log and step as written).
    """
    if space.is_fixed:
        return space.fixed_value
    if space.choices is not None:
        return trial.suggest_categorical(name, list(space.choices))
    assert space.low is not None and space.high is not None  # a range: Space.parse checked both
    if space.integer:
        return trial.suggest_int(name, int(space.low), int(space.high), step=int(space.step or 1), log=space.log)
    return trial.suggest_float(name, float(space.low), float(space.high), step=space.step, log=space.log)
