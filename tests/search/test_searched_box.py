"""Issue 12: the KD box itself is searchable (``study.trial_time: [2m, 5m, 10m]``), which makes
``kd_time_s`` a real objective: how much KD time buys how much accuracy.

Config (a duration or a list; the comma flag; one-line errors), the proposal, the per-box rung
brackets, the supervisor's per-trial hard limit, and a live smoke study with pruning and
``kd_time_s`` as an objective.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from rich.console import Console

from kdsearch import trial_record as tr
from kdsearch.config import config_from_dict, config_to_dict, load_config
from kdsearch.errors import ConfigError
from kdsearch.progress import SearchDisplay
from kdsearch.report.figures import learning_curves_figure
from kdsearch.report.trials_table import trials_table
from kdsearch.search.pruning import OptunaRungStore
from kdsearch.search.space import grid_search_space, param_distributions, suggest
from kdsearch.search.supervisor import TrialBoxes

from cli_helpers import SMOKE, run_cli
from search_helpers import open_study, optimize_args, rung_competitors, seed_study_folder


def test_one_box_stays_a_number_and_a_list_is_searched() -> None:
    one = load_config(SMOKE)
    assert one.study.trial_times_s == (2.0,) and one.study.trial_time_s == 2.0 and not one.study.box_searched
    assert config_to_dict(one)["study"]["trial_time"] == 2.0  # written as before: stored studies resume
    assert one.search_signature()["trial_time_s"] == 2.0
    many = load_config(SMOKE, ["study.trial_time=[2m, 5m, 10m]"])
    assert many.study.trial_times_s == (120.0, 300.0, 600.0) and many.study.box_searched
    assert many.study.trial_time_s == 600.0  # the longest: what the hard limit and the estimate allow for
    assert config_from_dict(config_to_dict(many)) == many
    assert many.search_signature()["trial_time_s"] == [120.0, 300.0, 600.0]
    assert load_config(SMOKE, trial_time="2m,5m,10m").study.trial_times_s == (120.0, 300.0, 600.0)  # --trial-time
    assert param_distributions(many)["trial_time_s"].choices == (120.0, 300.0, 600.0)
    assert param_distributions(one)["trial_time_s"].is_fixed  # a fixed box is not suggested
    grid = load_config(SMOKE, ["study.trial_time=[1s, 2s]", "study.sampler=grid", "student.vgg.width=0.125"])
    assert grid_search_space(grid)["trial_time_s"] == [1.0, 2.0]  # the grid sampler crosses the boxes too


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[2m, 2m]", "study.trial_time: must list distinct durations (got ['2m00s', '2m00s'])"),
        ("[2m, soon]", "study.trial_time[1]: must be a duration such as 90s, 30m, 24h or 1h30m (got 'soon')"),
        ("[2m, -5]", "study.trial_time[1]: must be a positive duration (got -5)"),
        ("[]", "study.trial_time: must be a duration or a non-empty list of durations (got [])"),
    ],
)
def test_a_bad_box_list_is_one_line_naming_the_item(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, [f"study.trial_time={value}"])
    assert str(err.value) == message


def test_each_trial_draws_its_box_and_the_proposal_carries_it() -> None:
    cfg = load_config(SMOKE, ["study.trial_time=[1s, 3s]"])
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    boxes = set()
    for _ in range(12):
        trial = study.ask()
        proposal = suggest(trial, cfg, 4)
        assert proposal.box_s == trial.params["trial_time_s"]
        boxes.add(proposal.box_s)
    assert boxes == {1.0, 3.0}
    fixed = study.ask()
    assert suggest(fixed, load_config(SMOKE), 4).box_s == 2.0 and "trial_time_s" not in fixed.params


def test_rung_records_compete_only_within_their_bracket() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    stores = {}
    for box in (None, 60.0, 60.0, 600.0):
        trial = study.ask()
        store = OptunaRungStore(trial, ["val_accuracy"], bracket=None if box is None else {"box_s": box})
        store.record(trial.number, 0, 1 / 9, [0.5], 1.0)
        stores[trial.number] = store
    assert [e.key for e in stores[1].competitors(1, 0)] == [2]  # the other 60 s trial only
    assert stores[3].competitors(3, 0) == []  # alone in its box
    assert stores[0].competitors(0, 0) == []  # no bracket: competes with unbracketed records only
    assert study.trials[1].user_attrs[tr.rung_key(0)]["bracket"] == {"box_s": 60.0}
    assert "bracket" not in study.trials[0].user_attrs[tr.rung_key(0)]  # as written before brackets


def test_the_hard_limit_is_each_trials_own_box() -> None:
    searched = load_config(SMOKE, ["study.trial_time=[1s, 30s]"])
    study = optuna.create_study(directions=["maximize", "minimize"])
    short, unknown = study.ask(), study.ask()
    short.set_user_attr("box_s", 1.0)
    boxes = TrialBoxes(searched, study)
    assert boxes(short.number) == 1.0  # killed at 1 s + grace, not 30 s + grace
    assert boxes(unknown.number) == 30.0  # not stored yet: the longest box
    assert boxes(None) == 30.0
    assert TrialBoxes(load_config(SMOKE), study)(short.number) == 2.0  # one box: that box


def test_a_searched_box_study_trades_kd_time_for_accuracy(smoke_run: Path, tmp_path: Path) -> None:
    """A live smoke study: boxes 1 s and 2.5 s, objectives val accuracy, MACs and kd_time_s, rungs on.
    Each trial trains for its own box, kd_time_s is its objective value, and rung decisions were
    taken only against trials of the same box."""
    seed_study_folder(smoke_run, tmp_path, "box")
    n = 10
    code = run_cli(*optimize_args(
        tmp_path, "box", "--n-trials", str(n), "--trial-time", "1s,2.5s",
        "--set", "objectives.kd_time_s=minimize",
        "--set", "study.pruning={enabled: true, min_competitors: 2}", "--set", "study.n_startup_trials=4",
        "--set", "study.grace=20s", "--set", "measure.max_time=1s",
    ))
    assert code == 0
    study = open_study(tmp_path, "box")
    trials = study.get_trials()
    assert len(trials) == n and {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert {t.params["trial_time_s"] for t in trials} == {1.0, 2.5}, [t.params for t in trials]
    for t in trials:
        box = t.params["trial_time_s"]
        assert t.user_attrs["box_s"] == box and t.user_attrs["methods"]["kd_time_s"]["box_s"] == box
        kd = t.user_attrs["kd_time_s"]
        if t.state == TrialState.COMPLETE:
            assert box <= kd < box + 0.75  # its own box, to one step
            assert t.values == [t.user_attrs["val_accuracy"], t.user_attrs["macs"], kd]  # kd_time_s: an objective value
        else:
            assert kd < box
        rec = t.user_attrs["pruning"]
        assert rec["bracket"] == {"box_s": box}
        for k, d in enumerate(rec["decisions"]):
            assert t.user_attrs[tr.rung_key(k)]["bracket"] == {"box_s": box}
            # the competitors (rebuilt from storage, proven by the stored digest of their keys)
            for e in rung_competitors(trials, t, k, d["n_competitors"], d["competitors_digest"]):
                assert study.trials[e.key].params["trial_time_s"] == box  # never against the other box
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert {t.params["trial_time_s"] for t in complete} == {1.0, 2.5}  # both boxes finished somewhere

    # What the user sees: the box of each trial in `kdsearch trials`, the progress lines and the
    # curves; rung lines per box.
    console = Console(width=250, record=True)
    console.print(trials_table(study, pareto=False))
    text = console.export_text()
    header = next(line for line in text.splitlines() if "state" in line)
    assert "box" in header.split("┃")[5]  # #, state, student, teacher, then the box column
    rows = {int(line.split("│")[1]): line.split("│")[5].strip() for line in text.splitlines()
            if line.startswith("│") and line.split("│")[1].strip().isdigit()}
    assert rows == {t.number: f"{t.params['trial_time_s']:.1f}s" for t in trials}
    cfg = load_config(SMOKE, ["study.trial_time=[1s, 2.5s]"])
    display = SearchDisplay(cfg, Console(record=True, width=200), live=False)
    for t in trials:
        display.trial_end(t, 1.0)
    shown = display.console.export_text()
    assert "box 1.0s" in shown and "box 2.5s" in shown
    fig = learning_curves_figure(study).figure
    assert fig is not None
    rung_lines = {round(shape.x0, 6) for shape in fig.layout.shapes}
    assert {round(r * b, 6) for r in (1 / 9, 1 / 3) for b in (1.0, 2.5)} <= rung_lines
