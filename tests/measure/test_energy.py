"""kdsearch's energy definitions on top of Zeus, tested at the adapter's boundary on the CPU.

A stand-in for :class:`zeus.monitor.ZeusMonitor` (begin/end windows, the GPU and CPU device
managers) is injected; its counters and clock are driven by the test, so every figure below is
known exactly. Zeus's own NVML, power-polling and RAPL code is Zeus's project's to exercise.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from kdsearch.config import EnergyConfig, config_from_dict
from kdsearch.errors import ConfigError
from kdsearch.measure import CPU_REASON, EnergyMeter, measure_inference_energy
from kdsearch.measure.energy import (
    COUNTER_RESET_REASON,
    MIN_COUNTER_UPDATES,
    cpu_energy_unavailable_reason,
    energy_unavailable_reason,
    nvml_status,
)
from kdsearch.search.preflight import check_measurable

from .measure_helpers import small_cnn

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class FakeGPUs:
    """Zeus's GPU manager: one GPU whose cumulative counter (mJ) the test moves."""

    def __init__(self, counter: bool = True) -> None:
        self.mj = 5_000_000.0
        self.counter = counter
        self.reads = 0

    def __len__(self) -> int:
        return 1

    def get_name(self, i: int) -> str:
        return "Fake GPU"

    def supports_get_total_energy_consumption(self, i: int) -> bool:
        return self.counter

    def get_total_energy_consumption(self, i: int) -> float:
        self.reads += 1
        return self.mj

    def get_gpu_temperature(self, i: int) -> int:
        return 55


class FakeCPUs:
    """Zeus's RAPL manager: two packages sharing the test's counter (mJ, half each)."""

    def __init__(self) -> None:
        self.mj = 1_000_000.0

    def __len__(self) -> int:
        return 2

    def get_total_energy_consumption(self, i: int) -> SimpleNamespace:
        return SimpleNamespace(cpu_mj=self.mj / 2, dram_mj=None)


class FakeMonitor:
    """ZeusMonitor stand-in: a window's energy is the counter's change between begin and end (J),
    its time the fake clock's. ``end_error`` makes end_window raise."""

    def __init__(self, counter: bool = True) -> None:
        self.gpus = FakeGPUs(counter)
        self.cpus = FakeCPUs()
        self.clock = 0.0
        self.open: dict[str, tuple[float, float, float]] = {}
        self.windows = 0
        self.end_error: Exception | None = None

    def begin_window(self, key: str, sync_execution: bool = True) -> None:
        assert key not in self.open  # the adapter never reuses a live key
        self.open[key] = (self.clock, self.gpus.mj, self.cpus.mj)
        self.windows += 1

    def end_window(self, key: str, sync_execution: bool = True) -> SimpleNamespace:
        t, g, c = self.open.pop(key)
        if self.end_error is not None:
            raise self.end_error
        return SimpleNamespace(time=self.clock - t, gpu_energy={0: (self.gpus.mj - g) / 1000.0},
                               cpu_energy={0: (self.cpus.mj - c) / 2000.0, 1: (self.cpus.mj - c) / 2000.0})

    def run(self, seconds: float, watts: float) -> None:
        """``seconds`` at ``watts`` on the GPU and on the CPU packages."""
        self.clock += seconds
        self.gpus.mj += watts * seconds * 1000.0
        self.cpus.mj += watts * seconds * 1000.0


def test_a_paused_stretch_is_left_out_and_segments_are_summed() -> None:
    """Two training segments (2 s at 100 W, 3 s at 120 W) around a 1 s validation at 500 W."""
    mon = FakeMonitor()
    with EnergyMeter(mon, "gpu", 0) as meter:
        mon.run(2.0, 100.0)
        meter.pause()
        mon.run(1.0, 500.0)  # validation: not in the figure
        meter.pause()  # a second pause changes nothing
        meter.resume()
        meter.resume()  # nor does a second resume
        mon.run(3.0, 120.0)
    r = meter.result
    assert r is not None and r.method == "zeus-counter" and r.reason is None
    assert r.joules == pytest.approx(200.0 + 360.0)
    assert (r.segments, r.window_s) == (2, pytest.approx(5.0))
    assert r.mean_power_w == pytest.approx(560.0 / 5.0)
    assert r.gpu_name == "Fake GPU" and r.backend == "FakeGPUs" and r.temp_start_c == 55.0
    assert mon.windows == 2 and not mon.open  # one Zeus window per segment, all closed
    assert meter.stop() is r  # idempotent


@pytest.mark.parametrize(
    ("name", "drive", "fragment"),
    [
        ("counter never moved", lambda mon: setattr(mon, "clock", 0.01), "did not update"),
        ("counter reset", lambda mon: setattr(mon.gpus, "mj", 10.0), COUNTER_RESET_REASON),
        ("reading failed", lambda mon: setattr(mon, "end_error", RuntimeError("NVML gone")), "NVML gone"),
    ],
)
def test_an_untrustworthy_window_is_missing_with_a_reason_never_zero(name: str, drive: object, fragment: str) -> None:
    mon = FakeMonitor()
    meter = EnergyMeter(mon, "gpu", 0).start()
    drive(mon)  # type: ignore[operator]
    r = meter.stop()
    assert r.joules is None and r.mean_power_w is None and fragment in (r.reason or ""), r


def test_unavailable_meters_say_why_and_ignore_pause_and_resume() -> None:
    meter = EnergyMeter.for_device("cpu").start()
    meter.pause()
    meter.resume()
    r = meter.stop()
    assert (r.joules, r.method, r.reason) == (None, "unavailable", CPU_REASON)
    r = EnergyMeter(None, unavailable_reason="zeus: no GPU energy here (NVML missing)").start().stop()
    assert r.method == "unavailable" and "NVML missing" in (r.reason or "")
    assert energy_unavailable_reason("cpu") == CPU_REASON


