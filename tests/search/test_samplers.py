"""The rung-aware TPE (kdsearch.search.samplers): what it shows TPE of the PRUNED trials, and that
TPE's split really receives it (the wrapper overrides a private TPESampler method, so this pins it)."""

from __future__ import annotations

import warnings
from typing import Any

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from kdsearch import trial_record as tr
from kdsearch.search.samplers import RungTPESampler, present_trials

NAMES = ["val_accuracy", "macs"]
DIST = {"x": FloatDistribution(0.0, 1.0)}


def _rung(acc: float, macs: float, bracket: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"fraction": 1 / 9, "values": [acc, macs], "names": NAMES, "train_s": 1.0, "time_unix_s": 0.0,
            **({} if bracket is None else {"bracket": bracket})}


def _complete(n: int, rung_acc: float, final_acc: float, macs: float, **rung_kw: Any) -> FrozenTrial:
    t = create_trial(state=TrialState.COMPLETE, values=[final_acc, macs], params={"x": n / 100}, distributions=DIST,
                     user_attrs={f"{tr.RUNG_PREFIX}0": _rung(rung_acc, macs, **rung_kw)})
    t.number = n
    return t


def _pruned(n: int, rung_acc: float, macs: float, *, constraints: dict[str, float] | None = None,
            **rung_kw: Any) -> FrozenTrial:
    pruning = {"pruned_at": {"rung_index": 0, "rank": 4, "n_competitors": 8}}
    t = create_trial(state=TrialState.PRUNED, params={"x": n / 100}, distributions=DIST,
                     user_attrs={f"{tr.RUNG_PREFIX}0": _rung(rung_acc, macs, **rung_kw), tr.PRUNING: pruning},
                     system_attrs={} if constraints is None else {f"constraints:{k}": v for k, v in constraints.items()})
    t.number = n
    return t


def _line_study() -> list[FrozenTrial]:
    """Five COMPLETE trials on final = 0.1 + 2 * rung, and what the pruner stopped."""
    trials = [_complete(i, 0.1 + 0.05 * i, 0.1 + 2 * (0.1 + 0.05 * i), 1e6 * (i + 1)) for i in range(5)]
    trials.append(_pruned(5, 0.2, 3e5, constraints={"params": 12.5}))  # infeasible: the constraint must survive
    screened = create_trial(state=TrialState.PRUNED, params={"x": 0.5}, distributions=DIST,
                            user_attrs={tr.SCREENED: True}, system_attrs={"constraints:params": 3.0})
    screened.number = 6
    trials.append(screened)
    return trials


def test_impute_predicts_the_final_accuracy_through_the_studys_rung_to_final_line() -> None:
    trials = _line_study()
    shown = present_trials(trials, "impute", NAMES, min_observations=5)
    imputed = shown[5]
    assert imputed.state == TrialState.COMPLETE
    assert imputed.values == pytest.approx([0.1 + 2 * 0.2, 3e5])  # the line's prediction; its measured MACs
    assert imputed.constraints == {"params": 12.5}  # TPE's constrained split still sees it infeasible
    assert imputed.params == {"x": 0.05} and imputed.user_attrs[tr.PRUNING]["pruned_at"]["rank"] == 4
    assert shown[6].state == TrialState.PRUNED  # screened: no rung vector, nothing to impute
    assert all(s is t for s, t in zip(shown[:5], trials[:5], strict=True))  # COMPLETE ones as they are


def test_impute_waits_for_enough_complete_trials_and_keeps_brackets_apart() -> None:
    assert present_trials(_line_study(), "impute", NAMES, min_observations=6)[5].state == TrialState.PRUNED
    trials = [*_line_study()[:5], _pruned(5, 0.2, 3e5, bracket={"box_s": 60.0})]  # a box nobody completed
    assert present_trials(trials, "impute", NAMES, min_observations=2)[5].state == TrialState.PRUNED
    # a study without a val_accuracy objective (or without metric names) is left as it is
    assert present_trials(_line_study(), "impute", ["val_loss", "macs"], 2)[5].state == TrialState.PRUNED
    assert present_trials(_line_study(), "impute", None, 2)[5].state == TrialState.PRUNED


def test_a_worse_rung_never_predicts_a_better_end() -> None:
    trials = [_complete(i, 0.1 + 0.05 * i, 0.5 - 0.01 * i, 1e6) for i in range(5)]  # falling line
    trials.append(_pruned(5, 0.0, 1e6))
    assert present_trials(trials, "impute", NAMES, 5)[5].values[0] == pytest.approx(0.48)  # the mean: slope 0


def test_bohb_models_the_rung_every_trial_reached() -> None:
    trials = _line_study()
    shown = present_trials(trials, "bohb", NAMES, min_observations=6)
    assert [t.state for t in shown[:6]] == [TrialState.COMPLETE] * 6
    assert [t.values[0] for t in shown[:6]] == pytest.approx([0.1 + 0.05 * i for i in range(5)] + [0.2])
    assert shown[6].state == TrialState.PRUNED
    assert present_trials(trials, "bohb", NAMES, min_observations=7) == trials  # not enough anywhere


def test_rank_gives_a_pruned_trial_its_rank_share_at_its_rung() -> None:
    shown = present_trials(_line_study(), "rank", NAMES, 5)
    assert shown[5].state == TrialState.PRUNED and shown[5].intermediate_values == {0: 0.5}
    assert shown[6].intermediate_values == {}


def _study_with(trials: list[FrozenTrial], mode: str) -> optuna.Study:
    sampler = RungTPESampler(mode=mode, min_observations=5, seed=0, n_startup_trials=3, multivariate=True,
                             constant_liar=True)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(NAMES)
    for t in trials:
        study.add_trial(t)
    return study


@pytest.mark.parametrize("mode", ["impute", "bohb", "rank"])
def test_tpes_split_receives_the_presented_trials_and_the_proposal_records_it(
        mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import optuna.samplers._tpe.sampler as tpe_module

    split_input: list[list[FrozenTrial]] = []
    real_split = tpe_module._split_trials

    def spy(study: Any, trials: list[FrozenTrial], n_below: int) -> Any:
        split_input.append(list(trials))
        return real_split(study, trials, n_below)

    monkeypatch.setattr(tpe_module, "_split_trials", spy)
    study = _study_with(_line_study(), mode)
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    assert split_input, "TPESampler._sample no longer reads the trials through study._get_trials"
    seen = {t.number: t for t in split_input[-1]}
    expected = present_trials(_line_study(), mode, NAMES, 5)[5]
    assert seen[5].state == expected.state and seen[5].values == expected.values
    assert seen[5].intermediate_values == expected.intermediate_values
    record = study.trials[-1].user_attrs[tr.SAMPLER_INPUT]
    assert record == {"mode": mode, "complete": 5, "pruned": 2, "pruned_presented": 1}


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="mode"):
        RungTPESampler(mode="median")
    with pytest.raises(ValueError, match="min_observations"):
        RungTPESampler(min_observations=1)
