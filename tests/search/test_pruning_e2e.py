"""Issue 12 live: a smoke study with study.pruning on, on two worker processes sharing one journal.

It shows PRUNED trials with their rungs and partial curves, no COMPLETE trial lost, and that every
stored stopping decision is the one :func:`decide_at_rung` gives from the storage alone, whichever
worker ran the competing trials: a decision stores no competitor vectors, so they are rebuilt from
the other trials' own rung records (those written before it), and the stored digest of the
competitors' keys proves that the rebuilt set is the one the decision saw.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
from optuna.trial import TrialState
from rich.console import Console

from kdsearch import trial_record as tr
from kdsearch.config import PruningConfig, load_config
from kdsearch.measure import KDMemoryTracker
from kdsearch.progress import SearchDisplay
from kdsearch.report.figures import learning_curves_figure
from kdsearch.report.trials_table import trials_table
from kdsearch.search.pruning import RungDecision, RungEntry, decide_at_rung

from cli_helpers import SMOKE, run_cli
from search_helpers import (
    BigAllocator,
    artifact_sha,
    assert_no_storage_errors,
    open_study,
    optimize_args,
    rung_competitors,
    seed_study_folder,
)

N_TRIALS = 12


def _decision(d: dict) -> RungDecision:
    return RungDecision(**d)


def test_pruning_on_two_workers(smoke_run: Path, tmp_path: Path) -> None:
    seed_study_folder(smoke_run, tmp_path, "prune")
    code = run_cli(*optimize_args(
        tmp_path, "prune", "--workers", "2", "--n-trials", str(N_TRIALS),
        "--set", "study.pruning.enabled=true", "--set", "study.trial_time=1.5s", "--set", "study.n_startup_trials=4",
    ))
    assert code == 0
    study = open_study(tmp_path, "prune")
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(N_TRIALS))  # none lost, none extra
    states = [t.state for t in trials]
    assert set(states) <= {TrialState.COMPLETE, TrialState.PRUNED}, [t.user_attrs.get("fail_detail") for t in trials]
    pids = {t.user_attrs["worker"]["pid"] for t in trials}
    assert len(pids) == 2

    # Every COMPLETE trial is whole: values, checkpoint, full curve, fixed costs measured before KD.
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert complete
    for t in complete:
        assert t.values == [t.user_attrs["val_accuracy"], t.user_attrs["macs"]]
        assert artifact_sha(tmp_path, "prune", t.user_attrs["artifact_id"]) == t.user_attrs["weights_sha256"]
        assert t.user_attrs["methods"]["macs"]["measured_on"] == "untrained student, before KD"
        assert t.user_attrs["missing_metrics"]["probe_peak_memory_mb"].startswith("the memory probe runs on CUDA only")

    # PRUNED trials: stopped at a rung, with the rung, rank, front and the partial curve.
    cfg = PruningConfig()  # the defaults the study file leaves in place: eta 3, rungs 1/9, 1/3
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, [t.user_attrs.get("pruning", {}).get("decisions") for t in trials]
    for t in pruned:
        a = t.user_attrs
        assert a["pruned_rung"] in cfg.rungs and a["pruned_rank"] >= 0 and a["pruned_front"] >= 0
        assert a["pruned_rung"] == pytest.approx(cfg.rungs[a["pruned_rung_index"]])
        curve = a["kd_history"]["val"]
        assert curve and a["kd_history"]["stopped_early"]
        assert a["kd_time_s"] < 0.9 * 1.5  # stopped well inside the box
        assert a["pruning"]["pruned_at"]["prune"] is True
        assert "artifact_id" not in a

    # Every decision (continue or prune) recomputed from storage gives the stored answer, and the
    # competitors it was taken against are exactly the rung vectors other trials stored before it
    # (the digest of their keys matches). A record holds no competitor vectors: its size does not
    # grow with the study.
    by_number = {t.number: t for t in trials}
    cross_worker = 0
    n_decisions = 0
    for t in trials:
        rec = t.user_attrs.get("pruning")
        if rec is None:
            continue
        assert "competitors" not in rec and len(json.dumps(rec)) < 4000
        assert rec["names"] == ["val_accuracy", "macs"] and rec["directions"] == ["maximize", "minimize"]
        for d in rec["decisions"]:
            k = d["rung_index"]
            mine = t.user_attrs[tr.rung_key(k)]
            assert mine["fraction"] >= cfg.rungs[k] * (1 - 1e-9)
            others = rung_competitors(trials, t, k, d["n_competitors"], d["competitors_digest"])
            cross_worker += sum(by_number[e.key].user_attrs["worker"]["pid"] != t.user_attrs["worker"]["pid"]
                                for e in others)
            random.Random(k).shuffle(others)  # read order does not matter
            again = decide_at_rung(RungEntry(t.number, tuple(mine["values"])), others, rec["directions"],
                                   PruningConfig(eta=rec["eta"], min_fraction=rec["min_fraction"],
                                                 min_competitors=rec["min_competitors"]), k, rec["scales"])
            assert again == _decision(d)
            n_decisions += 1
        if t.state == TrialState.PRUNED:
            assert _decision(rec["pruned_at"]) == _decision(rec["decisions"][-1])
    assert n_decisions >= N_TRIALS
    assert cross_worker > 0  # decisions counted trials of the other worker
    assert all(math.isfinite(t.user_attrs["macs"]) for t in trials)
    assert_no_storage_errors(tmp_path, "prune")

    # What the user sees: `kdsearch trials` labels each pruned trial with its rung, the report
    # draws every curve with the pruned ones dashed and crossed at their last point, and the
    # progress display counts them.
    console = Console(width=250, record=True)
    console.print(trials_table(study, pareto=False))
    text = console.export_text()
    for t in pruned:
        assert f"PRUNED (rung {t.user_attrs['pruned_rung']:.3g})" in text
    fig = learning_curves_figure(study)
    assert fig.figure is not None and fig.note.startswith(f"{N_TRIALS} trials drawn ({len(pruned)} pruned")
    dashed = [tr for tr in fig.figure.data if tr.line.dash == "dash"]
    assert len(dashed) == len(pruned) and all(tr.marker.symbol[-1] == "x" for tr in dashed)
    assert {f"#{t.number} {t.user_attrs['student']}" for t in pruned} == {tr.name for tr in dashed}
    display = SearchDisplay(load_config(SMOKE), Console(record=True), live=False)
    for t in trials:
        display.trial_end(t, 1.0)
    assert (display.done, display.pruned, display.failed) == (len(complete), len(pruned), 0)
    assert "PRUNED at rung" in display.console.export_text()


def test_a_fixed_cost_over_its_limit_ends_the_trial_before_the_box(smoke_run: Path, tmp_path: Path) -> None:
    """A macs constraint the first smoke trials straddle: those over it are PRUNED in seconds,
    screened, with their violation set for the sampler; the others train as usual."""
    smoke = open_study(smoke_run, "smoke").get_trials()
    limit = sorted(t.user_attrs["macs"] for t in smoke)[1]  # the median of the same first proposals
    seed_study_folder(smoke_run, tmp_path, "screen")
    code = run_cli(*optimize_args(tmp_path, "screen", "--n-trials", "3", "--set", f"constraints.macs={limit}"))
    assert code == 0
    trials = open_study(tmp_path, "screen").get_trials()
    screened = [t for t in trials if t.user_attrs.get("screened")]
    assert screened, [(t.state, t.user_attrs.get("macs")) for t in trials]
    for t in trials:
        macs = t.user_attrs["macs"]
        assert t.user_attrs["methods"]["macs"]["measured_on"] == "untrained student, before KD"
        if macs > limit:
            assert t.state == TrialState.PRUNED and t.user_attrs["screened"] is True
            assert t.user_attrs["screen_reason"] == f"macs={macs:.4g} > {limit:.4g}"
            assert t.constraints == {"macs": pytest.approx(macs - limit)}
            assert t.user_attrs["feasible"] is False and "kd_history" not in t.user_attrs
            assert t.user_attrs["screened_values"] == {"val_accuracy": None, "macs": macs}
        else:
            assert t.state == TrialState.COMPLETE and t.constraints == {"macs": pytest.approx(macs - limit)}


def test_the_memory_probe_ends_a_trial_over_the_memory_limit(copy_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real probe steps (KD with teacher targets) run before the box, read through allocator
    counters that report a 5 GB peak: over a 100 MB peak_kd_memory_mb limit the trial ends at
    once, infeasible (PRUNED, screened) with the reason, and the box never starts. On the CPU
    (no counters) the probe is skipped and its figure missing with the reason."""
    import optuna
    import torch

    from kdsearch.config import apply_overrides
    from kdsearch.search import objective, screening
    from kdsearch.search.worker_setup import prepare_worker
    from kdsearch.storage import run_paths

    cfg = apply_overrides(load_config(SMOKE), run_dir=str(copy_run))
    ctx = prepare_worker(cfg, run_paths(copy_run, "smoke"), torch.device("cpu"))
    ctx.cfg = replace(cfg, constraints={"peak_kd_memory_mb": 100.0})
    fake = BigAllocator(5000.0)
    # The probe is the screening phase's (kdsearch.search.screening); the box is the objective's.
    monkeypatch.setattr(screening, "KDMemoryTracker", lambda device: KDMemoryTracker(device, counters=fake))
    boxes: list[float] = []
    real_distill = objective.distill

    def spy(*args: object, **kwargs: object) -> object:
        boxes.append(kwargs["time_box_s"])
        return real_distill(*args, **kwargs)

    monkeypatch.setattr(objective, "distill", spy)
    monkeypatch.setattr(screening, "distill", spy)
    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned, match="probe_peak_memory_mb=5000 > peak_kd_memory_mb limit 100"):
        objective.run_trial(ctx, trial)
    study.tell(trial, state=TrialState.PRUNED)
    t = study.trials[0]
    assert len(boxes) == 2  # the probe's calls (the autotuner warm-up step, the measured steps); no box
    assert t.user_attrs["screened"] is True and t.user_attrs["probe_peak_memory_mb"] == pytest.approx(5000.0)
    assert t.user_attrs["methods"]["probe_peak_memory_mb"]["steps"] == objective.PROBE_STEPS
    assert t.constraints == {"peak_kd_memory_mb": pytest.approx(4900.0)}
    assert "kd_history" not in t.user_attrs and fake.resets >= 1

    # On the CPU: no counters, no probe, the figure is missing with its reason.
    monkeypatch.undo()
    ctx.cfg = cfg
    trial = study.ask()
    objective.run_trial(ctx, trial)
    assert trial.user_attrs["probe_peak_memory_mb"] is None
    assert "CUDA only" in trial.user_attrs["missing_metrics"]["probe_peak_memory_mb"]
