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

from .nets import small_cnn

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
    with KDMemoryTracker("cuda") as mem:
        x = torch.empty(100_000_000, dtype=torch.uint8, device="cuda")  # 100 MB
        del x
    assert mem.value_mb is not None and mem.baseline_mb is not None
    assert mem.value_mb >= mem.baseline_mb + 100.0
    assert mem.method()["method"] == "torch.cuda.max_memory_allocated"


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
