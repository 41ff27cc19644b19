from __future__ import annotations

import time

import pytest
import torch

from kdsearch.config import LatencyConfig
from kdsearch.measure import LatencyResult, measure_latency, measure_latency_on_cpu
from kdsearch.measure.latency import OverBudget, latency_stats

from .measure_helpers import SleepNet, small_cnn

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_stats_match_numpy_percentiles() -> None:
    st = latency_stats([float(v) for v in range(10, 0, -1)])  # 1..10, unsorted on purpose
    assert st["median_ms"] == pytest.approx(5.5)
    assert st["p90_ms"] == pytest.approx(9.1)  # numpy.percentile(1..10, 90)
    assert st["iqr_ms"] == pytest.approx(7.75 - 3.25)
    assert st["mean_ms"] == pytest.approx(5.5)
    assert st["min_ms"] == 1.0


def test_cpu_latency_of_known_cost_and_threads_restored() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        net = SleepNet(ms=5.0)
        net.train()
        cfg = LatencyConfig(warmup=2, min_repeats=10, max_repeats=40, max_time_s=2.0, cpu_threads=1)
        r = measure_latency(net, 8, 1, "cpu", cfg)
        assert isinstance(r, LatencyResult)
        assert 5.0 * 0.7 <= r.median_ms <= 5.0 * 1.3
        assert r.p90_ms >= r.median_ms >= r.min_ms > 0
        assert r.iqr_ms >= 0.0 and r.mean_ms > 0
        assert r.repeats >= cfg.min_repeats
        assert net.calls == cfg.warmup + r.repeats
        assert (r.method, r.device, r.threads, r.batch_size, r.warmup) == ("perf_counter", "cpu", 1, 1, 2)
        # Pinned to cfg.cpu_threads while timing, restored afterwards; eval + inference mode inside.
        assert net.threads_seen == {1}
        assert torch.get_num_threads() == 2
        assert net.training_seen == {False} and net.grad_seen == {False}
        assert net.training is True
    finally:
        torch.set_num_threads(before)


