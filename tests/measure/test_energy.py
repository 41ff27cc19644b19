from __future__ import annotations

import math
import os
import sys
import threading
import time
import types
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch

from kdsearch.config import EnergyConfig
from kdsearch.measure import (
    COUNTER_RESET_REASON,
    CPU_REASON,
    EnergyMeter,
    measure_inference_energy,
    nvml_status,
)
from kdsearch.measure.energy import energy_unavailable_reason

from .measure_helpers import small_cnn

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class FakeNVML:
    """A stand-in ``pynvml`` module. ``counter(t)`` -> mJ and ``power(t)`` -> mW are functions of
    seconds since the fake was made; ``None`` makes the call raise NVMLError_NotSupported."""

    def __init__(
        self,
        counter: Callable[[float], int] | None = None,
        power: Callable[[float], float] | None = None,
        pids: tuple[int, ...] = (),
        mig: int = 0,
        init_error: str | None = None,
    ) -> None:
        self.t0 = time.perf_counter()
        self.counter, self.power, self.pids, self.mig, self.init_error = counter, power, pids, mig, init_error
        self.counter_reads: list[int] = []
        self.power_reads: list[tuple[float, float]] = []  # (t since t0, W)
        self.inits = 0
        self.shutdowns = 0
        self.lock = threading.Lock()

    def module(self) -> types.ModuleType:
        fake = self
        mod = types.ModuleType("pynvml")

        class NVMLError(Exception):
            pass

        class NVMLError_NotSupported(NVMLError):  # noqa: N801 - pynvml's spelling
            pass

        def nvmlInit() -> None:
            if fake.init_error:
                raise NVMLError(fake.init_error)
            fake.inits += 1

        def nvmlShutdown() -> None:
            fake.shutdowns += 1

        def nvmlDeviceGetTotalEnergyConsumption(h: object) -> int:
            if fake.counter is None:
                raise NVMLError_NotSupported("Not Supported")
            v = int(fake.counter(time.perf_counter() - fake.t0))
            with fake.lock:
                fake.counter_reads.append(v)
            return v

        def nvmlDeviceGetPowerUsage(h: object) -> int:
            if fake.power is None:
                raise NVMLError_NotSupported("Not Supported")
            t = time.perf_counter() - fake.t0
            mw = fake.power(t)
            with fake.lock:
                fake.power_reads.append((t, mw / 1000.0))
            return int(round(mw))

        mod.NVMLError = NVMLError
        mod.NVMLError_NotSupported = NVMLError_NotSupported
        mod.NVML_TEMPERATURE_GPU = 0
        mod.NVML_DEVICE_MIG_ENABLE = 1
        mod.nvmlInit = nvmlInit
        mod.nvmlShutdown = nvmlShutdown
        mod.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)
        mod.nvmlDeviceGetHandleByUUID = lambda u: ("handle", u)
        mod.nvmlDeviceGetName = lambda h: b"Fake GPU"
        mod.nvmlSystemGetDriverVersion = lambda: "999.01"
        mod.nvmlDeviceGetTemperature = lambda h, kind: 41
        mod.nvmlDeviceGetMigMode = lambda h: (fake.mig, fake.mig)
        mod.nvmlDeviceGetComputeRunningProcesses = lambda h: [
            SimpleNamespace(pid=p, usedGpuMemory=0) for p in fake.pids
        ]
        mod.nvmlDeviceGetTotalEnergyConsumption = nvmlDeviceGetTotalEnergyConsumption
        mod.nvmlDeviceGetPowerUsage = nvmlDeviceGetPowerUsage
        return mod


def _install(monkeypatch: pytest.MonkeyPatch, fake: FakeNVML) -> FakeNVML:
    monkeypatch.setitem(sys.modules, "pynvml", fake.module())
    return fake


def test_counter_path_joules_are_counter_delta(monkeypatch: pytest.MonkeyPatch) -> None:
    # 150 W = 150 mJ per ms, starting from a large counter value.
    fake = _install(monkeypatch, FakeNVML(counter=lambda t: 7_000_000_000 + int(150_000 * t)))
    with EnergyMeter(0, poll_interval_s=0.01) as meter:
        time.sleep(0.3)
    r = meter.result
    assert r is not None and r.method == "nvml-counter" and r.reason is None
    assert r.joules == pytest.approx((fake.counter_reads[-1] - fake.counter_reads[0]) / 1000.0)
    assert r.joules == pytest.approx(150.0 * r.window_s, rel=0.05)
    assert r.mean_power_w == pytest.approx(150.0, rel=0.05)
    assert r.counter_updates is not None and r.counter_updates >= 10  # the poll thread saw it move
    assert (r.gpu_name, r.driver, r.temp_start_c, r.temp_end_c) == ("Fake GPU", "999.01", 41.0, 41.0)
    assert r.shared is False and r.other_pids == []
    assert fake.inits == fake.shutdowns == 1


