from __future__ import annotations

import json
import re
import time

import pytest
import torch
from torch import nn

from kdsearch.config import EnergyConfig, LatencyConfig, MeasureConfig
from kdsearch.measure import CPU_REASON, Measurements, measure_inference, measure_latency
from kdsearch.metrics import FIXED_METRICS, metric_unit
from kdsearch.models.spec import StudentSpec

from .measure_helpers import small_cnn


class SlowStudent(nn.Module):
    """A real small CNN whose every forward also sleeps: ``fixed_s`` per forward plus
    ``per_image_s`` per image, like a large student on a slow CPU. Forwards on the ``meta``
    device (shape-only counting) do no arithmetic, so they do not sleep. Counts the real
    forwards per batch size."""

    def __init__(self, fixed_s: float = 0.0, per_image_s: float = 0.0) -> None:
        super().__init__()
        self.net = small_cnn()
        self.fixed_s = fixed_s
        self.per_image_s = per_image_s
        self.forwards: dict[int, int] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "meta":
            b = int(x.shape[0])
            self.forwards[b] = self.forwards.get(b, 0) + 1
            time.sleep(self.fixed_s + self.per_image_s * b)
        return self.net(x)

FAST = LatencyConfig(batch_sizes=(1, 4), warmup=1, min_repeats=3, max_repeats=10, max_time_s=0.2)


def test_measure_inference_on_cpu_fills_every_metric() -> None:
    net = small_cnn()
    net.train()
    m = measure_inference(net, 32, "cpu", MeasureConfig(latency=FAST))
    expected = {
        "latency_ms_b1",
        "latency_p90_ms_b1",
        "latency_ms_b4",
        "latency_p90_ms_b4",
        "peak_infer_memory_mb_b1",
        "peak_infer_memory_mb_b4",
        "model_size_mb",
        "activation_peak_mb_b1",
        "macs",
        "params",
        "infer_energy_mj_per_image",
        "infer_energy_mj_per_image_b1",
        "infer_energy_mj_per_image_b4",
    }
    assert set(m.values) == expected
    for name in expected:
        assert metric_unit(name) is not None, name  # every name is one config knows
    # measured: positive numbers
    # (The CPU energy beside the CPU latency needs "cpu" in the devices: tests/measure/test_energy.py.)
    cuda_only = {n for n in expected if n.startswith(("peak_infer_memory", "infer_energy"))}
    for name in expected - cuda_only:
        v = m.values[name]
        assert isinstance(v, (int, float)) and v > 0, (name, v)
        assert name not in m.missing
    # CUDA-only figures: None with a reason, never 0
    for name in cuda_only:
        assert m.values[name] is None
        assert m.missing[name].startswith("cpu:")
    assert m.missing["infer_energy_mj_per_image"] == CPU_REASON
    assert m.methods["infer_energy_mj_per_image"]["method"] == "unavailable"
    # latency methods: how, where, how often, how spread
    lm = m.methods["latency_ms_b4"]
    assert lm["method"] == "perf_counter" and lm["device"] == "cpu" and lm["batch_size"] == 4
    assert lm["threads"] == 1 and lm["repeats"] >= 3 and lm["spread"] >= 0
    assert m.values["latency_p90_ms_b4"] >= m.values["latency_ms_b4"]
    assert m.values["params"] == sum(p.numel() for p in net.parameters())
    assert net.training  # mode restored
    assert m.elapsed_s > 0
    attrs = m.to_user_attrs()
    json.dumps(attrs)
    assert attrs["missing_metrics"] == m.missing and "methods" in attrs


def test_student_spec_and_cpu_alias() -> None:
    spec = StudentSpec("vgg", 16, 10, {"depth": 2})
    cfg = MeasureConfig(
        latency=LatencyConfig(
            batch_sizes=(2,),
            devices=("auto", "cpu", "cuda"),
            warmup=1,
            min_repeats=3,
            max_repeats=5,
            max_time_s=0.2,
        ),
        energy=EnergyConfig(enabled=False),
    )
    m = measure_inference(small_cnn(), spec, "cpu", cfg)
    # on a CPU trial the _cpu name is the same measurement as the plain one
    assert m.values["latency_ms_b2_cpu"] == m.values["latency_ms_b2"] > 0
    assert m.values["latency_ms_b2_cuda"] is None and "CUDA" in m.missing["latency_ms_b2_cuda"]
    assert m.missing["infer_energy_mj_per_image"].startswith("disabled")
    assert m.methods["macs"]["resolution"] == 16


