from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdsearch.measure import measure_complexity

from .measure_helpers import tiny_vgg


def test_macs_and_params_match_a_hand_count(capsys) -> None:
    # tiny_vgg at 16x16, one image. What ptflops' module hooks count (see complexity.py):
    # conv: Cout*H*W*Cin*k*k, plus Cout*H*W for the bias; BN (affine): 2 * elements;
    # ReLU: elements; pools: input elements; linear: in*out + out; Flatten: nothing.
    conv1 = 8 * 16 * 16 * 3 * 3 * 3 + 8 * 16 * 16  # 55296 + 2048 = 57344
    bn1 = 2 * 8 * 16 * 16  # 4096
    relu1 = 8 * 16 * 16  # 2048
    pool1 = 8 * 16 * 16  # 2048 (input elements)
    conv2 = 16 * 8 * 8 * 8 * 3 * 3 + 16 * 8 * 8  # 73728 + 1024 = 74752
    bn2 = 2 * 16 * 8 * 8  # 2048
    relu2 = 16 * 8 * 8  # 1024
    pool2 = 16 * 8 * 8  # 1024
    linear = 256 * 10 + 10  # 2570
    macs_expected = conv1 + bn1 + relu1 + pool1 + conv2 + bn2 + relu2 + pool2 + linear
    assert macs_expected == 146_954
    params_expected = (8 * 3 * 9 + 8) + 2 * 8 + (16 * 8 * 9 + 16) + 2 * 16 + (256 * 10 + 10)
    assert params_expected == 4010

    net = tiny_vgg()
    macs, params = measure_complexity(net, 16)
    assert (macs, params) == (macs_expected, params_expected)
    # ptflops printed nothing and left no trace on the model (it ran on a copy)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert not any(hasattr(m, "__flops__") for m in net.modules())
    assert all(not m._forward_hooks for m in net.modules())


def test_conv_macs_scale_with_resolution_squared() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False))
    m32, _ = measure_complexity(net, 32)
    m64, _ = measure_complexity(net, 64)
    assert m32 == 4 * 32 * 32 * 3 * 9
    assert m64 == 4 * m32


def test_frozen_parameters_are_counted() -> None:
    net = tiny_vgg()
    for p in net[:8].parameters():
        p.requires_grad_(False)
    assert measure_complexity(net, 16)[1] == 4010
    assert not any(p.requires_grad for p in net[:8].parameters())  # the original is untouched


class _Attention(nn.Module):
    """Fused attention through F.scaled_dot_product_attention, as timm's ViT blocks do."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)


class _Tokens(nn.Module):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4, bias=False)  # 16x16 -> 4x4 = 16 tokens
        self.attn = _Attention()
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)  # [1, 16, 8]
        if self.fused:
            return self.attn(t)
        q = k = v = t.reshape(1, 16, 2, 4).transpose(1, 2)
        return ((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(1, 16, 8)


def test_attention_products_are_counted() -> None:
    embed = 8 * 4 * 4 * 3 * 4 * 4  # 8 out channels x 16 positions x (3*4*4)
    qkv = 16 * 8 * 24  # 16 tokens x 8 in x 24 out
    attn = 2 * 16 * 16 * (4 + 4)  # heads * L * S * (E + Ev): QK^T then AV
    assert measure_complexity(_Tokens(fused=True), 16)[0] == embed + qkv + attn
    # the unfused @ path (no qkv linear here) counts the same two products
    assert measure_complexity(_Tokens(fused=False), 16)[0] == embed + attn


def test_cpu_fallback_counts_the_same(monkeypatch) -> None:
    import kdsearch.measure.complexity as complexity

    fast = measure_complexity(tiny_vgg(), 16)

    def no_meta(model):
        raise NotImplementedError("no meta kernel")

    monkeypatch.setattr(complexity, "meta_copy", no_meta)
    assert measure_complexity(tiny_vgg(), 16) == fast == (146_954, 4010)
