"""The optimize display: a live panel on a terminal, plain log lines otherwise."""

from __future__ import annotations

import io

import optuna
from rich.console import Console

from kdsearch.config import load_config
from kdsearch.progress import SearchDisplay

from cli_helpers import SMOKE


def _trials() -> list[optuna.trial.FrozenTrial]:
    study = optuna.create_study(directions=["maximize", "minimize"])
    good = study.ask()
    good.set_user_attr("student", "vgg3-w0.1@16")
    good.set_user_attr("feasible", True)
    study.tell(good, [0.8, 2.0e6])
    bad = study.ask()
    bad.set_user_attr("student", "vgg5-w0.5@32")
    bad.set_user_attr("fail_reason", "oom")
    bad.set_user_attr("fail_detail", "CUDA out of memory")
    study.tell(bad, state=optuna.trial.TrialState.FAIL)
    worse = study.ask()
    worse.set_user_attr("student", "vgg2-w0.1@16")
    worse.set_user_attr("feasible", False)
    worse.set_user_attr("infeasible_reason", "params=9e+06 > 1e+06")
    study.tell(worse, [0.9, 1.0e6])
    return study.trials


def test_plain_mode_writes_readable_lines_and_tracks_the_best() -> None:
    buf = io.StringIO()
    console = Console(file=buf, width=200, force_terminal=False)
    display = SearchDisplay(load_config(SMOKE), console, live=False)
    with display:
        display.progress("cache", 0.5, "teacher cache ViT-tiny")
        display.progress("cache", 0.6, "teacher cache ViT-tiny")  # same phase: throttled
        display.progress("distil", 0.1, "#0 vgg3-w0.1@16")
        for t in _trials():
            display.trial_end(t, 3.2)
    text = buf.getvalue()
    lines = text.splitlines()
    assert sum("cache" in line for line in lines) == 1
    assert any("distil" in line and "#0" in line for line in lines)
    assert "trial    0 vgg3-w0.1@16" in text and "val_accuracy=80.00%, macs=2 M" in text  # metrics.format_metric
    assert "FAIL oom: CUDA out of memory" in text
    assert "infeasible: params=9e+06 > 1e+06" in text
    assert "\x1b[" not in text  # no terminal control codes in logs
    assert (display.done, display.failed, display.infeasible) == (2, 1, 1)
    # The infeasible trial's better accuracy does not count as the best feasible value.
    assert display.best == {"val_accuracy": 0.8, "macs": 2.0e6}


def test_live_mode_renders_budget_trials_phase_and_best() -> None:
    buf = io.StringIO()
    console = Console(file=buf, width=120, force_terminal=True)
    display = SearchDisplay(load_config(SMOKE), console, live=True)
    with display:
        display.progress("distil", 0.4, "#3 vgg3")
        for t in _trials():
            display.trial_end(t, 3.0)
    out = buf.getvalue()
    for fragment in ("budget", "used", "left", "2 done", "1 failed", "1 infeasible", "best so far", "val_accuracy"):
        assert fragment in out, fragment
