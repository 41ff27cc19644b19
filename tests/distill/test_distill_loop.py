"""distill(): time box, schedule, teacher sources, divergence, its hooks and fault injection."""

from __future__ import annotations

import dataclasses
from itertools import pairwise
from pathlib import Path

import pytest
import torch

import kdsearch.distill.hooks as hooks_mod
import kdsearch.distill.loop as loop_mod
from kdsearch.config import DistillConfig, EarlyStopConfig, TeacherCacheConfig, TeacherFitConfig
from kdsearch.data import ViewSpec, make_batch_source
from kdsearch.distill import (
    INJECT_STEP,
    DistillResult,
    FaultInjector,
    KDHyper,
    OnlineTeacher,
    build_or_load_cache,
    distill,
    fit_teacher,
)
from kdsearch.errors import TrialFailure

from distill_helpers import tiny_bundle, tiny_student, tiny_teacher

CHANCE = 0.1  # 10 synthetic classes
SLACK_S = 0.75  # one step past the box on a busy 2-core CPU, plus timer granularity


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    """Data, a teacher fitted for 2.5 s (about 60 % val accuracy), its logit cache, a batch source."""
    bundle = tiny_bundle(train_size=1024)
    d = tmp_path_factory.mktemp("distill")
    teacher, _ = fit_teacher(
        tiny_teacher(bundle.num_classes), bundle, TeacherFitConfig(time_s=2.5, lr=2e-3), d, "cpu"
    )
    cache = build_or_load_cache(teacher, bundle, TeacherCacheConfig(views=4), d, "cpu")
    source = make_batch_source(bundle.train, "cpu", resident=True)
    return bundle, teacher, cache, source


def _run(
    world,
    teacher_source,
    box_s: float,
    *,
    student=None,
    cfg: DistillConfig | None = None,
    hyper: KDHyper | None = None,
    resolution: int = 32,
    **kw,
) -> DistillResult:
    bundle, _, cache, source = world
    student = student or tiny_student(bundle.num_classes, resolution=resolution, width=1 / 8)
    return distill(
        student,
        train=source,
        val=bundle.val,
        bundle=bundle,
        teacher_source=teacher_source,
        hyper=hyper or KDHyper(temperature=4.0, alpha=1.0, lr=0.05),
        cfg=cfg or DistillConfig(),
        time_box_s=box_s,
        resolution=resolution,
        device="cpu",
        seed=0,
        view_spec=cache.view_spec,
        **kw,
    )


def test_cached_kd_learns_from_the_teacher_alone_without_teacher_forwards(world) -> None:
    _, teacher, cache, _ = world
    calls = []
    hook = teacher.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        # alpha = 1: no label term, so the student can only learn if the cached logits belong
        # to the images and views it is shown.
        r = _run(world, cache, 2.5)
    finally:
        hook.remove()
    assert calls == [] and r.teacher_forward_count == 0
    assert r.val_history and max(a for _, a in r.val_history) > CHANCE + 0.1
    assert r.images_seen == r.steps * 128 and r.epochs == pytest.approx(r.images_seen / len(world[0].train))


def test_topk_cache_teaches_too(world, tmp_path: Path) -> None:
    bundle, teacher, _, _ = world
    sparse = build_or_load_cache(teacher, bundle, TeacherCacheConfig(views=4, topk=3), tmp_path, "cpu")
    assert sparse.is_topk
    r = _run(world, sparse, 2.0)  # alpha = 1: the top-3 logits + rest bucket are the only signal
    assert r.teacher_forward_count == 0
    assert r.val_history and max(a for _, a in r.val_history) > CHANCE + 0.1