def test_threads_restored_when_forward_raises() -> None:
    class Boom(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            measure_latency(Boom(), 8, 1, "cpu", LatencyConfig(cpu_threads=1))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_stable_module_stops_at_min_repeats() -> None:
    cfg = LatencyConfig(warmup=1, min_repeats=8, max_repeats=200, max_time_s=5.0, target_iqr_ratio=0.1)
    r = measure_latency(SleepNet(ms=4.0), 8, 1, "cpu", cfg)
    assert r.stop_reason == "stable"
    assert r.iqr_ms / r.median_ms < cfg.target_iqr_ratio
    assert cfg.min_repeats <= r.repeats < 40  # far from the cap of 200


def test_noisy_module_runs_to_the_repeat_cap() -> None:
    # 1..9 ms uniform: IQR/median is about 0.8, never below 0.1.
    cfg = LatencyConfig(warmup=1, min_repeats=5, max_repeats=25, max_time_s=30.0, target_iqr_ratio=0.1)
    r = measure_latency(SleepNet(ms=5.0, jitter_ms=4.0), 8, 1, "cpu", cfg)
    assert r.stop_reason == "max_repeats"
    assert r.repeats == 25
    assert r.iqr_ms / r.median_ms > 0.1


def test_noisy_module_stops_at_the_time_cap() -> None:
    cfg = LatencyConfig(warmup=1, min_repeats=5, max_repeats=100_000, max_time_s=0.25, target_iqr_ratio=0.01)
    t = time.perf_counter()
    r = measure_latency(SleepNet(ms=3.0, jitter_ms=2.5), 8, 1, "cpu", cfg)
    wall = time.perf_counter() - t
    assert r.stop_reason == "max_time"
    assert 5 <= r.repeats < 1000
    assert wall < 1.5  # the cap held (one repeat of slack, plus warm-up)


def test_real_cnn_batches_and_cpu_copy_leaves_original() -> None:
    net = small_cnn()
    params_before = [p for p in net.parameters()]
    cfg = LatencyConfig(warmup=2, min_repeats=5, max_repeats=20, max_time_s=0.5)
    r1 = measure_latency(net, 32, 1, "cpu", cfg)
    r8 = measure_latency_on_cpu(net, 32, 8, cfg)
    assert r8.batch_size == 8 and r1.batch_size == 1
    assert r8.median_ms > r1.median_ms > 0  # 8 images cost more than 1
    assert [p for p in net.parameters()] == params_before


def test_budget_stops_after_the_first_slow_forward_with_its_estimate() -> None:
    # 0.3 s per forward; 2 warm-ups + 5 repeats need 2.1 s; the budget is 1 s.
    net = SleepNet(ms=300.0)
    cfg = LatencyConfig(warmup=2, min_repeats=5, max_repeats=50, max_time_s=5.0)
    t = time.perf_counter()
    with pytest.raises(OverBudget) as info:
        measure_latency(net, 8, 4, "cpu", cfg, budget_s=1.0)
    wall = time.perf_counter() - t
    assert net.calls == 1  # judged after the first forward, not after the warm-ups
    assert wall < 0.6
    exc = info.value
    assert exc.estimate_s == pytest.approx(7 * 0.3, rel=0.15)
    assert exc.forward_s == pytest.approx(0.3, rel=0.15)
    assert exc.reason.startswith("over budget: batch 4 estimated 2.")
    assert "2 warm-up + 5 repeats x 30" in exc.reason and "left of measure.max_time" in exc.reason


def test_expected_forward_refuses_before_any_forward() -> None:
    net = SleepNet(ms=1.0)
    cfg = LatencyConfig(warmup=3, min_repeats=10, max_time_s=5.0)
    with pytest.raises(OverBudget, match="estimated 6.5 s"):
        measure_latency(net, 8, 64, "cpu", cfg, budget_s=2.0, expected_forward_s=0.5)
    assert net.calls == 0
    # A prediction that fits runs normally.
    r = measure_latency(net, 8, 1, "cpu", cfg, budget_s=2.0, expected_forward_s=0.001)
    assert r.repeats >= 10 and r.budget_s == 2.0


def test_warmups_are_capped_by_time() -> None:
    net = SleepNet(ms=20.0)
    cfg = LatencyConfig(warmup=1000, min_repeats=3, max_repeats=3, max_time_s=0.2)
    t = time.perf_counter()
    r = measure_latency(net, 8, 1, "cpu", cfg)
    wall = time.perf_counter() - t
    assert 5 <= r.warmup <= 12  # about 0.2 s / 20 ms, never 1000
    assert r.repeats == 3 and net.calls == r.warmup + 3
    assert wall < 0.6
    assert r.first_forward_ms is not None and r.first_forward_ms >= 19.0


def test_budget_ends_the_repeats_past_the_minimum() -> None:
    # Noisy (never stable) and no repeat or time cap in reach: only the budget stops it.
    net = SleepNet(ms=10.0, jitter_ms=9.0)
    cfg = LatencyConfig(warmup=1, min_repeats=3, max_repeats=100_000, max_time_s=60.0, target_iqr_ratio=0.001)
    t = time.perf_counter()
    r = measure_latency(net, 8, 1, "cpu", cfg, budget_s=0.4)
    wall = time.perf_counter() - t
    assert r.stop_reason == "budget"
    assert r.repeats >= 3 and wall < 0.4 + 0.1  # one forward (<= 19 ms) past the deadline, plus slack
    assert r.elapsed_s <= wall


@pytest.mark.gpu
@cuda
def test_cuda_events_agree_with_torch_benchmark_timer() -> None:
    from torch.utils import benchmark

    dev = torch.device("cuda", 0)
    net = small_cnn(width=64).to(dev).eval()
    cfg = LatencyConfig(warmup=10, min_repeats=50, max_repeats=500, max_time_s=3.0)
    r = measure_latency(net, 128, 64, dev, cfg)
    assert r.method == "cuda-events" and r.device.startswith("cuda:0 ") and r.threads is None
    x = torch.randn(64, 3, 128, 128, device=dev)
    bench_before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # same kernels as measure_latency picks
    try:
        with torch.inference_mode():
            t = benchmark.Timer(stmt="net(x)", globals={"net": net, "x": x}).blocked_autorange(
                min_run_time=2.0
            )
    finally:
        torch.backends.cudnn.benchmark = bench_before
    ref_ms = t.median * 1e3
    assert abs(r.median_ms - ref_ms) / ref_ms < 0.10, (r.median_ms, ref_ms)


@pytest.mark.gpu
@cuda
def test_cpu_copy_of_cuda_model_leaves_it_on_cuda() -> None:
    net = small_cnn().cuda()
    r = measure_latency_on_cpu(net, 32, 2, LatencyConfig(min_repeats=3, max_repeats=5, warmup=1))
    assert r.device == "cpu" and r.median_ms > 0
    assert all(p.device.type == "cuda" for p in net.parameters())
