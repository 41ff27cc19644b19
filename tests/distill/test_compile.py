"""distill.compile: each trial compiles before the clock, or says why it did not.

The ``eager`` backend keeps these fast on a CPU: Dynamo still traces every frame (and counts
against its recompile limit) as with inductor, without generating code.
"""

from __future__ import annotations

import torch
from torch import nn

from kdsearch.distill.compile import NOT_ASKED, _limit_hit, _why_not_compiled, compile_for_training


class Net(nn.Module):
    """One class for every depth: the same ``forward`` code object, as students of one family
    (a new depth is a new graph: Dynamo cannot make a layer count dynamic)."""

    def __init__(self, depth: int, width: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.blocks = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(depth - 1))
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.stem(x))
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(self.drop(x.mean((2, 3))))


def test_off_is_the_model_itself() -> None:
    net = Net(4)
    model, info = compile_for_training(net, (2, 3, 8, 8), "cpu", enabled=False)
    assert model is net and not info.compiled and info.reason == NOT_ASKED and info.compile_time_s is None
    assert info.to_attrs()["compiled"] is False


def test_it_compiles_before_the_clock_and_leaves_no_trace() -> None:
    torch.manual_seed(0)
    net = Net(4).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    model, info = compile_for_training(net, (2, 3, 8, 8), "cpu", enabled=True, backend="eager")
    assert info.compiled and info.reason is None and info.compile_time_s is not None and info.compile_time_s > 0
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(torch.get_rng_state(), rng)  # same dropout draws with or without compiling
    assert model is not net and model(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_every_new_architecture_compiles() -> None:
    """Ten students of new input and layer widths in one worker all compile: Dynamo's cache is
    reset per trial, so earlier students never count against its recompile limit (8)."""
    for i in range(10):
        _, info = compile_for_training(nn.Sequential(nn.Linear(4 + i, 3)), (2, 4 + i), "cpu", enabled=True,
                                       backend="eager")
        assert info.compiled and info.reason is None, (i, info)


# Dynamo's counters after it gave up on a frame at the limit (torch 2.14, recorded on this machine
# with 12 models compiled without a reset): frames total 1, ok 0, and this graph-break entry.
LIMIT_COUNTERS = {
    "frames": {"total": 1, "ok": 0},
    "unimplemented": {"Dynamo recompile limit exceeded\n  Explanation: Dynamo attempted to recompile the code "
                      "object too many times, exceeding the recompile_limit cache size limit (currently set to 8).": 1},
}


def test_the_recompile_limit_is_named_when_dynamo_gives_up() -> None:
    assert _limit_hit(LIMIT_COUNTERS)
    assert _why_not_compiled(LIMIT_COUNTERS) == "Dynamo's recompile limit was reached: Dynamo recompile limit exceeded"
    assert not _limit_hit({"frames": {"total": 1, "ok": 1}})
    assert _why_not_compiled({"frames": {}}) == "Dynamo compiled no frame (no reason recorded)"


def test_a_compiler_failure_trains_eagerly_and_says_why() -> None:
    def broken(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> None:
        raise RuntimeError("no C++ compiler here")

    torch._dynamo.reset()
    net = Net(3)
    model, info = compile_for_training(net, (2, 3, 8, 8), "cpu", enabled=True, backend=broken)  # type: ignore[arg-type]
    assert model is net and not info.compiled and "no C++ compiler here" in str(info.reason)