def test_ce_only_beats_chance_and_respects_the_time_box(world) -> None:
    box = 2.5
    progress: list[tuple[float, str]] = []
    r = _run(world, None, box, hyper=KDHyper(4.0, 0.0, 0.05), progress=lambda f, m: progress.append((f, m)))
    assert r.val_history and max(a for _, a in r.val_history) > CHANCE + 0.1
    assert box <= r.kd_time_s <= box + SLACK_S and not r.stopped_early
    # Validation at every quarter of the box and at the end; its time is not training time.
    times = [t for t, _ in r.val_history]
    assert len(times) == 4 and times[-1] == pytest.approx(r.kd_time_s)
    for i, t in enumerate(times[:-1]):
        assert (i + 1) * box / 4 <= t <= (i + 1) * box / 4 + SLACK_S
    assert r.final_train_loss > 0 and progress and all(0 <= f <= 1 for f, _ in progress)
    assert progress[-1][0] == pytest.approx(1.0)


def test_online_teacher_runs_one_forward_per_step(world) -> None:
    _, teacher, cache, _ = world
    calls = []
    hook = teacher.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        r = _run(world, OnlineTeacher(teacher, cache.view_spec), 0.8, resolution=16)
    finally:
        hook.remove()
    assert r.steps > 0 and r.teacher_forward_count == r.steps == len(calls)


@pytest.mark.parametrize("box_s", [0.6, 1.2])
def test_lr_follows_a_complete_schedule_for_any_box(world, monkeypatch, box_s: float) -> None:
    seen: list[tuple[float, float]] = []
    real = loop_mod.lr_factor

    def recording(progress: float, warmup: float, final: float) -> float:
        f = real(progress, warmup, final)
        seen.append((progress, f))
        return f

    monkeypatch.setattr(loop_mod, "lr_factor", recording)
    cfg = DistillConfig(warmup_fraction=0.2, final_lr_fraction=0.0, batch_size=64)
    r = _run(world, None, box_s, cfg=cfg, resolution=16, student=tiny_student(10, resolution=16, depth=2))
    assert len(seen) == r.steps >= 10
    progress = [p for p, _ in seen]
    factors = [f for _, f in seen]
    assert progress == sorted(progress) and progress[0] < 0.1 and progress[-1] >= 0.85
    top = factors.index(max(factors))
    assert 0.1 <= progress[top] <= 0.35  # the peak is at the end of the warm-up
    assert factors[0] < 0.5 * max(factors) and factors[-1] < 0.2  # rose, then decayed to ~0
    assert all(a <= b + 1e-9 for a, b in pairwise(factors[: top + 1]))
    assert all(a >= b - 1e-9 for a, b in pairwise(factors[top:]))


def test_nan_loss_is_a_diverged_trial_failure(world) -> None:
    with pytest.raises(TrialFailure) as exc:
        _run(world, world[2], 30.0, resolution=16, on_step=FaultInjector("nan"))
    assert exc.value.reason == "diverged" and f"step {INJECT_STEP}" in exc.value.detail


def test_a_huge_learning_rate_diverges(world) -> None:
    hyper = KDHyper(temperature=4.0, alpha=0.5, lr=1e12)
    with pytest.raises(TrialFailure) as exc:
        _run(world, world[2], 30.0, resolution=16, hyper=hyper, cfg=DistillConfig(warmup_fraction=0.0))
    assert exc.value.reason == "diverged"


def test_injected_faults(world, monkeypatch) -> None:
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        _run(world, world[2], 30.0, resolution=16, on_step=FaultInjector("oom"))
    with pytest.raises(RuntimeError, match="injected error"):
        _run(world, world[2], 30.0, resolution=16, on_step=FaultInjector("error"))

    # "hang" sleeps in a loop until killed: make sleep count its calls and escape after a few.
    sleeps: list[float] = []

    class Escaped(Exception):
        pass

    def fake_sleep(s: float) -> None:
        sleeps.append(s)
        if len(sleeps) >= 5:
            raise Escaped

    monkeypatch.setattr(hooks_mod.time, "sleep", fake_sleep)
    with pytest.raises(Escaped):
        _run(world, world[2], 30.0, resolution=16, on_step=FaultInjector("hang"))
    assert len(sleeps) == 5


