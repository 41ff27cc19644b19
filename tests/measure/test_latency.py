from __future__ import annotations

import time

import pytest
import torch

from kdsearch.config import LatencyConfig
from kdsearch.measure import LatencyResult, measure_latency, measure_latency_on_cpu
from kdsearch.measure.latency import latency_stats

from .nets import SleepNet, small_cnn

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
