from __future__ import annotations

import pytest
import torch
from torch import nn

from kdsearch.measure import (
    CUDA_ONLY_REASON,
    KDMemoryTracker,
    activation_peak_mb,
    model_size_bytes,
    model_size_mb,
    peak_inference_memory_mb,
)

from .measure_helpers import small_cnn

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _size_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 10))


def test_model_size_is_exact() -> None:
    # conv 8*3*3*3 + 8 = 224, bn weight+bias 16, linear 8*10 + 10 = 90 -> 330 float32 params;
    # bn buffers: running_mean 8 + running_var 8 float32, num_batches_tracked 1 int64 (8 bytes).
    expected = 330 * 4 + 16 * 4 + 8
    net = _size_net()
    assert model_size_bytes(net) == expected == 1392
    assert model_size_mb(net) == pytest.approx(1392 / 1e6)  # MB = 10^6 bytes
    # fp16 halves the floats; the int64 counter stays 8 bytes.
    assert model_size_bytes(_size_net().half()) == 330 * 2 + 16 * 2 + 8


def test_model_size_counts_shared_weights_once() -> None:
    a = nn.Linear(4, 4, bias=False)
    b = nn.Linear(4, 4, bias=False)
    b.weight = a.weight  # tied
    assert model_size_bytes(nn.Sequential(a, b)) == 16 * 4


def test_activation_peak_matches_hand_count() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),  # in 3*8*8*4 = 768 B, out 4*8*8*4 = 1024 B -> 1792
        nn.ReLU(),  # in 1024 + out 1024 = 2048 (not in place: a new tensor)
        nn.MaxPool2d(2),  # in 1024 + out 4*4*4*4 = 256 -> 1280
        nn.Flatten(),  # a view of its input: 256
        nn.Linear(64, 10),  # 256 + 40 = 296
    )
    assert activation_peak_mb(net, 8, batch_size=1) == pytest.approx(2048 / 1e6)
    # batch 3 triples every tensor
    assert activation_peak_mb(net, 8, batch_size=3) == pytest.approx(3 * 2048 / 1e6)


def test_activation_peak_counts_in_place_output_once() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(256, 2))
    # conv 768 + 1024 = 1792 is now the largest; the in-place ReLU is 1024 (one storage)
    assert activation_peak_mb(net, 8) == pytest.approx(1792 / 1e6)


def test_activation_peak_leaves_the_model_untouched() -> None:
    net = small_cnn()
    net.train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    activation_peak_mb(net, 16)
    assert net.training
    assert not net[0]._forward_hooks
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k])  # BN running stats not updated (ran a copy in eval mode)


def test_cuda_only_figures_on_cpu() -> None:
    with pytest.raises(ValueError, match="CUDA-only"):
        peak_inference_memory_mb(small_cnn(), 16, 1, "cpu")
    with KDMemoryTracker("cpu") as mem:
        torch.zeros(1000)
    assert mem.value_mb is None
    assert mem.reason == CUDA_ONLY_REASON == "cpu: torch.cuda.max_memory_allocated is CUDA-only"
    assert mem.method()["method"] == "unavailable"


def test_tracker_stop_before_start_is_an_error() -> None:
    with pytest.raises(RuntimeError):
        KDMemoryTracker("cpu").stop()


@pytest.mark.gpu
@cuda
def test_peak_inference_memory_exceeds_model_size() -> None:
    net = small_cnn(width=32).cuda()
    size = model_size_mb(net)
    peak1 = peak_inference_memory_mb(net, 64, 1, "cuda")
    peak64 = peak_inference_memory_mb(net, 64, 64, "cuda")
    assert peak1 > size
    # batch 64 holds at least the first conv's output: 64 * 32 * 64 * 64 * 4 bytes
    assert peak64 - size >= 64 * 32 * 64 * 64 * 4 / 1e6
    assert peak64 > peak1