def test_early_stop_on_plateau_ends_before_the_box(world) -> None:
    cfg = DistillConfig(
        eval_every_fraction=0.1, early_stop=EarlyStopConfig(enabled=True, patience=2, min_delta=1.0)
    )
    r = _run(world, world[2], 4.0, cfg=cfg, resolution=16)
    # 1 reference + 2 without a 100 % gain, then a cool-down of 5 % of the box and the final one.
    assert r.stopped_early and len(r.val_history) == 4
    assert r.stop_requested_s == pytest.approx(r.val_history[2][0])
    assert 0.05 * 4.0 <= r.cooldown_s < 0.05 * 4.0 + SLACK_S
    assert r.kd_time_s == pytest.approx(r.stop_requested_s + r.cooldown_s)
    assert r.kd_time_s < 0.35 * 4.0 + SLACK_S


def test_a_hard_stop_without_cooldown_ends_at_the_stopping_evaluation(world) -> None:
    cfg = DistillConfig(
        eval_every_fraction=0.1,
        early_stop=EarlyStopConfig(enabled=True, patience=2, min_delta=1.0, cooldown_fraction=0.0),
    )
    r = _run(world, world[2], 4.0, cfg=cfg, resolution=16)
    assert r.stopped_early and len(r.val_history) == 3 and r.cooldown_s == 0.0
    assert r.kd_time_s == pytest.approx(r.stop_requested_s)


def test_a_stop_cools_the_lr_down_linearly_to_its_final_value(world, monkeypatch) -> None:
    """After the stop request the LR leaves the cosine and falls linearly to peak *
    final_lr_fraction; no in-box evaluation runs meanwhile; the final evaluation follows."""
    evals: list[float] = []
    lrs: list[tuple[int, float]] = []  # (evaluations so far, lr) per optimiser step

    class RecordingSGD(torch.optim.SGD):
        def step(self, closure=None):  # noqa: ANN001, ANN202
            lrs.append((len(evals), self.param_groups[0]["lr"]))
            return super().step(closure)

    monkeypatch.setattr(loop_mod.torch.optim, "SGD", RecordingSGD)
    box, peak, final = 4.0, 0.05, 0.1
    cfg = DistillConfig(
        eval_every_fraction=0.1, final_lr_fraction=final,
        early_stop=EarlyStopConfig(enabled=True, patience=2, min_delta=1.0, cooldown_fraction=0.25),
    )
    r = _run(world, world[2], box, cfg=cfg, resolution=16, hyper=KDHyper(4.0, 1.0, peak),
             on_eval=lambda t, f, a: evals.append(t) is None and False)
    # 3 in-box, none while cooling, then the final one, which no rule sees (it is at no point of the
    # box's schedule: a rung in the cool-down must not be scored by the annealed model)
    assert r.stopped_early and len(r.val_history) == 4 and len(evals) == 3
    assert r.stop_requested_s == pytest.approx(evals[2])
    assert 0.25 * box <= r.cooldown_s <= 0.25 * box + SLACK_S
    before = [lr for n, lr in lrs if n == 2]
    cooling = [lr for n, lr in lrs if n == 3]
    assert len(cooling) >= 5
    assert all(a >= b - 1e-12 for a, b in pairwise(cooling))  # falls monotonically ...
    assert cooling[-1] == pytest.approx(peak * final, rel=0.25)  # ... to the schedule's final LR
    assert cooling[0] == pytest.approx(before[-1], rel=0.1)  # from where the cosine was


class _EventMeter:
    """A meter that writes its pause and resume calls into ``events``."""

    def __init__(self, events: list[str]) -> None:
        self.events = events

    def pause(self) -> None:
        self.events.append("pause")

    def resume(self) -> None:
        self.events.append("resume")


def test_meters_follow_the_training_clock(world) -> None:
    """Every meter is paused on entry (the set-up is not training), resumed when the training clock
    starts, paused around each validation and resumed after it, never after the last."""
    events: list[str] = []


    def mark(t: float, f: float, a: float) -> bool:
        events.append("eval")
        return False

    r = _run(world, world[2], 1.0, resolution=16, meters=(_EventMeter(events), _EventMeter(events)), on_eval=mark)
    n = len(r.val_history)
    assert n == 4
    one = ["pause", "pause", "eval", "resume", "resume"]
    setup = ["pause", "pause", "resume", "resume"]
    assert events == setup + one * (n - 1) + ["pause", "pause", "eval"]


