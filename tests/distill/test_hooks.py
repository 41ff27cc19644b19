"""The loop's hooks on their own: the plateau rule, combining rules, the fault injector."""

from __future__ import annotations

import pytest
import torch

from kdsearch.config import EarlyStopConfig
from kdsearch.distill import INJECT_STEP, FaultInjector, PlateauStop, any_stop
from kdsearch.distill.hooks import never_stop, plain_step


@pytest.mark.parametrize(
    ("patience", "min_delta", "accuracies", "stops"),
    [
        # The first value sets the reference; then `patience` values in a row without a gain stop.
        (2, 0.01, [0.5, 0.505, 0.51], [False, False, True]),
        (2, 0.01, [0.5, 0.505, 0.52, 0.525, 0.52], [False, False, False, False, True]),
        (1, 0.0, [0.3, 0.4, 0.4], [False, False, True]),
        (3, 0.0, [0.3, 0.2, 0.2, 0.31, 0.3, 0.3, 0.3], [False, False, False, False, False, False, True]),
    ],
)
def test_plateau_stop(patience: int, min_delta: float, accuracies: list[float], stops: list[bool]) -> None:
    rule = PlateauStop(patience=patience, min_delta=min_delta)
    assert [rule(float(i), i / 10, a) for i, a in enumerate(accuracies)] == stops


def test_plateau_stop_from_config() -> None:
    assert PlateauStop.from_config(EarlyStopConfig(enabled=False)) is None
    rule = PlateauStop.from_config(EarlyStopConfig(enabled=True, patience=4, min_delta=0.01))
    assert isinstance(rule, PlateauStop) and (rule.patience, rule.min_delta) == (4, 0.01)


@pytest.mark.parametrize(("kw", "match"), [({"patience": 0, "min_delta": 0.0}, "patience"),
                                           ({"patience": 1, "min_delta": -0.1}, "min_delta"),
                                           ({"patience": 1, "min_delta": float("nan")}, "min_delta")])
def test_plateau_stop_refuses_bad_arguments(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PlateauStop(**kw)


def test_any_stop_asks_every_rule_and_stops_on_any() -> None:
    calls: list[str] = []

    def rule(name: str, answer: bool):
        def hook(train_s: float, fraction: float, acc: float) -> bool:
            calls.append(f"{name}@{fraction}")
            return answer
        return hook

    combined = any_stop(rule("a", True), None, rule("b", False))
    assert combined(1.0, 0.25, 0.5) is True
    assert calls == ["a@0.25", "b@0.25"]  # b still sees the evaluation after a asked to stop
    assert any_stop(rule("c", False), rule("d", False))(1.0, 0.5, 0.5) is False
    assert any_stop() is never_stop and any_stop(None, None) is never_stop
    single = rule("e", True)
    assert any_stop(None, single) is single


def test_fault_injector_fires_only_at_its_step() -> None:
    loss = torch.tensor(1.5)
    nan = FaultInjector("nan")
    assert nan.step == INJECT_STEP
    assert [nan(s, loss) is loss for s in (1, 2, 4)] == [True, True, True]
    assert torch.isnan(nan(INJECT_STEP, loss))
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        FaultInjector("oom", step=1)(1, loss)
    with pytest.raises(RuntimeError, match="injected error"):
        FaultInjector("error", step=2)(2, loss)
    assert plain_step(7, loss) is loss


@pytest.mark.parametrize(("fault", "step"), [("segfault", 3), ("nan", 0)])
def test_fault_injector_refuses_bad_arguments(fault: str, step: int) -> None:
    with pytest.raises(ValueError):
        FaultInjector(fault, step=step)