@pytest.mark.gpu
@cuda
def test_kd_memory_tracker_sees_an_allocation() -> None:
    resident = torch.empty(50_000_000, dtype=torch.uint8, device="cuda")  # 50 MB before the trial
    with KDMemoryTracker("cuda") as mem:
        x = torch.empty(100_000_000, dtype=torch.uint8, device="cuda")  # 100 MB
        del x
    assert mem.value_mb is not None and mem.baseline_mb is not None and mem.total_mb is not None
    assert 100.0 <= mem.value_mb < 110.0  # above the baseline: the resident 50 MB are not in it
    assert mem.baseline_mb >= 50.0 and mem.total_mb == pytest.approx(mem.baseline_mb + mem.value_mb)
    assert mem.method()["method"].startswith("torch.cuda.max_memory_allocated over the KD training steps")
    del resident


def test_activation_peak_cpu_fallback_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    import kdsearch.measure.memory as memory

    net = small_cnn()
    meta = activation_peak_mb(net, 24, batch_size=2)

    def no_meta(model: nn.Module) -> nn.Module:
        raise NotImplementedError("no meta kernel")

    monkeypatch.setattr(memory, "meta_copy", no_meta)
    assert activation_peak_mb(net, 24, batch_size=2) == pytest.approx(meta)
    # largest call: the first BatchNorm, in 2*16*24*24*4 + out 2*16*24*24*4 bytes (the conv before
    # it has a 3-channel input; the in-place ReLU after it holds one tensor)
    assert meta == pytest.approx(2 * (2 * 16 * 24 * 24 * 4) / 1e6)


class FakeAllocator:
    """An :class:`AllocatorCounters` with a hand-driven allocator: ``alloc``/``free`` in MB."""

    def __init__(self, resident_mb: float = 0.0) -> None:
        self.allocated = int(resident_mb * 1e6)
        self.peak = self.allocated
        self.syncs = 0

    def alloc(self, mb: float) -> None:
        self.allocated += int(mb * 1e6)
        self.peak = max(self.peak, self.allocated)

    def free(self, mb: float) -> None:
        self.allocated -= int(mb * 1e6)

    def synchronize(self) -> None:
        self.syncs += 1

    def allocated_bytes(self) -> int:
        return self.allocated

    def peak_bytes(self) -> int:
        return self.peak

    def reset_peak(self) -> None:
        self.peak = self.allocated


# (events between start and stop, expected peak above the baseline MB, expected total MB); the
# baseline is 300 MB resident (data, teacher cache). "eval" events run between pause and resume.
TRACKER_CASES = [
    ("training only", [("alloc", 200), ("free", 200)], 200.0, 500.0),
    ("eval excluded", [("alloc", 200), ("free", 200), ("pause",), ("alloc", 1000), ("free", 1000), ("resume",),
                       ("alloc", 150), ("free", 150)], 200.0, 500.0),
    ("later segment higher", [("alloc", 100), ("free", 100), ("pause",), ("resume",), ("alloc", 250)], 250.0, 550.0),
    ("memory kept across eval", [("alloc", 80), ("pause",), ("alloc", 500), ("free", 500), ("resume",),
                                 ("alloc", 40)], 120.0, 420.0),
    ("nothing allocated", [], 0.0, 300.0),
    ("stop while paused", [("alloc", 60), ("free", 60), ("pause",), ("alloc", 900)], 60.0, 360.0),
]


@pytest.mark.parametrize(("name", "events", "above", "total"), TRACKER_CASES, ids=[c[0] for c in TRACKER_CASES])
def test_kd_tracker_accounting(name: str, events: list[tuple], above: float, total: float) -> None:
    """The figure is the training segments' peak above the baseline; validation never enters it."""
    fake = FakeAllocator(resident_mb=300)
    mem = KDMemoryTracker("cpu", counters=fake).start()
    for ev in events:
        if ev[0] == "alloc":
            fake.alloc(ev[1])
        elif ev[0] == "free":
            fake.free(ev[1])
        else:
            getattr(mem, ev[0])()
    assert mem.stop() == pytest.approx(above)
    assert (mem.value_mb, mem.total_mb, mem.baseline_mb) == (pytest.approx(above), pytest.approx(total), 300.0)
    how = mem.method()
    assert how["baseline_mb"] == 300.0 and how["peak_total_mb"] == pytest.approx(total)
    assert "workspaces" in how and how["unit"] == "MB (1e6 bytes)"


