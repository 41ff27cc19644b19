"""One trial, top to bottom: propose -> build -> distil -> measure -> store.

:func:`~kdsearch.search.worker_setup.prepare_worker` does the per-process work that every trial
shares (data on the device, teachers created, fitted and cached). :func:`run_trial` is the objective: a plain function that
stores every metric as a user attr, sets the constraints, uploads the student checkpoint as an
Optuna artifact, and returns the objective values. A failure inside a trial becomes
:class:`~kdsearch.errors.TrialFailure` with ``fail_reason`` stored on the trial.

What the figures include (see also the metric registry, :mod:`kdsearch.metrics`):

* ``peak_kd_memory_mb`` / ``peak_kd_memory_total_mb``: the allocator peak of the KD training
  steps (the loop pauses the tracker around every validation), above the baseline resident at
  trial start and for the whole process. The teacher leaves the device once its logit cache is
  built, so the baseline is the data and the cache.
* ``kd_energy_j``, ``kd_energy_mj_per_image``, ``kd_mean_power_w``: NVML energy of the same
  training steps, per training image seen, and as mean power.
* Selection figures come from the validation split; test figures are stored beside them for
  reporting only (``test_accuracy``; with ``finetune.enabled`` the fine-tune stage stores
  ``pre_ft_val_accuracy`` / ``post_ft_val_accuracy`` / ``ft_gain_val`` and, for reports,
  ``pre_ft_accuracy`` / ``post_ft_accuracy`` / ``ft_gain`` on test).
* Precision: ``train_dtype`` (bf16, fp16 + GradScaler, or fp32; :mod:`kdsearch.distill.precision`)
  is chosen once per worker, used for the teacher's cache and every trial, and stored.
* GPU sharing: a worker pinned to a GPU that it cannot see fails loudly; the number of workers
  on the worker's GPU (``study.share_gpu``) is stored with every trial (``gpu_sharing``).

Before the box (issue 12), in this order, each able to end the trial in seconds:

1. **Fixed costs**: everything that depends on the architecture only (params, MACs, size,
   activation peak, latency at every batch size and device, inference memory and energy) is
   measured once, on the untrained student in the layout training will give it, under the same
   ``measure.max_time`` budget. A constraint on any of them that is broken ends the trial as
   PRUNED with ``screened: true``, ``screen_reason``, its values and its violations set with
   ``trial.set_constraint`` (0.0 for constraints that need training), so TPE and NSGA-II learn
   from it as from any infeasible trial. These figures are not measured again after KD: a trained
   student runs the same kernels as the untrained one of the same architecture (each method
   record says ``"measured_on": "untrained student, before KD"``).
2. **Memory probe** (CUDA only): :data:`PROBE_STEPS` real training steps of a copy of the student
   at the trial's batch and resolution, teacher targets included, give ``probe_peak_memory_mb``
   (the allocator peak above the same baseline as ``peak_kd_memory_mb``). Over the
   ``peak_kd_memory_mb`` constraint, or out of memory, the trial ends infeasible (PRUNED,
   ``screened: true``) with the reason. On the CPU the probe is skipped and the figure is missing
   with the reason.
3. **Rungs** (``study.pruning.enabled``): :class:`kdsearch.search.pruning.RungPruner` is the
   ``on_eval`` hook of the box and the loop evaluates at every rung fraction on top of its grid
   ``distill.eval_every_fraction`` (``distill(eval_at=rungs)``: with the defaults, 1/9, 1/4,
   1/3, 1/2, 3/4 and the end; a plateau stop's patience counts these evaluations). With a
   searched box (``study.trial_time`` a list) a trial competes only with trials of its own box. A trial
   stopped at a rung is stored as PRUNED with its partial curve (``kd_history``), ``pruned_rung``,
   ``pruned_rank``, ``pruned_front`` and the ``pruning`` record (every decision with the
   competitors it was taken against, so any decision can be recomputed from storage).

A pruned or screened trial raises :class:`optuna.TrialPruned` after storing all that; the worker
tells it as PRUNED.
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.artifacts import upload_artifact

from kdsearch import trial_record as tr
from kdsearch.checkpoint import save_student
from kdsearch.config import StudyConfig
from kdsearch.distill import DistillResult, FaultInjector, distill
from kdsearch.distill.precision import autocast_dtype
from kdsearch.errors import TrialFailure
from kdsearch.measure import (
    EnergyMeter,
    KDMemoryTracker,
    Measurements,
    collect_environment,
    environment_diff,
    evaluate_accuracy,
    measure_inference,
)
from kdsearch.metrics import is_fixed_cost, metric_unit
from kdsearch.models import build_student
from kdsearch.search.pruning import OptunaRungStore, PruningConfig, RungEntry, RungPruner
from kdsearch.search.rehearsal import Rehearsal, recorded_fixed_costs, replay_box
from kdsearch.search.screening import screen_fixed_costs
from kdsearch.search.space import Proposal, suggest
from kdsearch.search.worker_setup import (
    PreparedTeacher,
    ProgressFn,
    WorkerContext,
    free_device_memory,
    no_progress,
)
from kdsearch.storage import artifact_store

__all__ = ["run_trial", "PROBE_STEPS", "UNTRAINED_NOTE"]

PROBE_STEPS = 3
"""Training steps of the fail-fast memory probe (CUDA only)."""
UNTRAINED_NOTE = "untrained student, before KD"
"""``measured_on`` of every fixed-cost figure: latency and size do not depend on the weights."""

def _set_attrs(trial: optuna.Trial, attrs: dict[str, Any]) -> None:
    for key, value in attrs.items():
        trial.set_user_attr(key, value)


def _fail(trial: optuna.Trial, reason: str, detail: str, attrs: dict[str, Any] | None = None) -> TrialFailure:
    _set_attrs(trial, {**tr.failure_attrs(reason, detail), **(attrs or {})})
    return TrialFailure(reason, detail, attrs)


def run_trial(ctx: WorkerContext, trial: optuna.Trial, progress: ProgressFn = no_progress) -> list[float]:
    """The objective. Returns the objective values in the study's order, or raises TrialFailure."""
    cfg = ctx.cfg
    device = ctx.device
    proposal: Proposal = suggest(trial, cfg, ctx.num_classes)
    spec, hyper, box_s = proposal.spec, proposal.hyper, proposal.box_s
    teacher = ctx.teachers.get(proposal.teacher.display_name)  # None in a rehearsal
    # First, so the supervisor's hard limit (box + grace) reads this trial's own box from storage.
    _set_attrs(trial, {
        tr.BOX_S: box_s, tr.SPEC: spec.to_dict(), tr.STUDENT: spec.label, tr.TEACHER: proposal.teacher.display_name,
        tr.TEACHER_NAME: proposal.teacher.name, tr.TEACHER_MODE: proposal.teacher.mode,
        tr.TEMPERATURE: hyper.temperature, tr.ALPHA: hyper.alpha, tr.LR: hyper.lr, tr.DATASET: cfg.data.dataset,
        tr.DEVICE: str(device), tr.TRAIN_DTYPE: ctx.train_dtype, tr.GPU_SHARING: ctx.gpu_sharing,
    })
    inject = cfg.debug.inject
    if cfg.debug.inject_trial is not None and cfg.debug.inject_trial != trial.number:
        inject = None
    fault = FaultInjector(inject) if inject is not None else None  # test-only (debug.inject)

    seed = cfg.study.seed * 100_003 + trial.number
    torch.manual_seed(seed)
    # A rehearsal replays the nearest recorded trial: its fixed costs, its box through the same
    # on_eval hook, its final accuracies; no student is built (kdsearch.search.rehearsal).
    rehearsal, row, student = ctx.rehearsal, None, None
    if rehearsal is not None:
        row, how = rehearsal.match(proposal)
        trial.set_user_attr(tr.REHEARSAL, how)
    else:
        try:
            student = build_student(spec)
        except Exception as exc:  # noqa: BLE001 - a student that cannot be built is this trial's failure
            raise _fail(trial, "error", f"{type(exc).__name__}: {exc}") from None

    # 1. Fixed costs, on the untrained student, then the constraints they decide.
    progress("measure", 0.0, "fixed costs of the untrained student")
    if row is not None:
        fixed = recorded_fixed_costs(row, rehearsal.table.path)
    else:
        fixed = _measure_fixed_costs(ctx, student, spec.resolution)
    screen = screen_fixed_costs(fixed.values, cfg.constraints, [m for m in cfg.constraints if is_fixed_cost(m)])
    if not screen.feasible_so_far:
        known = _known_verdict(cfg, fixed)
        _screen_out(trial, cfg, fixed, known.violations, known.reason)

    # 2. The fail-fast memory probe (CUDA only).
    if row is not None:
        probe_attrs: dict[str, Any] = {}
        fixed.set_missing("probe_peak_memory_mb", "a rehearsal trains no student", {"method": "skipped"})
    else:
        probe_attrs = _memory_probe(ctx, student, spec, teacher, hyper, seed, fixed)
    limit = cfg.constraints.get("peak_kd_memory_mb")
    probe_mb = fixed.values.get("probe_peak_memory_mb")
    probe_reason = None
    if probe_attrs.get("oom"):
        probe_reason = f"out of memory in the {PROBE_STEPS}-step memory probe: {probe_attrs['oom']}"
    elif limit is not None and probe_mb is not None and probe_mb > limit:
        probe_reason = f"probe_peak_memory_mb={probe_mb:.4g} > peak_kd_memory_mb limit {limit:.4g}"
    if probe_reason is not None:
        known = _known_verdict(cfg, fixed)
        cons = dict(known.violations)
        if limit is not None:
            cons["peak_kd_memory_mb"] = tr.INFEASIBLE if probe_mb is None else float(probe_mb) - float(limit)
        _screen_out(trial, cfg, fixed, cons, "; ".join([probe_reason, *known.reasons]))

    # 3. The box, with the rung pruner when study.pruning is on.
    pruner = _rung_pruner(trial, cfg, fixed, box_s)
    rungs = pruner.config.rungs if pruner is not None else ()
    kd_memory = KDMemoryTracker(device)
    kd_energy = EnergyMeter.for_device(device, cfg.measure.energy.poll_interval_s)
    try:
        progress("distil", 0.0, spec.label)
        if row is not None:
            replay = replay_box(row, box_s=box_s, speed=rehearsal.speed, eval_every_fraction=cfg.distill.eval_every_fraction,
                                eval_at=rungs, on_eval=pruner, progress=lambda frac, msg: progress("distil", frac, msg))
            result = replay.result
            trial.set_user_attr(tr.REHEARSAL, {**how, "on_eval_s": [[round(f, 5), round(t, 6)] for f, t in replay.hook_s]})
        else:
            with kd_memory, kd_energy:  # both paused by distill() around every validation
                result: DistillResult = distill(
                    student,
                    train=ctx.train_source,
                    val=ctx.bundle.val,
                    bundle=ctx.bundle,
                    teacher_source=teacher.source,
                    hyper=hyper,
                    cfg=cfg.distill,
                    time_box_s=box_s,
                    resolution=spec.resolution,
                    device=device,
                    seed=seed,
                    view_spec=ctx.view_spec,
                    progress=lambda frac, msg: progress("distil", frac, msg),
                    eval_batch_size=cfg.measure.eval_batch_size,
                    on_eval=pruner,
                    on_step=fault,
                    meters=(kd_memory, kd_energy),
                    train_dtype=ctx.train_dtype,
                    eval_at=rungs,  # every rung is evaluated, on top of distill.eval_every_fraction
                )
    except TrialFailure as exc:
        raise _fail(trial, exc.reason, exc.detail, exc.attrs) from None
    except torch.OutOfMemoryError as exc:
        free_device_memory(device)
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise _fail(trial, "oom", f"{type(exc).__name__}: {first}", {
            "peak_kd_memory_mb": kd_memory.value_mb, "peak_kd_memory_total_mb": kd_memory.total_mb,
        }) from None
    except Exception as exc:  # noqa: BLE001 - any other error is data for this trial
        free_device_memory(device)
        raise _fail(trial, "error", f"{type(exc).__name__}: {exc}") from None

    m = Measurements()
    m.set("kd_time_s", result.kd_time_s, {
        "method": "rehearsal: box seconds replayed" if row is not None
        else "perf_counter" + (" + cuda synchronize" if device.type == "cuda" else ""),
        "box_s": box_s, "box_searched": cfg.study.box_searched, "steps": result.steps, "epochs": result.epochs,
        "stopped_early": result.stopped_early, "stop_requested_s": result.stop_requested_s,
        "cooldown_s": result.cooldown_s, "train_dtype": result.train_dtype,
        "eval_time_s": result.eval_time_s, "final_eval_time_s": result.final_eval_time_s,
        "evaluations": result.evaluations,
    })
    _store_kd_memory(m, kd_memory)
    _store_kd_energy(m, kd_energy, result)
    trial.set_user_attr(tr.KD_HISTORY, _kd_history(result))
    if pruner is not None:
        trial.set_user_attr(tr.PRUNING, _pruning_record(pruner, cfg.distill.eval_every_fraction))
    if pruner is not None and pruner.pruned_at is not None:
        _store_pruned(trial, cfg, m, fixed, pruner, student, device)

    progress("measure", 0.0, "accuracy")
    if row is not None:
        Rehearsal.final_accuracy(row, m)
    else:
        _final_accuracy(ctx, student, spec, result, m, seed, progress)

    # Latency, size, inference memory and energy were measured before KD (fixed costs).
    m.update(fixed)
    values = m.values
    missing = m.missing

    env_now = collect_environment(device)
    diff = environment_diff(ctx.environment, env_now)
    _set_attrs(trial, m.to_user_attrs())
    if ctx.bundle is not None:
        trial.set_user_attr(tr.NORMALIZATION, {"mean": list(ctx.bundle.mean), "std": list(ctx.bundle.std)})
    if diff:
        trial.set_user_attr(tr.ENV_DIFF, diff)

    # Constraints: value minus limit, <= 0 is feasible. A missing constrained metric is
    # infeasible (a large positive violation) and the trial says why.
    verdict = tr.constraint_verdict(cfg.constraints, values, missing)
    for metric, violation in verdict.violations.items():
        trial.set_constraint(metric, violation)
    _set_attrs(trial, tr.verdict_attrs(verdict))

    progress("store", 0.9, "checkpoint")
    if student is not None:  # a rehearsal has none (its rehearsal record says so)
        _store_checkpoint(ctx, trial, student, spec, proposal)
        del student
        free_device_memory(device)

    out: list[float] = []
    for metric in cfg.metric_names:
        v = values.get(metric)
        if v is None or not math.isfinite(float(v)):
            raise _fail(trial, "missing_objective",
                        f"objective {metric} could not be measured: {missing.get(metric, 'not finite')}")
        out.append(float(v))
    progress("done", 1.0, "")
    return out