def test_in_loop_validation_uses_the_training_precision_and_batch(world, monkeypatch) -> None:
    import kdsearch.measure as measure_mod

    seen: list[tuple[int, object]] = []
    real = measure_mod.evaluate_accuracy

    def recording(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        seen.append((args[6], kw.get("autocast_dtype")))
        return real(*args, **kw)

    monkeypatch.setattr(measure_mod, "evaluate_accuracy", recording)
    r = _run(world, world[2], 0.6, resolution=16, cfg=DistillConfig(batch_size=32), eval_batch_size=512)
    assert len(seen) == len(r.val_history) and all(s == (32, None) for s in seen)  # CPU: fp32, batch 32
    assert r.train_dtype == "fp32"


def test_on_eval_sees_every_evaluation_and_can_stop_the_loop(world) -> None:
    box = 4.0
    calls: list[tuple[float, float, float]] = []

    def stop_at_second(train_s: float, fraction: float, val_accuracy: float) -> bool:
        calls.append((train_s, fraction, val_accuracy))
        return len(calls) >= 2

    r = _run(world, world[2], box, cfg=DistillConfig(eval_every_fraction=0.1), resolution=16, on_eval=stop_at_second)
    assert r.stopped_early and len(calls) == 2  # a caller's stop (pruning) ends at once: no cool-down
    assert [(t, a) for t, _, a in calls] == r.val_history  # the same evaluations, in order
    assert all(f == pytest.approx(t / box) for t, f, _ in calls)
    assert 0.2 * box <= r.kd_time_s < 0.2 * box + SLACK_S  # stopped at the second evaluation
    assert r.cooldown_s == 0.0 and r.stop_requested_s == r.kd_time_s


def test_a_stop_asked_at_the_final_evaluation_is_not_an_early_stop(world) -> None:
    fractions: list[float] = []

    def only_at_the_end(train_s: float, fraction: float, val_accuracy: float) -> bool:
        fractions.append(fraction)
        return fraction >= 1.0

    r = _run(world, world[2], 1.0, resolution=16, on_eval=only_at_the_end)
    assert not r.stopped_early and r.kd_time_s >= 1.0
    assert len(fractions) == len(r.val_history) == 4 and fractions[-1] >= 1.0 > fractions[-2]


def test_the_plateau_stop_and_a_caller_rule_both_see_every_evaluation(world) -> None:
    cfg = DistillConfig(
        eval_every_fraction=0.1,
        early_stop=EarlyStopConfig(enabled=True, patience=3, min_delta=1.0, cooldown_fraction=0.0),
    )
    seen: list[float] = []
    r = _run(world, world[2], 4.0, cfg=cfg, resolution=16, on_eval=lambda t, f, a: seen.append(a) is not None)
    assert r.stopped_early and len(r.val_history) == 4  # the plateau rule stopped it, not the caller's
    assert seen == [a for _, a in r.val_history]


def test_on_step_sees_every_step_and_its_loss(world) -> None:
    seen: list[tuple[int, float]] = []

    def record(step: int, loss: torch.Tensor) -> torch.Tensor:
        seen.append((step, float(loss.detach())))
        return loss

    r = _run(world, world[2], 0.5, resolution=16, on_step=record)
    assert [s for s, _ in seen] == list(range(1, r.steps + 1)) and r.steps > 0
    assert all(loss > 0 for _, loss in seen)


def test_max_steps_ends_the_call_after_those_steps_without_evaluating(world) -> None:
    """The memory probe's call: exactly ``max_steps`` full steps of a long box, no evaluation,
    every meter paused at the end, and a result (no exception to catch)."""
    seen: list[int] = []
    events: list[str] = []


    def record(step: int, loss: torch.Tensor) -> torch.Tensor:
        seen.append(step)
        return loss

    r = _run(world, world[2], 60.0, resolution=16, on_step=record, max_steps=3, meters=(_EventMeter(events),))
    assert seen == [1, 2, 3] and r.steps == 3 and r.images_seen == 3 * DistillConfig().batch_size
    assert r.val_history == [] and r.final_val_accuracy is None and r.evaluations == 0
    # Paused through the set-up, resumed with the training clock, paused at the end.
    assert events == ["pause", "resume", "pause"] and 0 < r.kd_time_s < 60.0
    with pytest.raises(ValueError, match="max_steps"):
        _run(world, world[2], 1.0, resolution=16, max_steps=0)


def test_a_cache_for_other_views_is_refused(world) -> None:
    bundle, _, cache, source = world
    with pytest.raises(ValueError, match="built for"):
        distill(
            tiny_student(10),
            train=source,
            val=bundle.val,
            bundle=bundle,
            teacher_source=cache,
            hyper=KDHyper(4.0, 0.9, 0.05),
            cfg=DistillConfig(),
            time_box_s=1.0,
            resolution=16,
            device="cpu",
            seed=0,
            view_spec=dataclasses.replace(cache.view_spec, padding=2),
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_channels_last_distill(tmp_path: Path) -> None:
    bundle = tiny_bundle(train_size=512)
    dev = torch.device("cuda")
    teacher = tiny_teacher(bundle.num_classes)
    teacher.model.to(dev)
    cache = build_or_load_cache(teacher, bundle, TeacherCacheConfig(views=2), tmp_path, dev)
    assert cache.views.device.type == "cuda" and cache.logits.device.type == "cuda"
    gpu_bundle = dataclasses.replace(bundle, train=bundle.train.to(dev), val=bundle.val.to(dev))
    source = make_batch_source(gpu_bundle.train, dev, resident=True)
    student = tiny_student(bundle.num_classes, resolution=32, width=1 / 4)
    torch.cuda.reset_peak_memory_stats(dev)
    r = distill(
        student,
        train=source,
        val=gpu_bundle.val,
        bundle=gpu_bundle,
        teacher_source=cache,
        hyper=KDHyper(4.0, 0.9, 0.05),
        cfg=DistillConfig(),
        time_box_s=2.0,
        resolution=32,
        device=dev,
        seed=0,
        view_spec=ViewSpec(bundle.image_size, 4, True),
    )
    assert r.steps > 10 and r.teacher_forward_count == 0 and 2.0 <= r.kd_time_s <= 2.5
    assert next(student.parameters()).device.type == "cuda"
    conv = next(m for m in student.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    online = OnlineTeacher(teacher, cache.view_spec)
    idx = torch.arange(64, device=dev)
    vid = torch.zeros(64, dtype=torch.long, device=dev)
    live = online.teacher_logits(cache.views[vid, idx], gpu_bundle.train.images[idx])
    torch.testing.assert_close(cache.teacher_logits(vid, idx), live, rtol=0.05, atol=0.05)  # bf16 both ways


def test_the_largest_allowed_patience_fires_before_the_end(world) -> None:
    """eval_every_fraction 0.25 leaves 3 in-box evaluations; patience 2 (the config's maximum)
    stops at the third, with box time left."""
    cfg = DistillConfig(
        eval_every_fraction=0.25, early_stop=EarlyStopConfig(enabled=True, patience=2, min_delta=1.0)
    )
    box = 2.0
    r = _run(world, world[2], box, cfg=cfg, resolution=16)
    assert r.stopped_early and r.stop_requested_s is not None
    assert 0.75 * box <= r.stop_requested_s < 0.75 * box + SLACK_S and len(r.val_history) == 4


def test_a_cooldown_never_runs_past_the_box(world) -> None:
    box = 3.0
    r = _run(world, world[2], box, cfg=DistillConfig(eval_every_fraction=0.2, early_stop=EarlyStopConfig(
        enabled=True, patience=3, min_delta=1.0, cooldown_fraction=0.5)), resolution=16)  # stops at the 4th
    assert r.stopped_early and r.stop_requested_s is not None and r.stop_requested_s >= 0.8 * box
    assert r.cooldown_s <= box - r.stop_requested_s + SLACK_S and r.kd_time_s <= box + SLACK_S


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["fp16", "fp32", "bf16"])
def test_cuda_trains_in_each_precision(tmp_path: Path, dtype: str) -> None:
    """fp16 (autocast + GradScaler, for GPUs without bf16), fp32 and bf16 all train and say so."""
    bundle = tiny_bundle(train_size=512)
    dev = torch.device("cuda")
    gpu_bundle = dataclasses.replace(bundle, train=bundle.train.to(dev), val=bundle.val.to(dev))
    student = tiny_student(bundle.num_classes, resolution=32, width=1 / 4)
    r = distill(
        student, train=make_batch_source(gpu_bundle.train, dev, resident=True), val=gpu_bundle.val,
        bundle=gpu_bundle, teacher_source=None, hyper=KDHyper(4.0, 0.0, 0.05), cfg=DistillConfig(),
        time_box_s=1.5, resolution=32, device=dev, seed=0, view_spec=ViewSpec(bundle.image_size, 4, True),
        train_dtype=dtype,
    )
    assert r.train_dtype == dtype and r.steps > 10
    assert r.val_history and max(a for _, a in r.val_history) > CHANCE + 0.05


def test_in_box_evaluations_use_a_fixed_stratified_val_subset_and_the_final_one_all_of_val(world, monkeypatch) -> None:
    import kdsearch.measure as measure_mod

    bundle = world[0]
    seen: list[tuple[int, list[int]]] = []
    real = measure_mod.evaluate_accuracy

    def recording(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        split = args[1]
        seen.append((len(split), torch.bincount(split.labels, minlength=bundle.num_classes).tolist()))
        return real(*args, **kw)

    monkeypatch.setattr(measure_mod, "evaluate_accuracy", recording)
    n_val = len(bundle.val)
    subset = n_val // 2
    r = _run(world, world[2], 1.0, resolution=16, cfg=DistillConfig(batch_size=32, eval_subset=subset))
    assert len(seen) == len(r.val_history) >= 2
    *interim, final = seen
    assert final[0] == n_val  # the stored accuracy is on all of val
    assert all(n == subset for n, _ in interim)  # every in-box evaluation: the subset ...
    assert len({tuple(c) for _, c in interim}) == 1  # ... the same images each time
    full = torch.bincount(bundle.val.labels, minlength=bundle.num_classes).float()
    counts = torch.tensor(interim[0][1]).float()
    assert torch.allclose(counts / counts.sum(), full / full.sum(), atol=1.5 / subset * bundle.num_classes)  # stratified
    none = _run(world, world[2], 0.6, resolution=16, cfg=DistillConfig(batch_size=32, eval_subset=None))
    assert none.val_history


def test_eval_at_adds_evaluations_to_the_grid_and_their_time_is_not_training_time(world) -> None:
    """Rungs off the grid (1/9 and 1/3 with an evaluation every half box) are evaluated as well,
    each once, in order; nothing else is added. The validation passes' wall time is recorded
    apart from kd_time_s, the final pass (all of val) separately."""
    box = 3.0
    fractions: list[float] = []

    def record(train_s: float, fraction: float, val_accuracy: float) -> bool:
        fractions.append(fraction)
        return False

    r = _run(world, world[2], box, resolution=16, cfg=DistillConfig(batch_size=32, eval_every_fraction=0.5),
             on_eval=record, eval_at=(1 / 9, 1 / 3, 1.0, 0.0))
    *in_box, last = fractions
    assert last >= 1.0
    # One evaluation at or just past each of 1/9, 1/3, 1/2 (the first step boundary after it).
    assert len(in_box) == 3, fractions
    for got, want in zip(in_box, (1 / 9, 1 / 3, 1 / 2), strict=True):
        assert want <= got < want + SLACK_S / box
    assert r.evaluations == len(fractions) == len(r.val_history)
    assert 0.0 < r.final_eval_time_s < r.eval_time_s  # the final pass, plus three subset passes
    plain = _run(world, world[2], 1.0, resolution=16, cfg=DistillConfig(batch_size=32, eval_every_fraction=0.5))
    assert plain.evaluations == 2  # the grid alone: 1/2 and the end