def test_kd_tracker_segments_and_idempotence() -> None:
    fake = FakeAllocator(10)
    mem = KDMemoryTracker("cpu", counters=fake)
    with pytest.raises(RuntimeError):
        mem.resume()
    mem.start()
    mem.pause()
    mem.pause()  # a second pause changes nothing
    mem.resume()
    mem.resume()  # nor does a second resume
    assert mem.segments == 2
    mem.stop()
    mem.stop()
    assert mem.value_mb == 0.0 and mem.total_mb == 10.0


def test_kd_tracker_keeps_an_oom_peak_and_never_masks_the_error() -> None:
    fake = FakeAllocator(100)
    with pytest.raises(torch.OutOfMemoryError), KDMemoryTracker("cpu", counters=fake) as mem:
        fake.alloc(700)
        raise torch.OutOfMemoryError("boom")
    assert mem.value_mb == pytest.approx(700.0) and mem.total_mb == pytest.approx(800.0)


def test_distill_pauses_the_tracker_around_validation() -> None:
    """A real distill() on the CPU with a fake allocator charged by the student's forwards: a
    training forward costs 10 MB, an evaluation forward 1000 MB. The figure sees training only."""
    from kdsearch.config import DataConfig, DistillConfig
    from kdsearch.data import ViewSpec, load_data, make_batch_source
    from kdsearch.distill import KDHyper, distill
    from kdsearch.models import StudentSpec, build_student

    bundle = load_data(DataConfig(dataset="synthetic", synthetic_train_size=256, synthetic_test_size=64))
    student = build_student(StudentSpec("vgg", 16, bundle.num_classes, {"depth": 2, "width": 0.125}))
    fake = FakeAllocator(resident_mb=50)
    evals: list[float] = []

    def charge(module: nn.Module, inputs: object, output: object) -> None:
        cost = 10 if module.training else 1000
        fake.alloc(cost)
        fake.free(cost)

    student.register_forward_hook(charge)
    with KDMemoryTracker("cpu", counters=fake) as mem:
        r = distill(
            student, train=make_batch_source(bundle.train, "cpu", resident=True), val=bundle.val, bundle=bundle,
            teacher_source=None, hyper=KDHyper(4.0, 0.0, 0.05), cfg=DistillConfig(batch_size=32),
            time_box_s=0.5, resolution=16, device="cpu", seed=0,
            view_spec=ViewSpec(bundle.image_size, 2, True), meters=(mem,),
            on_eval=lambda t, f, a: evals.append(t) is None and False,
        )
    assert r.steps > 0 and len(evals) == 4
    assert mem.value_mb == pytest.approx(10.0) and mem.total_mb == pytest.approx(60.0)
    # the stretch before distill() is entered (closed by its set-up pause), the first training
    # segment, and one after each in-box validation
    assert mem.segments == 5


