"""Multi-objective early stopping at rungs (kdsearch.search.pruning): ranking, rule, stores, hook."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from kdsearch.config import PruningConfig
from kdsearch.errors import ConfigError
from kdsearch.search.pruning import (
    ListRungStore,
    OptunaRungStore,
    RungEntry,
    RungPruner,
    competitors_digest,
    decide_at_rung,
    pruning_record,
    rank_at_rung,
)

MAX_MIN = ("maximize", "minimize")  # (val accuracy at the rung, a fixed cost such as MACs)
RUNGS_1_9 = PruningConfig(min_fraction=1 / 9)  # rungs at 1/9 and 1/3, as these tests are written


# -- configuration --------------------------------------------------------------------------------


def test_rungs_sit_at_min_fraction_times_powers_of_eta_below_one() -> None:
    assert PruningConfig().rungs == pytest.approx((1 / 27, 1 / 9, 1 / 3))  # the default first rung: 1/27
    assert PruningConfig(eta=2, min_fraction=0.125).rungs == pytest.approx((0.125, 0.25, 0.5))
    assert PruningConfig(eta=3, min_fraction=1 / 3).rungs == pytest.approx((1 / 3,))
    # No rung at the end of the box: 0.111 x 9 = 0.999 would prune fully trained students (it did,
    # in a real run, before this rule), and 0.2 x 3^k stops at 0.6.
    assert PruningConfig(eta=3, min_fraction=0.111).rungs == pytest.approx((0.111, 0.333))
    assert PruningConfig(eta=3, min_fraction=0.2).rungs == pytest.approx((0.2, 0.6))
    assert PruningConfig(eta=2, min_fraction=0.24).rungs == pytest.approx((0.24, 0.48))  # 0.96: in the last 5 %
    assert PruningConfig().competitors_needed == 3
    assert PruningConfig(min_competitors=7).competitors_needed == 7


@pytest.mark.parametrize(
    ("kw", "field"),
    [({"eta": 1}, "study.pruning.eta"), ({"eta": 2.5}, "study.pruning.eta"),
     ({"min_fraction": 0.0}, "study.pruning.min_fraction"), ({"min_fraction": 1.0}, "study.pruning.min_fraction"),
     ({"min_fraction": 0.96}, "study.pruning.min_fraction"),
     ({"min_competitors": 0}, "study.pruning.min_competitors")],
)
def test_bad_pruning_settings_are_one_line_config_errors(kw: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        PruningConfig(**kw)
    assert "\n" not in str(info.value)


# -- ranking at a rung (the toolkit itself: tests/test_pareto.py) -------------------------------


def test_ties_within_a_front_break_by_hypervolume_contribution() -> None:
    # All four are non-dominated (accuracy up, MACs up). Normalised to [0, 1] with the reference
    # at 1.1, the knee (0.60, 300) owns the largest box and the two ends are kept by their reach.
    entries = [RungEntry(0, (0.30, 100.0)), RungEntry(1, (0.31, 290.0)), RungEntry(2, (0.60, 300.0)),
               RungEntry(3, (0.70, 1000.0))]
    ranked = rank_at_rung(entries, MAX_MIN)
    assert [f for _, f in ranked] == [0, 0, 0, 0]
    assert [e.key for e, _ in ranked][-1] == 1  # the near-duplicate of the cheap end goes last
    assert [e.key for e, _ in ranked][0] == 2


def test_non_finite_values_rank_last() -> None:
    entries = [RungEntry(0, (float("nan"), 10.0)), RungEntry(1, (0.1, 10.0)), RungEntry(2, (0.2, 10.0))]
    assert [e.key for e, _ in rank_at_rung(entries, MAX_MIN)] == [2, 1, 0]


# -- the rule -------------------------------------------------------------------------------------


def _field(n: int, seed: int = 0) -> list[RungEntry]:
    rng = np.random.default_rng(seed)
    return [RungEntry(k, (float(rng.uniform(0.1, 0.7)), float(rng.uniform(1e4, 1e6)))) for k in range(n)]


@pytest.mark.parametrize("n", [3, 4, 9, 10, 27])
def test_exactly_the_top_ceil_n_over_eta_continue(n: int) -> None:
    cfg = PruningConfig(eta=3, min_fraction=1 / 9)
    entries = _field(n, seed=n)
    kept = [e.key for e in entries
            if not decide_at_rung(e, entries, MAX_MIN, cfg, 0).prune]
    assert len(kept) == math.ceil(n / 3)
    top = [e.key for e, _ in rank_at_rung(entries, MAX_MIN)][: math.ceil(n / 3)]
    assert sorted(kept) == sorted(top)
    d = decide_at_rung(entries[0], entries, MAX_MIN, cfg, 0)
    assert d.n_competitors == n and d.n_keep == math.ceil(n / 3) and d.rung == pytest.approx(1 / 9)


def test_a_dominated_trial_is_pruned_and_a_pareto_trial_kept() -> None:
    cfg = RUNGS_1_9
    others = [RungEntry(1, (0.5, 1e5)), RungEntry(2, (0.6, 2e5)), RungEntry(3, (0.4, 5e4))]
    worse = decide_at_rung(RungEntry(9, (0.3, 3e5)), others, MAX_MIN, cfg, 1)
    assert worse.prune and worse.front == 1 and worse.rank == 3 and worse.rung == pytest.approx(1 / 3)
    best = decide_at_rung(RungEntry(9, (0.7, 4e4)), others, MAX_MIN, cfg, 1)
    assert not best.prune and best.front == 0 and best.rank == 0


def test_nothing_is_pruned_below_the_minimum_number_of_competitors() -> None:
    cfg = PruningConfig(eta=3, min_competitors=5)
    strong = [RungEntry(k, (0.9, 1.0)) for k in range(3)]  # 3 others + mine = 4 < 5
    d = decide_at_rung(RungEntry(7, (0.1, 100.0)), strong, MAX_MIN, cfg, 0)
    assert not d.prune and d.rank == 3 and d.n_competitors == 4 and "competitors" in d.reason
    d5 = decide_at_rung(RungEntry(7, (0.1, 100.0)), [*strong, RungEntry(3, (0.9, 1.0))], MAX_MIN, cfg, 0)
    assert d5.prune  # the fifth competitor arms the rule
    # default minimum = eta: with two trials at the rung nobody is pruned
    assert not decide_at_rung(RungEntry(1, (0.0, 9.0)), [RungEntry(0, (1.0, 0.0))], MAX_MIN, RUNGS_1_9, 0).prune


def test_a_decision_does_not_depend_on_the_order_competitors_are_read_in() -> None:
    entries = _field(12, seed=3) + [RungEntry(100, (0.4, 5e5)), RungEntry(101, (0.4, 5e5))]  # an exact tie
    mine = entries[-1]
    a = decide_at_rung(mine, entries, MAX_MIN, RUNGS_1_9, 0)
    b = decide_at_rung(mine, list(reversed(entries)), MAX_MIN, RUNGS_1_9, 0)
    assert a == b
    # the tie goes to the earlier trial
    r100 = decide_at_rung(entries[-2], entries, MAX_MIN, RUNGS_1_9, 0).rank
    assert r100 < a.rank


# -- stores and the hook ----------------------------------------------------------------------------

# (val accuracy at each of 27 evaluations is made up per trial: a "curve" level; MACs are fixed)
TRIALS = [(0.30, 2e5), (0.50, 4e5), (0.20, 1e5), (0.45, 8e5), (0.10, 9e5), (0.55, 3e5), (0.35, 6e5),
          (0.25, 7e5), (0.60, 9e5), (0.15, 5e4)]


def _run_hook(pruner: RungPruner, level: float) -> bool:
    """Feed one trial's evaluations at every 1/27 of a 27 s box; True when it was stopped."""
    for k in range(1, 28):
        f = k / 27
        if pruner(f * 27.0, f, level * (0.5 + 0.5 * f)):
            return True
    return False