def test_one_failure_does_not_lose_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    import kdsearch.measure.suite as suite

    def broken(*args, **kwargs):
        raise RuntimeError("ptflops exploded\nsecond line")

    monkeypatch.setattr(suite, "measure_complexity", broken)
    m = measure_inference(small_cnn(), 16, "cpu", MeasureConfig(latency=FAST))
    assert m.values["macs"] is None and m.values["params"] is None
    assert m.missing["macs"] == "error: RuntimeError: ptflops exploded second line"
    assert m.values["latency_ms_b1"] is not None and m.values["model_size_mb"] is not None


def test_a_model_that_fails_to_run_is_missing_everywhere_it_must_be() -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ValueError("shape mismatch")

    m = measure_inference(Broken(), 16, "cpu", MeasureConfig(latency=FAST))
    assert m.values["model_size_mb"] == pytest.approx(12 * 4 / 1e6)
    for name in ("latency_ms_b1", "latency_p90_ms_b4", "activation_peak_mb_b1", "macs"):
        assert m.values[name] is None and m.missing[name].startswith("error: "), name
    assert all(v is None or v != 0 for v in m.values.values())


SLOW_LATENCY = LatencyConfig(
    batch_sizes=(1, 64), devices=("auto", "cpu"), warmup=2, min_repeats=5, max_repeats=50, max_time_s=2.0
)


def test_a_slow_forward_ends_the_phase_inside_its_budget() -> None:
    # 0.3 s per forward: batch 1 needs (2 warm-up + 5 repeats) x 0.3 s = 2.1 s, batch 64 far more.
    net = SlowStudent(fixed_s=0.3)
    budget = 1.0
    t = time.perf_counter()
    m = measure_inference(net, 32, "cpu", MeasureConfig(latency=SLOW_LATENCY), budget_s=budget)
    wall = time.perf_counter() - t
    assert m.elapsed_s <= wall < budget + 0.3  # inside the budget, plus a small tolerance
    assert m.budget_s == budget
    # The cheap figures are there; every latency figure is missing with its estimate.
    assert m.values["macs"] > 0 and m.values["model_size_mb"] > 0
    for name in ("latency_ms_b1", "latency_ms_b64", "latency_p90_ms_b64", "latency_ms_b64_cpu"):
        assert m.values[name] is None, name
        assert m.missing[name].startswith("over budget: batch "), m.missing[name]
        assert "estimated" in m.missing[name] and "left of measure.max_time" in m.missing[name]
    assert m.methods["latency_ms_b64"]["estimate_s"] > budget
    # Batch 1 ran one forward to learn its cost; batch 64 was judged from it, without a forward.
    assert net.forwards == {1: 1}
    assert all(v is None or v != 0 for v in m.values.values())


def test_a_batch_that_cannot_fit_is_missing_and_the_smaller_one_is_measured() -> None:
    # 4 ms per image: batch 1 costs 7 x 4 ms; batch 64 would cost 7 x 256 ms = 1.8 s > 1 s budget.
    net = SlowStudent(per_image_s=0.004)
    t = time.perf_counter()
    m = measure_inference(net, 32, "cpu", MeasureConfig(latency=SLOW_LATENCY), budget_s=1.0)
    wall = time.perf_counter() - t
    assert wall < 1.0 + 0.3
    assert m.values["latency_ms_b1"] == pytest.approx(4.0, rel=0.5)
    assert m.methods["latency_ms_b1"]["budget_s"] is not None
    assert m.values["latency_ms_b64"] is None
    reason = m.missing["latency_ms_b64"]
    assert reason.startswith("over budget: batch 64 estimated ") and "per forward" in reason
    est = m.methods["latency_ms_b64"]["estimate_s"]
    assert 1.0 < est < 4.0  # 7 forwards at about 64 x 4 ms
    assert 64 not in net.forwards  # refused before its first forward


def test_default_budget_comes_from_the_config() -> None:
    assert MeasureConfig().budget_s() == 60.0
    assert MeasureConfig().budget_s(grace_s=30.0) == 15.0
    assert MeasureConfig().budget_s(grace_s=600.0) == 60.0
    assert MeasureConfig(max_time_s=5.0).budget_s(grace_s=600.0) == 5.0
    m = measure_inference(small_cnn(), 16, "cpu", MeasureConfig(latency=FAST, max_time_s=7.0))
    assert m.budget_s == 7.0 and m.values["latency_ms_b4"] is not None