def test_power_poll_integrates_a_known_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    w = 2 * math.pi / 0.25  # a 4 Hz wave around 100 W

    def power_mw(t: float) -> float:
        return 1000.0 * (100.0 + 50.0 * math.sin(w * t))

    fake = _install(monkeypatch, FakeNVML(counter=None, power=power_mw))
    with EnergyMeter(0, poll_interval_s=0.01) as meter:
        time.sleep(0.6)
    r = meter.result
    assert r is not None and r.method == "nvml-power-poll" and r.reason is None
    assert r.fallback_reason and "Not Supported" in r.fallback_reason
    t0, t1 = fake.power_reads[0][0], fake.power_reads[-1][0]
    analytic_j = 100.0 * (t1 - t0) - 50.0 / w * (math.cos(w * t1) - math.cos(w * t0))
    assert r.joules == pytest.approx(analytic_j, rel=0.03)
    assert r.samples == len(fake.power_reads) >= 20
    assert r.window_s == pytest.approx(t1 - t0, abs=5e-3)
    assert fake.inits == fake.shutdowns == 1


def test_counter_reset_seen_at_the_end_gives_none(monkeypatch: pytest.MonkeyPatch) -> None:
    # Big counter at start; the driver reloads mid-window and the counter restarts near 0.
    def counter(t: float) -> int:
        return 9_000_000 + int(1000 * t) if t < 0.1 else int(1000 * (t - 0.1))

    _install(monkeypatch, FakeNVML(counter=counter))
    with EnergyMeter(0, poll_interval_s=30.0) as meter:  # no poll: only start and end readings
        time.sleep(0.2)
    r = meter.result
    assert r is not None and r.method == "nvml-counter"
    assert r.joules is None and r.reason is not None and r.reason.startswith(COUNTER_RESET_REASON)


def test_counter_reset_seen_mid_window_gives_none_even_if_end_exceeds_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Drops to 0 at 0.1 s, then climbs fast enough to pass the start value before the end.
    def counter(t: float) -> int:
        return 1_000 + int(1000 * t) if t < 0.1 else int(100_000 * (t - 0.1))

    _install(monkeypatch, FakeNVML(counter=counter))
    with EnergyMeter(0, poll_interval_s=0.01) as meter:
        time.sleep(0.3)
    r = meter.result
    assert r is not None and r.method == "nvml-counter"
    assert r.joules is None and r.reason is not None and COUNTER_RESET_REASON in r.reason


def test_counter_that_never_moves_is_not_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, FakeNVML(counter=lambda t: 123_456))
    with EnergyMeter(0, poll_interval_s=0.01) as meter:
        time.sleep(0.05)
    r = meter.result
    assert r is not None and r.joules is None and r.counter_updates == 0
    assert r.reason is not None and "did not update" in r.reason


def test_unavailable_when_pynvml_cannot_be_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with EnergyMeter(0) as meter:
        pass
    r = meter.result
    assert r is not None and r.method == "unavailable" and r.joules is None
    assert r.reason is not None and "pynvml" in r.reason
    status = nvml_status(0)
    assert status["available"] is False and "pynvml" in status["reason"]


def test_unavailable_when_init_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, FakeNVML(counter=lambda t: 0, init_error="Driver Not Loaded"))
    with EnergyMeter(0) as meter:
        pass
    assert meter.result is not None and meter.result.joules is None
    assert meter.result.method == "unavailable" and "Driver Not Loaded" in (meter.result.reason or "")


def test_unavailable_on_a_mig_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _install(monkeypatch, FakeNVML(counter=lambda t: int(1000 * t), mig=1))
    with EnergyMeter(0) as meter:
        pass
    r = meter.result
    assert r is not None and r.method == "unavailable" and r.joules is None
    assert r.reason is not None and r.reason.startswith("mig:")
    assert fake.inits == fake.shutdowns == 1


def test_unavailable_without_counter_or_power(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, FakeNVML(counter=None, power=None))
    with EnergyMeter(0) as meter:
        pass
    r = meter.result
    assert (
        r is not None
        and r.method == "unavailable"
        and r.joules is None
        and "power reading" in (r.reason or "")
    )


def test_unavailable_on_cpu_even_with_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _install(monkeypatch, FakeNVML(counter=lambda t: int(1000 * t)))
    with EnergyMeter.for_device("cpu") as meter:
        pass
    assert meter.result is not None and meter.result.joules is None and meter.result.reason == CPU_REASON
    assert fake.inits == 0  # NVML was not touched for a CPU device
    mj, r = measure_inference_energy(small_cnn(), 16, 4, "cpu", EnergyConfig())
    assert mj is None and r.joules is None and r.method == "unavailable" and r.reason == CPU_REASON
    mj, r = measure_inference_energy(small_cnn(), 16, 4, "cpu", EnergyConfig(enabled=False))
    assert mj is None and r.reason is not None and r.reason.startswith("disabled")