def _store_checkpoint(ctx: WorkerContext, trial: optuna.Trial, student: torch.nn.Module, spec: Any,
                      proposal: Proposal) -> None:
    """Upload the trained student as the trial's artifact (``artifact_id``, ``weights_sha256``)."""
    with tempfile.TemporaryDirectory(prefix="kdsearch-ckpt-") as tmp:
        path = Path(tmp) / f"trial-{trial.number}-{spec.label.replace('@', '_')}.safetensors"
        sha = save_student(student, spec, path, {"teacher": proposal.teacher.display_name, "trial": str(trial.number)})
        artifact_id = upload_artifact(
            artifact_store=artifact_store(ctx.paths), file_path=str(path), study_or_trial=trial,
            mimetype="application/octet-stream",
        )
    _set_attrs(trial, {tr.ARTIFACT_ID: artifact_id, tr.WEIGHTS_SHA256: sha})


def _final_accuracy(
    ctx: WorkerContext, student: torch.nn.Module, spec: Any, result: DistillResult, m: Measurements, seed: int,
    progress: ProgressFn,
) -> None:
    """Val and test accuracy of the trained student (and the fine-tune stage's figures) into ``m``."""
    cfg, device = ctx.cfg, ctx.device
    assert ctx.bundle is not None
    student.eval()
    # The training precision, at a batch no larger than the training batch: what fits for
    # training fits for evaluation (measure.eval_batch_size caps it).
    batch = max(1, min(cfg.measure.eval_batch_size, cfg.distill.batch_size))
    amp = autocast_dtype(result.train_dtype)
    acc_method = {"method": "top-1 on the held-out split, inference mode", "resolution": spec.resolution,
                  "dtype": result.train_dtype, "batch_size": batch}

    def accuracy(model: torch.nn.Module, split: Any) -> float:
        return evaluate_accuracy(model, split, spec.resolution, ctx.bundle.mean, ctx.bundle.std, device, batch,
                                 autocast_dtype=amp)

    # distill()'s final evaluation already ran on all of val with this precision and batch, on the
    # model as it is now: reuse it rather than evaluating val twice.
    val_acc = result.final_val_accuracy
    if val_acc is None:
        val_acc = accuracy(student, ctx.bundle.val)
    m.set("val_accuracy", val_acc, {**acc_method, "split": "val", "n": len(ctx.bundle.val)})
    m.set("test_accuracy", accuracy(student, ctx.bundle.test),
          {**acc_method, "split": "test", "n": len(ctx.bundle.test), "use": "reporting only"})

    if cfg.finetune.enabled and ctx.bundle.finetune is not None:
        from kdsearch.distill.head import train_head

        progress("finetune", 0.0, f"{cfg.finetune.epochs} epochs")
        # A copy: the stored checkpoint and the figures above are the distilled student's.
        tuned = copy.deepcopy(student).to(device)
        pre_val, pre_test = m.values["val_accuracy"], m.values["test_accuracy"]
        train_head(
            tuned, ctx.bundle.finetune, spec.resolution, ctx.bundle.mean, ctx.bundle.std,
            epochs=cfg.finetune.epochs, lr=cfg.finetune.lr, batch_size=cfg.finetune.batch_size,
            unfreeze_last_block=cfg.finetune.unfreeze_last_block, device=device, seed=seed,
        )
        post_val, post_test = accuracy(tuned, ctx.bundle.val), accuracy(tuned, ctx.bundle.test)
        del tuned
        ft_base = {"method": "frozen features, head trained on the finetune split", "epochs": cfg.finetune.epochs,
                   "lr": cfg.finetune.lr, "n_train": len(ctx.bundle.finetune), "dtype": result.train_dtype}
        ft_val = {**ft_base, "split": "val", "n": len(ctx.bundle.val), "use": "selection"}
        ft_test = {**ft_base, "split": "test", "n": len(ctx.bundle.test), "use": "reporting only"}
        assert pre_val is not None and pre_test is not None
        m.set("pre_ft_val_accuracy", pre_val, ft_val)
        m.set("post_ft_val_accuracy", post_val, ft_val)
        m.set("ft_gain_val", post_val - pre_val, ft_val)
        m.set("pre_ft_accuracy", pre_test, ft_test)
        m.set("post_ft_accuracy", post_test, ft_test)
        m.set("ft_gain", post_test - pre_test, ft_test)