def test_measurements_need_a_reason_for_none() -> None:
    m = Measurements()
    with pytest.raises(ValueError):
        m.set("macs", None)
    m.set_missing("macs", "why")
    m.set("macs", 5)
    assert m.values["macs"] == 5 and "macs" not in m.missing
    other = Measurements()
    other.set_missing("val_accuracy", "not evaluated")
    m.update(other)
    assert m.missing == {"val_accuracy": "not evaluated"}
    assert set(FIXED_METRICS) >= {"macs", "val_accuracy"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_measure_inference_on_cuda() -> None:
    net = small_cnn(width=32).cuda()
    cfg = MeasureConfig(
        latency=LatencyConfig(
            batch_sizes=(1, 16), devices=("auto", "cpu"), min_repeats=5, max_repeats=50, max_time_s=0.5
        ),
        energy=EnergyConfig(infer_min_time_s=2.0),
    )
    m = measure_inference(net, 32, "cuda", cfg)
    for b in (1, 16):
        assert m.values[f"latency_ms_b{b}"] > 0 and m.methods[f"latency_ms_b{b}"]["method"] == "cuda-events"
        assert m.values[f"latency_ms_b{b}_cpu"] > 0 and m.methods[f"latency_ms_b{b}_cpu"]["device"] == "cpu"
        assert m.values[f"peak_infer_memory_mb_b{b}"] > m.values["model_size_mb"]
    if m.values["infer_energy_mj_per_image"] is None:
        assert m.missing["infer_energy_mj_per_image"].startswith(("mig:", "nvml:"))
    else:
        assert m.values["infer_energy_mj_per_image"] == m.values["infer_energy_mj_per_image_b16"] > 0
        # batch 1 keeps the GPU less busy per image: it costs more energy per image than batch 16
        assert m.values["infer_energy_mj_per_image_b1"] > m.values["infer_energy_mj_per_image_b16"]
        assert m.methods["infer_energy_mj_per_image_b1"]["counter_updates"] >= 20 or (
            m.methods["infer_energy_mj_per_image_b1"]["method"] == "nvml-power-poll")
    assert all(p.device.type == "cuda" for p in net.parameters())
    assert re.match(r"cuda:0 ", m.methods["latency_ms_b1"]["device"])
    # the trial's own latency equals a direct call within noise (same method, same device)
    direct = measure_latency(net, 32, 16, "cuda", cfg.latency)
    assert abs(direct.median_ms - m.values["latency_ms_b16"]) / direct.median_ms < 0.25


@pytest.mark.parametrize(
    ("devices", "batch_sizes", "energy"),
    [(("auto",), (1, 4), True), (("auto", "cpu", "cuda"), (1, 2), False), (("cpu",), (2,), True),
     # ONNX export costs 10-20 s on a busy 2-core machine: these run with the slow tests.
     pytest.param(("auto", "cpu", "cuda", "ort-cpu"), (1, 2), False, marks=pytest.mark.slow),
     pytest.param(("ort-cpu",), (2,), True, marks=pytest.mark.slow)],
    ids=["auto", "cpu-cuda-energy-off", "cpu-only", "every-device-energy-off", "ort-only"],
)
def test_the_suite_records_exactly_the_names_the_registry_predicts(
    devices: tuple[str, ...], batch_sizes: tuple[int, ...], energy: bool
) -> None:
    """metrics.produced_metrics (what the study file's validation accepts) against what the
    suite really records for a tiny model: every predicted fixed-cost name is recorded (a value,
    or missing with this machine's reason), and every other recorded name is one the settings
    switched off (missing with reason ``disabled: ...``)."""
    from kdsearch.metrics import MetricSettings, metric_info, produced_metrics

    lat = LatencyConfig(batch_sizes=batch_sizes, devices=devices, warmup=1, min_repeats=3, max_repeats=5,
                        max_time_s=0.1)
    m = measure_inference(small_cnn(width=4), 16, "cpu", MeasureConfig(latency=lat, energy=EnergyConfig(enabled=energy)))
    predicted = {n for n in produced_metrics(MetricSettings(batch_sizes, devices, energy))
                 if metric_info(n).split is None}  # type: ignore[union-attr]
    disabled = {n for n, why in m.missing.items() if why.startswith("disabled")}
    assert set(m.values) - disabled == predicted
    assert disabled == (set() if energy else {n for n in m.values if n.startswith("infer_energy")})
    # On this CPU machine the CPU, auto and ONNX Runtime latencies have values.
    measured = [n for n in predicted if n.startswith("latency") and not n.endswith("_cuda")]
    assert measured and all(m.values[n] is not None for n in measured), m.missing