def test_counter_updates_are_counted_in_order() -> None:
    mon = FakeMonitor()
    meter = EnergyMeter(mon, "gpu", 0).start()
    for mj in (1.0, 1.0, 2.0, 3.0, 3.0, 3.0, 7.0):
        mon.gpus.mj = mj
        meter.note_counter()
    assert meter.counter_updates_so_far == 3


@pytest.mark.parametrize("on_cpu", [False, True], ids=["gpu-board", "cpu-rapl"])
def test_inference_energy_per_image_is_exact(on_cpu: bool) -> None:
    """Each forward of a batch of 4 costs 4 x 5 mJ on the fake counter: 5 mJ/image, warm-up
    forwards excluded, the window at least the minimum time and MIN_COUNTER_UPDATES changes."""
    mon = FakeMonitor()
    net = small_cnn(width=4)

    def charge(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
        mon.gpus.mj += 5.0 * output.shape[0]
        mon.cpus.mj += 5.0 * output.shape[0]
        mon.clock += 0.001

    net.register_forward_hook(charge)
    cfg = EnergyConfig(infer_min_time_s=0.5, poll_interval_s=0.0001)  # cap 1.5 s: room for 20 bursts under load
    mj, r = measure_inference_energy(net, 16, 4, "cpu", cfg, on_cpu=on_cpu, monitor=mon)
    assert r.method == ("zeus-rapl" if on_cpu else "zeus-counter") and r.reason is None
    assert mj == pytest.approx(5.0)
    assert r.counter_updates is not None and r.counter_updates >= MIN_COUNTER_UPDATES
    assert net.training  # left as it was


def test_inference_without_a_counter_runs_the_minimum_time() -> None:
    """Zeus's power polling (no counter): no updates to count, the window ends at the minimum."""
    mon = FakeMonitor(counter=False)
    net = small_cnn(width=4)
    net.register_forward_hook(lambda m, i, o: mon.run(0.001, 80.0))
    mj, r = measure_inference_energy(net, 16, 2, "cpu", EnergyConfig(infer_min_time_s=0.05), monitor=mon)
    assert r.method == "zeus-power-poll" and r.counter_updates is None and mj is not None and mj > 0


def test_inference_energy_disabled_or_unavailable_is_missing() -> None:
    net = small_cnn(width=4)
    mj, r = measure_inference_energy(net, 16, 1, "cpu", EnergyConfig(enabled=False))
    assert mj is None and "disabled" in (r.reason or "")
    mj, r = measure_inference_energy(net, 16, 1, "cpu", EnergyConfig())
    assert mj is None and r.reason == CPU_REASON


@pytest.mark.skipif(any(os.path.exists(p) for p in ("/sys/class/powercap/intel-rapl",)), reason="RAPL present")
def test_cpu_energy_is_missing_with_the_reason_where_rapl_is_not_readable() -> None:
    """This machine has no /sys/class/powercap: the edge figure is missing, never 0, and an
    objective on it is refused before the study starts."""
    reason = cpu_energy_unavailable_reason()
    assert reason is not None and "powercap" in reason
    net = small_cnn(width=4)
    mj, r = measure_inference_energy(net, 16, 1, "cpu", EnergyConfig(), on_cpu=True)
    assert mj is None and r.reason == reason
    cfg = config_from_dict({"objectives": {"val_accuracy": "maximize", "infer_energy_mj_per_image_b1_cpu": "minimize"},
                            "measure": {"latency": {"devices": ["auto", "cpu"]}}})
    with pytest.raises(ConfigError, match="objectives.infer_energy_mj_per_image_b1_cpu: needs CPU energy"):
        check_measurable(cfg)
    check_measurable(cfg, cpu_energy_reason=None)  # readable RAPL: accepted


def test_the_suite_stores_the_cpu_energy_beside_the_cpu_latency() -> None:
    from kdsearch.config import LatencyConfig, MeasureConfig
    from kdsearch.measure import measure_inference

    cfg = MeasureConfig(latency=LatencyConfig(batch_sizes=(1,), devices=("auto", "cpu"), warmup=1, min_repeats=3, max_repeats=3))
    m = measure_inference(small_cnn(width=4), 16, "cpu", cfg)
    reason = cpu_energy_unavailable_reason()
    if reason is None:
        assert m.values["infer_energy_mj_per_image_b1_cpu"] > 0
    else:
        assert m.values["infer_energy_mj_per_image_b1_cpu"] is None
        assert m.missing["infer_energy_mj_per_image_b1_cpu"] == reason


def test_status_never_raises() -> None:
    status = nvml_status(0)
    assert "available" in status and "rapl" in status
    assert status["available"] or status["reason"]


@pytest.mark.gpu
@cuda
def test_real_gpu_inference_energy() -> None:
    net = small_cnn(width=64).cuda()
    mj, r = measure_inference_energy(net, 64, 64, "cuda", EnergyConfig(infer_min_time_s=2.0))
    if r.method == "unavailable" and (r.reason or "").startswith("mig:"):
        pytest.skip(r.reason)
    assert r.method in ("zeus-counter", "zeus-power-poll"), r
    assert mj is not None and mj > 0 and r.joules is not None and r.joules > 0
    assert r.window_s is not None and r.window_s >= 2.0
    if r.method == "zeus-counter":
        assert r.counter_updates is not None and r.counter_updates >= 10  # ~20-100 ms per update