def _measure_fixed_costs(ctx: WorkerContext, student: torch.nn.Module, resolution: int) -> Measurements:
    """Every architecture-only figure of the untrained ``student``, in the memory layout the
    training loop gives it (channels-last on CUDA when ``distill.channels_last``), under the
    ``measure.max_time`` budget; the student goes back to the CPU afterwards, so the KD memory
    baseline is what it was."""
    cfg, device = ctx.cfg, ctx.device
    student.to(device)
    if device.type == "cuda" and cfg.distill.channels_last:
        student.to(memory_format=torch.channels_last)
    fixed = measure_inference(student, resolution, device, cfg.measure, budget_s=cfg.measure.budget_s(cfg.study.grace_s))
    for name in list(fixed.values):
        fixed.methods[name] = {**fixed.methods.get(name, {}), "measured_on": UNTRAINED_NOTE}
    student.to("cpu")
    free_device_memory(device)
    return fixed


class _ProbeDone(Exception):
    """Raised by the probe's step hook once its steps have run."""


class _StopAfter:
    """A :data:`~kdsearch.distill.hooks.StepHook` that ends the call after ``steps`` full steps."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if step > self.steps:
            raise _ProbeDone
        return loss


def _memory_probe(
    ctx: WorkerContext, student: torch.nn.Module, spec: Any, teacher: PreparedTeacher, hyper: Any, seed: int,
    fixed: Measurements,
) -> dict[str, Any]:
    """Run :data:`PROBE_STEPS` KD steps of a copy of ``student`` (CUDA only) and set
    ``probe_peak_memory_mb`` in ``fixed``. Returns ``{"oom": message}`` when the probe ran out of
    memory, else ``{}``."""
    cfg, device = ctx.cfg, ctx.device
    how = {"method": f"{PROBE_STEPS} KD training steps of a copy of the untrained student before the box",
           "steps": PROBE_STEPS, "batch_size": cfg.distill.batch_size, "resolution": spec.resolution,
           "train_dtype": ctx.train_dtype}
    tracker = KDMemoryTracker(device)
    if not tracker.available:  # no allocator counters: the CPU
        fixed.set_missing("probe_peak_memory_mb", f"the memory probe runs on CUDA only; this worker runs on {device.type}",
                          {**how, "method": "skipped"})
        return {}
    probe = copy.deepcopy(student)
    out: dict[str, Any] = {}
    try:
        with tracker:
            distill(
                probe, train=ctx.train_source, val=ctx.bundle.val, bundle=ctx.bundle, teacher_source=teacher.source,
                hyper=hyper, cfg=cfg.distill, time_box_s=cfg.study.trial_time_s, resolution=spec.resolution,
                device=device, seed=seed, view_spec=ctx.view_spec, eval_batch_size=cfg.measure.eval_batch_size,
                on_step=_StopAfter(PROBE_STEPS), meters=(tracker,), train_dtype=ctx.train_dtype,
            )
    except _ProbeDone:
        pass
    except torch.OutOfMemoryError as exc:
        out["oom"] = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
    finally:
        del probe
        free_device_memory(device)
    if tracker.value_mb is not None:
        fixed.set("probe_peak_memory_mb", tracker.value_mb, {**how, **tracker.method()})
    else:
        fixed.set_missing("probe_peak_memory_mb", out.get("oom") or str(tracker.reason or "not measured"),
                          {**how, **tracker.method()})
    return out


def _known_verdict(cfg: StudyConfig, m: Measurements) -> tr.Verdict:
    """The verdict of a trial that ends before its final check: value - limit for each fixed
    cost measured; a fixed cost that could not be measured is infeasible (as in the final check:
    it will not be measured later), with its reason; 0.0 ("not known to be violated") for a
    constraint that needs training."""
    return tr.constraint_verdict(cfg.constraints, m.values, m.missing, [n for n in cfg.constraints if is_fixed_cost(n)])


def _screen_out(
    trial: optuna.Trial, cfg: StudyConfig, fixed: Measurements, constraints: dict[str, float], reason: str
) -> None:
    """End the trial before the box: store what was measured and the violations, and raise
    :class:`optuna.TrialPruned` (told PRUNED, infeasible; the sampler learns from its constraints)."""
    _set_attrs(trial, fixed.to_user_attrs())
    for metric, violation in constraints.items():
        trial.set_constraint(metric, violation)
    # The objectives it has (fixed costs); the rest (accuracy, ...) needs training: None.
    _set_attrs(trial, tr.screened_attrs(constraints, reason, {n: fixed.values.get(n) for n in cfg.metric_names}))
    raise optuna.TrialPruned(f"screened before training: {reason}")


class _RecordingStore:
    """An :class:`OptunaRungStore` that remembers the competitors each decision was taken against."""

    def __init__(self, inner: OptunaRungStore) -> None:
        self.inner = inner
        self.seen: dict[int, list[RungEntry]] = {}

    def record(self, key: int, rung_index: int, fraction: float, values: Any, train_s: float) -> None:
        self.inner.record(key, rung_index, fraction, values, train_s)

    def competitors(self, key: int, rung_index: int) -> list[RungEntry]:
        found = self.inner.competitors(key, rung_index)
        self.seen[rung_index] = list(found)
        return found


def _rung_pruner(trial: optuna.Trial, cfg: StudyConfig, fixed: Measurements, box_s: float) -> RungPruner | None:
    """The ``on_eval`` hook of ``study.pruning`` (None when it is off): rung vectors are the
    validation accuracy and the fixed-cost objectives (log scale for counts and MACs). With a
    searched box (``study.trial_time`` a list) a trial competes only with trials of its own box:
    a rung is a fraction of the box and the LR schedule follows it, so the accuracy at 1/9 of a
    2-minute box and at 1/9 of a 10-minute one are not comparable (one bracket per box)."""
    p = cfg.study.pruning
    if not p.enabled:
        return None
    names = [n for n in cfg.metric_names if n != "val_accuracy" and is_fixed_cost(n)]
    values = [fixed.values.get(n) for n in names]
    return RungPruner(
        key=trial.number,
        store=_RecordingStore(OptunaRungStore(
            trial, ["val_accuracy", *names], bracket={"box_s": box_s} if cfg.study.box_searched else None)),
        config=PruningConfig(eta=p.eta, min_fraction=p.min_fraction, min_competitors=p.min_competitors),
        fixed_values=[math.nan if v is None else float(v) for v in values],
        directions=["maximize", *(cfg.objectives[n] for n in names)],
        scales=["linear", *("log" if metric_unit(n) in ("count", "MACs") else "linear" for n in names)],
    )


def _pruning_record(pruner: RungPruner, eval_every_fraction: float) -> dict[str, Any]:
    """User attr ``pruning``: the decisions, the curve, and what each decision was taken against
    (the rule's settings and the competitors' rung vectors), so :func:`decide_at_rung` can
    recompute it from storage alone."""
    store = pruner.store
    seen = store.seen if isinstance(store, _RecordingStore) else {}
    names = store.inner.names if isinstance(store, _RecordingStore) else []
    c = pruner.config
    return {
        **pruner.summary(),
        "eta": c.eta, "min_fraction": c.min_fraction, "min_competitors": c.min_competitors,
        "rungs": list(c.rungs), "names": names, "directions": list(pruner.directions),
        "bracket": store.inner.bracket if isinstance(store, _RecordingStore) else None,
        "scales": list(pruner.scales or ()), "eval_every_fraction": eval_every_fraction,
        "competitors": {str(k): [[e.key, list(e.values)] for e in v] for k, v in seen.items()},
    }


def _store_pruned(
    trial: optuna.Trial, cfg: StudyConfig, m: Measurements, fixed: Measurements, pruner: RungPruner,
    student: torch.nn.Module | None, device: torch.device,
) -> None:
    """Store a trial stopped at a rung (its figures so far, the rung, rank and front, its known
    constraint violations) and raise :class:`optuna.TrialPruned`."""
    d = pruner.pruned_at
    assert d is not None
    m.update(fixed)
    _set_attrs(trial, m.to_user_attrs())
    _set_attrs(trial, tr.pruned_attrs(d.rung, d.rung_index, d.rank, d.front, d.reason))
    cons = _known_verdict(cfg, m).violations
    for metric, violation in cons.items():
        trial.set_constraint(metric, violation)
    trial.set_user_attr(tr.CONSTRAINT_VIOLATIONS, cons)
    if student is not None:  # None in a rehearsal: nothing to free
        del student
        free_device_memory(device)
    raise optuna.TrialPruned(f"pruned at rung {d.rung:.3g} of the box: {d.reason}")


def _kd_history(result: DistillResult) -> dict[str, Any]:
    """User attr ``kd_history``: the validation curve (training s, accuracy) and the loop's counts."""
    return {
        "val": [[round(t, 3), a] for t, a in result.val_history],
        "steps": result.steps,
        "epochs": result.epochs,
        "images_seen": result.images_seen,
        "final_train_loss": result.final_train_loss,
        "stopped_early": result.stopped_early,
        "stop_requested_s": result.stop_requested_s,
        "cooldown_s": result.cooldown_s,
        "teacher_forward_count": result.teacher_forward_count,
        "train_dtype": result.train_dtype,
        "eval_time_s": result.eval_time_s,
        "final_eval_time_s": result.final_eval_time_s,
        "evaluations": result.evaluations,
    }