@pytest.mark.gpu
@cuda
def test_real_kd_peak_excludes_validation_and_the_resident_data() -> None:
    """On a GPU: 200 MB resident before the trial and a 1 GB allocation during every validation
    pause stay out of peak_kd_memory_mb; a tracker the loop does not pause sees the 1 GB."""
    from kdsearch.config import DataConfig, DistillConfig
    from kdsearch.data import ViewSpec, load_data, make_batch_source
    from kdsearch.distill import KDHyper, distill
    from kdsearch.models import StudentSpec, build_student

    dev = torch.device("cuda", 0)
    bundle = load_data(DataConfig(dataset="synthetic", synthetic_train_size=512, synthetic_test_size=64)).to(dev)
    resident = torch.empty(200_000_000, dtype=torch.uint8, device=dev)

    def fat_validation(train_s: float, fraction: float, acc: float) -> bool:
        x = torch.empty(1_000_000_000, dtype=torch.uint8, device=dev)
        del x
        return False

    def run(meters: tuple) -> None:
        student = build_student(StudentSpec("vgg", 32, bundle.num_classes, {"depth": 2, "width": 0.25}))
        distill(
            student, train=make_batch_source(bundle.train, dev, resident=True), val=bundle.val, bundle=bundle,
            teacher_source=None, hyper=KDHyper(4.0, 0.0, 0.05), cfg=DistillConfig(batch_size=64),
            time_box_s=1.0, resolution=32, device=dev, seed=0, view_spec=ViewSpec(bundle.image_size, 2, True),
            meters=meters, on_eval=fat_validation,
        )

    with KDMemoryTracker(dev) as mem:
        run((mem,))
    with KDMemoryTracker(dev) as whole:
        run(())
    assert mem.value_mb is not None and mem.total_mb is not None and mem.baseline_mb is not None
    assert mem.baseline_mb >= 200.0 and mem.value_mb < 500.0  # a small student's training steps
    assert mem.total_mb == pytest.approx(mem.baseline_mb + mem.value_mb)
    assert whole.value_mb is not None and whole.value_mb >= 1000.0  # unpaused: the validation's 1 GB
    assert mem.segments == 5
    del resident


# -- issue 20 item 4: the same figure in every worker; windows that hold the training steps only ---


def _tiny_run(fake: FakeAllocator | None = None):
    """A synthetic bundle, a tiny student and a distill() caller (CPU)."""
    from kdsearch.config import DataConfig, DistillConfig
    from kdsearch.data import ViewSpec, load_data, make_batch_source
    from kdsearch.distill import KDHyper, distill
    from kdsearch.models import StudentSpec, build_student

    bundle = load_data(DataConfig(dataset="synthetic", synthetic_train_size=256, synthetic_test_size=64))
    student = build_student(StudentSpec("vgg", 16, bundle.num_classes, {"depth": 2, "width": 0.125}))
    source = make_batch_source(bundle.train, "cpu", resident=True)

    def run(meters: tuple, *, steps: int | None = None, box_s: float = 0.3, val: object = None, model=None) -> object:
        class Done(Exception):
            pass

        def stop_after(step: int, loss: torch.Tensor) -> torch.Tensor:
            if steps is not None and step > steps:
                raise Done
            return loss

        try:
            return distill(
                model or student, train=source, val=val or bundle.val, bundle=bundle, teacher_source=None,
                hyper=KDHyper(4.0, 0.0, 0.05), cfg=DistillConfig(batch_size=32, eval_subset=16),
                time_box_s=box_s, resolution=16, device="cpu", seed=0,
                view_spec=ViewSpec(bundle.image_size, 2, True), meters=meters, on_step=stop_after,
            )
        except Done:
            return None

    return bundle, student, run


class FakeAutotuner:
    """cuDNN's autotuner (cudnn.benchmark) in one worker, charged to a fake allocator: the first
    training forward of a conv at a new input shape tries algorithms with 500 MB of trial
    workspaces; every training forward holds 10 MB while it runs. ``seen`` is the worker's history."""

    def __init__(self, fake: FakeAllocator, seen: set | None = None) -> None:
        self.fake = fake
        self.seen: set = set() if seen is None else seen

    def hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not module.training:
            return
        key = (type(module).__name__, tuple(inputs[0].shape), tuple(module.weight.shape))
        if key not in self.seen:
            self.seen.add(key)
            self.fake.alloc(500)
            self.fake.free(500)
        self.fake.alloc(10)
        self.fake.free(10)


def _probe_and_box(history: set | None, warm: bool = True) -> tuple[float, float, set]:
    """One worker: the probe (as the objective runs it) then the box, for the same student."""
    from kdsearch.measure.memory import probe_kd_peak

    fake = FakeAllocator(resident_mb=50)
    tuner = FakeAutotuner(fake, history)
    _, student, run = _tiny_run()
    for mod in student.modules():
        if isinstance(mod, nn.Conv2d):
            mod.register_forward_hook(tuner.hook)
    probe = KDMemoryTracker("cpu", counters=fake)
    if warm:
        probe_kd_peak(lambda n, meters: run(tuple(meters), steps=n), probe, 3)
    else:  # the old probe: measured from the first step
        with probe:
            run((probe,), steps=3)
    with KDMemoryTracker("cpu", counters=fake) as box:
        run((box,), box_s=0.3)
    assert probe.value_mb is not None and box.value_mb is not None
    return probe.value_mb, box.value_mb, tuner.seen


