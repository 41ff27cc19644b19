"""run_trial's phases, one at a time (kdsearch.search.objective), on a real smoke-sized worker.

The worker is prepared once for the module (synthetic data, a tiny ViT teacher, its logit cache);
each test runs one real trial on an in-memory study in a few seconds: prepare, fixed costs and
screen, probe, box with rungs, final measures, store.
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import replace
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState

from kdsearch import trial_record as tr
from kdsearch.config import StudyConfig, load_config
from kdsearch.measure.memory import AUTOTUNER_WARMUP_STEPS
from kdsearch.search import objective, screening
from kdsearch.search.worker_setup import WorkerContext, prepare_worker
from kdsearch.storage import run_paths

from cli_helpers import SMOKE
from search_helpers import BigAllocator

IDENTITY = (tr.BOX_S, tr.SPEC, tr.STUDENT, tr.TEACHER, tr.TEACHER_NAME, tr.TEACHER_MODE, tr.TEMPERATURE, tr.ALPHA,
            tr.LR, tr.DATASET, tr.DEVICE, tr.TRAIN_DTYPE, tr.GPU_SHARING)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> WorkerContext:
    """A CPU worker of the smoke study (teacher not fitted: the phases do not need a good one)."""
    run_dir = tmp_path_factory.mktemp("objective")
    cfg = load_config(SMOKE, [
        "teacher.fit.enabled=false", "study.trial_time=0.6s", f"study.run_dir={run_dir}",
        "measure.latency.batch_sizes=[1]", "measure.latency.warmup=1", "measure.latency.min_repeats=3",
        "measure.latency.max_repeats=5",
    ])
    return prepare_worker(cfg, run_paths(run_dir, "smoke"), torch.device("cpu"))


@pytest.fixture
def ctx(worker: WorkerContext) -> WorkerContext:
    """The module's worker with its own config (a test may change it)."""
    return replace(worker)


def _study(cfg: StudyConfig) -> optuna.Study:
    study = optuna.create_study(directions=[cfg.objectives[m] for m in cfg.metric_names])
    study.set_metric_names(cfg.metric_names)
    return study