def test_shared_when_another_process_uses_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, FakeNVML(counter=lambda t: int(100_000 * t), pids=(os.getpid(), 4242)))
    with EnergyMeter(0, poll_interval_s=0.01) as meter:
        time.sleep(0.05)
    assert meter.result is not None and meter.result.shared is True and meter.result.other_pids == [4242]
    assert meter.result.joules is not None and meter.result.joules > 0

    _install(monkeypatch, FakeNVML(counter=lambda t: int(100_000 * t), pids=(os.getpid(),)))
    with EnergyMeter(0, poll_interval_s=0.01) as meter:
        time.sleep(0.05)
    assert meter.result is not None and meter.result.shared is False and meter.result.other_pids == []


def test_nvml_status_reports_counter_support(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, FakeNVML(counter=lambda t: 5))
    st = nvml_status(0)
    assert st["available"] and st["energy_counter"] is True and st["gpu_name"] == "Fake GPU"
    _install(monkeypatch, FakeNVML(counter=None, power=lambda t: 1.0))
    assert nvml_status(0)["energy_counter"] is False


def test_result_serialises(monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    _install(monkeypatch, FakeNVML(counter=lambda t: int(100_000 * t)))
    with EnergyMeter(0, poll_interval_s=0.01) as meter:
        time.sleep(0.03)
    assert meter.result is not None
    d = json.loads(json.dumps(meter.result.to_dict()))
    assert d["method"] == "nvml-counter" and d["joules"] > 0


def _paused_window(meter: EnergyMeter) -> None:
    """0.2 s active, 0.3 s paused (a validation), 0.2 s active."""
    time.sleep(0.2)
    meter.pause()
    time.sleep(0.3)
    meter.resume()
    time.sleep(0.2)


@pytest.mark.parametrize("method", ["nvml-counter", "nvml-power-poll"])
def test_a_paused_stretch_is_left_out_of_the_window(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """100 W throughout: the energy is that of the 0.4 s of active time, not of the 0.7 s wall time."""
    if method == "nvml-counter":
        _install(monkeypatch, FakeNVML(counter=lambda t: 5_000_000 + int(100 * 1000 * t)))
    else:
        _install(monkeypatch, FakeNVML(counter=None, power=lambda t: 100_000.0))
    with EnergyMeter(0, poll_interval_s=0.01) as meter:
        _paused_window(meter)
    r = meter.result
    assert r is not None and r.method == method and r.reason is None and r.joules is not None
    assert r.segments == 2
    assert r.window_s == pytest.approx(0.4, abs=0.06) and r.paused_s == pytest.approx(0.3, abs=0.06)
    assert r.joules == pytest.approx(100.0 * r.window_s, rel=0.05)  # not 100 W x 0.7 s
    assert r.mean_power_w == pytest.approx(100.0, rel=0.05)


def test_pause_and_resume_are_no_ops_when_unavailable_or_repeated(monkeypatch: pytest.MonkeyPatch) -> None:
    with EnergyMeter.for_device("cpu") as meter:
        meter.pause()
        meter.resume()
    assert meter.result is not None and meter.result.method == "unavailable"
    _install(monkeypatch, FakeNVML(counter=lambda t: int(100_000 * t)))
    with EnergyMeter(0, poll_interval_s=0.01) as meter:
        time.sleep(0.05)
        meter.resume()  # not paused: nothing happens
        meter.pause()
        meter.pause()  # already paused
    r = meter.result
    assert r is not None and r.segments == 1 and r.joules is not None and r.joules > 0


@pytest.mark.parametrize(
    ("fake", "fragment"),
    [
        (None, "cpu:"),  # a CPU device: no NVML at all
        (FakeNVML(counter=lambda t: int(1000 * t), mig=1), "mig:"),
        (FakeNVML(counter=lambda t: 0, init_error="Driver Not Loaded"), "Driver Not Loaded"),
        (FakeNVML(counter=None, power=None), "power reading"),
        (FakeNVML(counter=lambda t: int(1000 * t)), None),  # the counter works
        (FakeNVML(counter=None, power=lambda t: 50_000.0), None),  # power polling works
    ],
)
def test_energy_unavailable_reason(monkeypatch: pytest.MonkeyPatch, fake: FakeNVML | None, fragment: str | None) -> None:
    if fake is None:
        assert energy_unavailable_reason("cpu") == CPU_REASON
        return
    _install(monkeypatch, fake)
    reason = energy_unavailable_reason(0)
    if fragment is None:
        assert reason is None
    else:
        assert reason is not None and fragment in reason
    assert fake.inits == fake.shutdowns  # the probe closes NVML again


@pytest.mark.gpu
@cuda
def test_real_gpu_inference_energy() -> None:
    net = small_cnn(width=64).cuda()
    mj, r = measure_inference_energy(net, 64, 64, "cuda", EnergyConfig(infer_min_time_s=2.0))
    if r.method == "unavailable" and (r.reason or "").startswith("mig:"):
        pytest.skip(r.reason)
    assert r.method == "nvml-counter", r
    assert mj is not None and mj > 0 and r.joules is not None and r.joules > 0
    assert r.window_s is not None and r.window_s >= 2.0
    assert r.counter_updates is not None and r.counter_updates >= 10  # ~20-100 ms per update