def test_probe_and_box_agree_across_workers_with_different_histories() -> None:
    """Worker A has never seen the student's shapes; worker B has (an earlier trial). With the
    autotuner warmed before the probe, all four figures are the training step's own 10 MB."""
    probe_a, box_a, seen = _probe_and_box(None)
    probe_b, box_b, _ = _probe_and_box(set(seen))
    assert seen  # the fake autotuner did see the conv shapes
    assert probe_a == probe_b == box_a == box_b == pytest.approx(10.0)
    # The old probe (measured from its first step) paid the trial workspaces in worker A only.
    old_a, _, _ = _probe_and_box(None, warm=False)
    old_b, _, _ = _probe_and_box(set(seen), warm=False)
    assert old_a == pytest.approx(500.0) and old_b == pytest.approx(10.0)


def test_the_memory_window_leaves_out_the_validation_subset() -> None:
    """The in-box validation subset costs 300 MB on the (fake) device while it exists; it is copied
    inside each validation pause and freed before training resumes, so it is not in the figure."""
    import weakref

    from kdsearch.data import ImageSplit

    fake = FakeAllocator(resident_mb=50)
    bundle, student, run = _tiny_run()

    class ChargedSplit(ImageSplit):
        def subset(self, indices: torch.Tensor) -> ImageSplit:
            out = super().subset(indices)
            fake.alloc(300)
            weakref.finalize(out, fake.free, 300)
            return out

    val = ChargedSplit(bundle.val.images, bundle.val.labels)
    def charge(module: nn.Module, inputs: object, output: object) -> None:
        if module.training:
            fake.alloc(10)
            fake.free(10)

    student.register_forward_hook(charge)
    with KDMemoryTracker("cpu", counters=fake) as mem:
        run((mem,), box_s=0.4, val=val)
    assert mem.value_mb == pytest.approx(10.0)
    assert fake.allocated == int(50 * 1e6)  # every subset copy was freed


class ClockMeter:
    """A :class:`TrainingMeter` that adds up its active wall time (what an energy window spans)."""

    def __init__(self) -> None:
        self.active_s = 0.0
        self.events: list[str] = []
        self._since: float | None = None

    def start(self) -> ClockMeter:
        import time

        self._since = time.perf_counter()
        return self

    def pause(self) -> None:
        import time

        self.events.append("pause")
        if self._since is not None:
            self.active_s += time.perf_counter() - self._since
            self._since = None

    def resume(self) -> None:
        import time

        self.events.append("resume")
        if self._since is None:
            self._since = time.perf_counter()


def test_the_energy_window_opens_and_closes_with_the_training_clock() -> None:
    """A set-up that takes 0.4 s (the student's move to the device) and a validation subset copy
    that takes 0.2 s stay out of a meter distill() drives: its active time is the training clock."""
    import time

    from kdsearch.data import ImageSplit

    bundle, student, run = _tiny_run()

    class SlowMove(type(student)):  # type: ignore[misc]
        def to(self, *args: object, **kwargs: object):  # noqa: ANN202
            time.sleep(0.4)
            return super().to(*args, **kwargs)

    student.__class__ = SlowMove

    class SlowSplit(ImageSplit):
        def subset(self, indices: torch.Tensor) -> ImageSplit:
            time.sleep(0.2)
            return super().subset(indices)

    val = SlowSplit(bundle.val.images, bundle.val.labels)
    meter = ClockMeter().start()
    r = run((meter,), box_s=0.5, val=val)
    meter.pause()
    assert r is not None and meter.events[:2] == ["pause", "resume"]
    assert meter.active_s == pytest.approx(r.kd_time_s, abs=0.1)  # not + 0.4 s set-up, + 0.2 s per subset