class _DistillSpy:
    """Records every ``distill()`` call (the probe's, the box's) and runs the real one."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[dict[str, Any]] = []
        self.real = objective.distill
        monkeypatch.setattr(objective, "distill", self)
        monkeypatch.setattr(screening, "distill", self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        return self.real(*args, **kwargs)


def _run(ctx: WorkerContext) -> tuple[optuna.Study, optuna.trial.FrozenTrial, BaseException | None]:
    """One trial through run_trial, told as the worker tells it."""
    study = _study(ctx.cfg)
    trial = study.ask()
    error: BaseException | None = None
    try:
        study.tell(trial, objective.run_trial(ctx, trial))
    except optuna.TrialPruned as exc:
        error = exc
        study.tell(trial, state=TrialState.PRUNED)
    except Exception as exc:  # noqa: BLE001 - the test looks at it
        error = exc
        study.tell(trial, state=TrialState.FAIL)
    return study, study.trials[0], error


def test_a_whole_trial_runs_every_phase_and_stores_one_record(ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _DistillSpy(monkeypatch)
    ctx.cfg = replace(ctx.cfg, constraints={"macs": 1e12})
    _, t, error = _run(ctx)
    assert error is None and t.state == TrialState.COMPLETE
    a = t.user_attrs
    assert all(k in a for k in IDENTITY) and a[tr.BOX_S] == pytest.approx(0.6)
    assert t.values == [a["val_accuracy"], a["macs"]]
    assert a["methods"]["macs"]["measured_on"] == screening.UNTRAINED_NOTE  # fixed costs, before the box
    assert "CUDA only" in a["missing_metrics"]["probe_peak_memory_mb"]  # the probe is CUDA only
    assert len(spy.calls) == 1 and spy.calls[0]["time_box_s"] == pytest.approx(0.6)  # the box, no probe
    assert a[tr.KD_HISTORY]["val"] and a[tr.KD_HISTORY]["steps"] > 0
    assert a["kd_time_s"] > 0 and 0.0 <= a["test_accuracy"] <= 1.0
    assert a["kd_energy_j"] is None and a["missing_metrics"]["kd_energy_j"]  # the meters' own metrics
    assert a["peak_kd_memory_mb"] is None and a["missing_metrics"]["peak_kd_memory_mb"]
    assert t.constraints == {"macs": pytest.approx(a["macs"] - 1e12)}
    assert a[tr.FEASIBLE] is True and tr.INFEASIBLE_REASON not in a
    assert a[tr.ARTIFACT_ID] and len(a[tr.WEIGHTS_SHA256]) == 64


def test_a_broken_fixed_cost_ends_the_trial_before_the_box(ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _DistillSpy(monkeypatch)
    ctx.cfg = replace(ctx.cfg, constraints={"macs": 1.0})
    _, t, error = _run(ctx)
    assert isinstance(error, optuna.TrialPruned) and t.state == TrialState.PRUNED
    a = t.user_attrs
    assert spy.calls == []  # neither probe nor box
    assert all(k in a for k in IDENTITY)
    assert a[tr.SCREENED] is True and a[tr.FEASIBLE] is False
    assert a[tr.SCREEN_REASON] == a[tr.INFEASIBLE_REASON] == f"macs={a['macs']:.4g} > 1"
    assert t.constraints == {"macs": pytest.approx(a["macs"] - 1.0)}
    assert a[tr.SCREENED_VALUES] == {"val_accuracy": None, "macs": a["macs"]}
    assert tr.KD_HISTORY not in a and tr.ARTIFACT_ID not in a


def test_the_probe_asks_distill_for_its_steps_and_screens_over_the_limit(
    ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kdsearch.measure import KDMemoryTracker

    spy = _DistillSpy(monkeypatch)
    monkeypatch.setattr(screening, "KDMemoryTracker", lambda device: KDMemoryTracker(device, counters=BigAllocator(900.0)))
    ctx.cfg = replace(ctx.cfg, constraints={"peak_kd_memory_mb": 100.0})
    _, t, error = _run(ctx)
    assert isinstance(error, optuna.TrialPruned)
    # The autotuner's unmeasured warm-up step, then the measured probe; no box.
    assert [c.get("max_steps") for c in spy.calls] == [AUTOTUNER_WARMUP_STEPS, screening.PROBE_STEPS]
    a = t.user_attrs
    assert a["probe_peak_memory_mb"] == pytest.approx(900.0) and a[tr.SCREENED] is True
    assert a[tr.SCREEN_REASON] == "probe_peak_memory_mb=900 > peak_kd_memory_mb limit 100"
    assert t.constraints == {"peak_kd_memory_mb": pytest.approx(800.0)}


def _dominating_competitors(study: optuna.Study, n: int) -> None:
    """``n`` finished trials whose rung-0 vector (val accuracy 1.0, 1 MAC) beats any student."""
    for _ in range(n):
        other = study.ask()
        other.set_user_attr(f"{tr.RUNG_PREFIX}0", {"fraction": 1 / 9, "values": [1.0, 1.0],
                                                   "names": ["val_accuracy", "macs"], "train_s": 0.1})
        study.tell(other, state=TrialState.PRUNED)


def test_a_trial_beaten_at_a_rung_is_stored_pruned_and_its_student_freed(
    ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = ctx.cfg
    ctx.cfg = replace(cfg, constraints={}, study=replace(cfg.study, pruning=replace(
        cfg.study.pruning, enabled=True, min_fraction=1 / 9, min_competitors=1)))
    students: list[weakref.ref[torch.nn.Module]] = []
    real_build = objective.build_student

    def build(spec: Any) -> torch.nn.Module:
        model = real_build(spec)
        students.append(weakref.ref(model))
        return model

    monkeypatch.setattr(objective, "build_student", build)
    study = _study(ctx.cfg)
    _dominating_competitors(study, 3)
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned, match="pruned at rung") as info:
        objective.run_trial(ctx, trial)
    # The raised error keeps run_trial's frame alive; the student must not be held by it.
    gc.collect()
    assert info.value is not None and students and students[0]() is None
    study.tell(trial, state=TrialState.PRUNED)
    a = study.trials[-1].user_attrs
    assert a[tr.PRUNED_RUNG] == pytest.approx(1 / 9) and a[tr.PRUNED_RUNG_INDEX] == 0
    assert a[tr.PRUNED_RANK] == 3 and a[tr.PRUNE_REASON]
    assert a[tr.PRUNING]["pruned_at"]["prune"] is True and a[tr.KD_HISTORY]["stopped_early"]
    assert tr.ARTIFACT_ID not in a and a[tr.CONSTRAINT_VIOLATIONS] == {}


def test_a_missing_objective_fails_the_trial_after_storing_the_rest(
    ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx.cfg = replace(ctx.cfg, objectives={"val_accuracy": "maximize", "kd_energy_j": "minimize"}, constraints={})
    _, t, error = _run(ctx)
    assert t.state == TrialState.FAIL and type(error).__name__ == "TrialFailure"
    a = t.user_attrs
    assert a[tr.FAIL_REASON] == "missing_objective" and a[tr.FAIL_DETAIL].startswith("objective kd_energy_j")
    assert a[tr.ARTIFACT_ID] and a["val_accuracy"] is not None  # the rest is stored


def test_a_student_that_cannot_be_built_fails_with_its_error(
    ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(spec: Any) -> torch.nn.Module:
        raise RuntimeError("x" * 2000)

    monkeypatch.setattr(objective, "build_student", broken)
    _, t, _ = _run(ctx)
    a = t.user_attrs
    assert t.state == TrialState.FAIL and a[tr.FAIL_REASON] == "error"
    assert len(a[tr.FAIL_DETAIL]) == tr.FAIL_DETAIL_MAX_CHARS and a[tr.FAIL_DETAIL].startswith("RuntimeError: xxx")
    assert a[tr.BOX_S] == pytest.approx(0.6)  # what the trial is was stored first



@pytest.mark.parametrize("role", ["constraint", "objective"])
def test_a_fixed_cost_that_could_not_be_measured_ends_the_trial_before_the_box(
    ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch, role: str
) -> None:
    """Latency over ``measure.max_time`` is missing: the trial is certain to end infeasible (a
    missing constraint) or FAIL (a missing objective), so it ends before training, screened."""
    spy = _DistillSpy(monkeypatch)
    cfg = ctx.cfg
    measure = replace(cfg.measure, max_time_s=1e-6)
    if role == "constraint":
        ctx.cfg = replace(cfg, measure=measure, constraints={"latency_ms_b1": 1e9})
    else:
        ctx.cfg = replace(cfg, measure=measure, constraints={},
                          objectives={"val_accuracy": "maximize", "latency_ms_b1": "minimize"})
    _, t, error = _run(ctx)
    a = t.user_attrs
    assert a["latency_ms_b1"] is None and a["missing_metrics"]["latency_ms_b1"]
    assert spy.calls == [], "trained a box whose outcome was already decided"
    assert isinstance(error, optuna.TrialPruned) and t.state == TrialState.PRUNED
    assert a[tr.SCREENED] is True and a[tr.FEASIBLE] is False
    why = a["missing_metrics"]["latency_ms_b1"]
    if role == "constraint":
        assert a[tr.SCREEN_REASON] == f"latency_ms_b1 missing ({why})"
        assert t.constraints == {"latency_ms_b1": tr.INFEASIBLE}
    else:
        assert a[tr.SCREEN_REASON] == f"objective latency_ms_b1 missing ({why})"
        assert a[tr.SCREENED_VALUES] == {"val_accuracy": None, "latency_ms_b1": None}