def _replay_with_lists() -> list[list[dict]]:
    store = ListRungStore()
    cfg = RUNGS_1_9
    out = []
    for key, (level, macs) in enumerate(TRIALS):
        p = RungPruner(key=key, store=store, config=cfg, fixed_values=(macs,), directions=MAX_MIN)
        _run_hook(p, level)
        out.append([d.to_dict() for d in p.decisions])
    return out


def test_decisions_are_identical_from_a_journal_study_with_two_workers_and_from_a_list(tmp_path: Path) -> None:
    path = str(tmp_path / "journal.log")
    # Two "workers": two Study objects on the same journal file, taking turns; trial k runs in
    # worker k % 2 and sees the rung values the other worker wrote.
    studies = [
        optuna.create_study(study_name="p", storage=JournalStorage(JournalFileBackend(path)),
                            directions=["maximize", "minimize"], load_if_exists=True)
        for _ in range(2)
    ]
    live: list[list[dict]] = []
    for key, (level, macs) in enumerate(TRIALS):
        study = studies[key % 2]
        trial = study.ask()
        assert trial.number == key
        p = RungPruner(key=trial.number, store=OptunaRungStore(trial, ["val_accuracy", "macs"]),
                       config=RUNGS_1_9, fixed_values=(macs,), directions=MAX_MIN)
        if _run_hook(p, level):
            trial.set_user_attr("pruning", p.summary())
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, [level, macs])
        live.append([d.to_dict() for d in p.decisions])
    assert live == _replay_with_lists()
    states = [t.state for t in studies[0].get_trials()]
    assert optuna.trial.TrialState.PRUNED in states and optuna.trial.TrialState.COMPLETE in states
    # the stored record: the rung values, the decision and the partial curve of a pruned trial
    pruned = next(t for t in studies[1].get_trials() if t.state == optuna.trial.TrialState.PRUNED)
    rec = pruned.user_attrs["pruning"]
    assert rec["pruned_at"]["prune"] and rec["curve"][-1][1] == pytest.approx(rec["pruned_at"]["rung"], abs=0.05)
    assert pruned.user_attrs["rung_0"]["names"] == ["val_accuracy", "macs"]