def _store_kd_memory(m: Measurements, tracker: KDMemoryTracker) -> None:
    """``peak_kd_memory_mb`` (above the baseline) and ``peak_kd_memory_total_mb``, one method."""
    how = tracker.method()
    for name, value in (("peak_kd_memory_mb", tracker.value_mb), ("peak_kd_memory_total_mb", tracker.total_mb)):
        if value is not None:
            m.set(name, value, how)
        else:
            m.set_missing(name, str(tracker.reason or "no training segment was measured"), how)


def _store_kd_energy(m: Measurements, meter: EnergyMeter, result: DistillResult) -> None:
    """``kd_energy_j`` over the training steps, per training image seen, and as mean power."""
    e = meter.result
    how = e.to_dict() if e is not None else None
    names = ("kd_energy_j", "kd_energy_mj_per_image", "kd_mean_power_w")
    if e is None or e.joules is None:
        reason = f"{e.method}: {e.reason}" if e is not None else "meter did not run"
        for name in names:
            m.set_missing(name, reason, how)
        return
    m.set("kd_energy_j", e.joules, how)
    if result.images_seen > 0:
        m.set("kd_energy_mj_per_image", e.joules * 1000.0 / result.images_seen,
              {**(how or {}), "images": result.images_seen})
    else:
        m.set_missing("kd_energy_mj_per_image", "no training image was seen", how)
    if e.mean_power_w is not None:
        m.set("kd_mean_power_w", e.mean_power_w, how)
    else:
        m.set_missing("kd_mean_power_w", "the window had no length", how)