def _pruned_record(n_others: int) -> dict:
    """The ``pruning`` record of a trial pruned at rung 0 against ``n_others`` better trials."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    names = ["val_accuracy", "macs"]
    for k in range(n_others):
        t = study.ask()
        OptunaRungStore(t, names).record(t.number, 0, 0.12, (0.5 + 0.001 * k, 1e5 * (1 + k)), 1.0)
    mine = study.ask()
    pruner = RungPruner(key=mine.number, store=OptunaRungStore(mine, names), config=RUNGS_1_9,
                        fixed_values=(1e9,), directions=MAX_MIN, scales=("linear", "log"))
    assert pruner(1.2, 0.12, 0.1) is True
    return pruning_record(pruner, 0.25)


def test_the_stored_record_explains_the_decision_and_does_not_grow_with_the_rung() -> None:
    """Issue 19: a pruned trial stored every competitor's vector (storage grew as n^2). Now the
    record holds the decision (rung, rank, front, n, threshold, the digest of the competitors'
    keys), and it is as long with 400 trials at the rung as with 5 (but for the digits of n)."""
    small, big = _pruned_record(5), _pruned_record(400)
    for rec, n_others in ((small, 5), (big, 400)):
        d = rec["decisions"][0]
        assert d["n_competitors"] == n_others + 1 and d["rank"] == n_others and d["front"] == 1
        assert d["n_keep"] == math.ceil((n_others + 1) / 3) and d["prune"] is True
        assert d["competitors_digest"] == competitors_digest(range(n_others))
        assert rec["names"] == ["val_accuracy", "macs"] and rec["bracket"] is None and "competitors" not in rec
    # only digits differ (n, rank and threshold, in the decision, its copy in pruned_at and their
    # reasons): 24 bytes here, where 400 stored competitor vectors took about 12,000
    assert len(json.dumps(big)) - len(json.dumps(small)) < 40


def test_running_trials_compete_and_failed_ones_do_not(tmp_path: Path) -> None:
    study = optuna.create_study(storage=JournalStorage(JournalFileBackend(str(tmp_path / "j.log"))),
                                directions=["maximize", "minimize"])
    running = study.ask()
    OptunaRungStore(running, ["val_accuracy", "macs"]).record(running.number, 0, 0.11, (0.9, 1.0), 1.0)
    failed = study.ask()
    OptunaRungStore(failed, ["val_accuracy", "macs"]).record(failed.number, 0, 0.11, (0.95, 0.5), 1.0)
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    other_names = study.ask()
    OptunaRungStore(other_names, ["val_accuracy", "params"]).record(other_names.number, 0, 0.11, (0.99, 0.1), 1.0)
    mine = study.ask()
    seen = OptunaRungStore(mine, ["val_accuracy", "macs"]).competitors(mine.number, 0)
    assert [e.key for e in seen] == [running.number]
    with pytest.raises(ValueError, match="writes trial"):
        OptunaRungStore(mine, ["val_accuracy"]).record(running.number, 0, 0.1, (0.1,), 1.0)


def test_the_hook_decides_once_per_rung_and_an_eval_past_two_rungs_decides_both() -> None:
    store = ListRungStore()
    for k in range(6):  # six strong trials at both rungs
        store.record(k, 0, 0.12, (0.9, 1.0), 1.0)
        store.record(k, 1, 0.34, (0.9, 1.0), 3.0)
    keeper = RungPruner(key=50, store=store, config=RUNGS_1_9, fixed_values=(0.5,), directions=MAX_MIN)
    assert keeper(1.0, 0.05, 0.95) is False and keeper.decisions == []
    assert keeper(4.0, 0.40, 0.95) is False  # jumped past 1/9 and 1/3: decides both
    assert [d.rung_index for d in keeper.decisions] == [0, 1] and keeper.pruned_at is None
    assert keeper(5.0, 0.50, 0.95) is False and len(keeper.decisions) == 2
    loser = RungPruner(key=51, store=store, config=RUNGS_1_9, fixed_values=(2.0,), directions=MAX_MIN)
    assert loser(1.2, 0.12, 0.1) is True
    assert loser.pruned_at is not None and loser.pruned_at.rung_index == 0
    assert store.rungs[0][51].values == (0.1, 2.0)  # recorded before deciding
    summary = loser.summary()
    assert summary["pruned_at"]["rank"] == 7 and summary["curve"] == [[1.2, 0.12, 0.1]]
    with pytest.raises(ValueError, match="directions"):
        RungPruner(key=1, store=store, config=RUNGS_1_9, fixed_values=(1.0, 2.0), directions=MAX_MIN)


def _distill_tiny(pruner: RungPruner, box_s: float, **cfg: object):  # noqa: ANN202 - a DistillResult
    """The hook in the real loop: a tiny VGG on synthetic data, rungs in ``eval_at``."""
    from kdsearch.config import DataConfig, DistillConfig
    from kdsearch.data import ViewSpec, load_data, make_batch_source
    from kdsearch.distill import KDHyper, distill
    from kdsearch.models import StudentSpec, build_student

    bundle = load_data(DataConfig(dataset="synthetic", synthetic_train_size=256, synthetic_test_size=64))
    spec = StudentSpec.from_dict({"family": "vgg", "resolution": 16, "num_classes": bundle.num_classes,
                                  "depth": 2, "width": 1 / 16, "in_chans": 3})
    torch.manual_seed(0)
    return distill(
        build_student(spec), train=make_batch_source(bundle.train, "cpu", True), val=bundle.val, bundle=bundle,
        teacher_source=None, hyper=KDHyper(temperature=4.0, alpha=0.0, lr=0.05),
        cfg=DistillConfig(batch_size=32, **cfg), time_box_s=box_s, resolution=16,
        device="cpu", seed=0, view_spec=ViewSpec(image_size=bundle.image_size, padding=2, flip=True),
        on_eval=pruner, eval_at=pruner.config.rungs,
    )


def test_distill_stops_at_the_first_rung_when_the_hook_prunes() -> None:
    store = ListRungStore()
    for k in range(8):
        store.record(k, 0, 1 / 9, (1.0, 0.0), 0.1)  # perfect and free: nobody beats them
    pruner = RungPruner(key=99, store=store, config=RUNGS_1_9, fixed_values=(1e3,), directions=MAX_MIN)
    box_s = 1.8
    result = _distill_tiny(pruner, box_s, eval_every_fraction=1 / 9)
    assert result.stopped_early
    assert pruner.pruned_at is not None and pruner.pruned_at.rung_index == 0
    assert result.kd_time_s < 0.5 * box_s  # stopped near 1/9 of the box, not at its end
    assert len(pruner.curve) == 1 and pruner.curve[0][1] >= 1 / 9


def test_a_rung_inside_a_plateau_cool_down_is_not_scored_by_the_final_evaluation() -> None:
    """Issue 19: a plateau stop at the third evaluation (1/10, 1/9, 2/10 of the box) cools down
    until 0.45 of the box, past the rung at 1/3, which was never evaluated. The final evaluation
    (annealed, on all of val) must not score that rung: it would prune a trial that finished
    training against perfect rivals, and raise the bar for every later trial at 1/3."""
    from kdsearch.config import EarlyStopConfig

    store = ListRungStore()
    for k in range(8):
        store.record(k, 0, 1 / 9, (0.0, 1e9), 0.1)  # rung 1/9: hopeless rivals, the trial goes on
        store.record(k, 1, 1 / 3, (1.0, 0.0), 0.3)  # rung 1/3: perfect and free, nobody beats them
    pruner = RungPruner(key=99, store=store, config=RUNGS_1_9, fixed_values=(1e3,), directions=MAX_MIN)
    box_s = 2.0
    result = _distill_tiny(pruner, box_s, eval_every_fraction=0.1, early_stop=EarlyStopConfig(
        enabled=True, patience=2, min_delta=1.0, cooldown_fraction=0.25))
    assert result.stopped_early and result.stop_requested_s is not None
    assert result.stop_requested_s < box_s / 3 < result.kd_time_s  # the rung at 1/3 lies in the cool-down
    assert [d.rung_index for d in pruner.decisions] == [0] and pruner.pruned_at is None
    assert 99 not in store.rungs[1]  # no rung-1/3 value was recorded for it
    assert len(pruner.curve) == len(result.val_history) - 1  # every evaluation but the final one


def test_a_log_scale_ranks_costs_by_their_order_of_magnitude() -> None:
    # Equal accuracy, MACs 1e3 / 1e5 / 1e7: on a linear axis 1e3 and 1e5 are nearly the same
    # point next to 1e7; on a log axis they are evenly spread. Non-positive values rank last.
    from kdsearch.pareto import to_loss

    assert to_loss((0.5, 1e5), MAX_MIN, ("linear", "log")).tolist() == pytest.approx([-0.5, 5.0])
    assert math.isnan(to_loss((0.5, 0.0), MAX_MIN, ("linear", "log"))[1])
    entries = [RungEntry(0, (0.5, 0.0)), RungEntry(1, (0.6, 1e3)), RungEntry(2, (0.7, 1e5))]
    assert [e.key for e, _ in rank_at_rung(entries, MAX_MIN, ("linear", "log"))][-1] == 0
    with pytest.raises(ValueError, match="scale"):
        to_loss((0.5, 1.0), MAX_MIN, ("linear", "sqrt"))
    with pytest.raises(ValueError, match="scales"):
        RungPruner(key=1, store=ListRungStore(), config=RUNGS_1_9, fixed_values=(1.0,), directions=MAX_MIN,
                   scales=("log",))
