"""Live progress for ``kdsearch optimize``.

On a terminal: a rich live panel with the budget (used, left, ETA), trial counts (done, failed,
infeasible, pruned: stopped at a rung or screened out before the box), the current trial's phase with a bar, and the best value so far per objective. When
the output is not a terminal (CI, ``| tee``, nohup): plain, timestamped log lines, one per phase
change and per finished trial, so logs stay readable.
"""

from __future__ import annotations

import time
from typing import Any

import optuna
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kdsearch import trial_record as tr
from kdsearch.config import StudyConfig, format_duration
from kdsearch.metrics import format_metric

__all__ = ["SearchDisplay"]


class SearchDisplay:
    """Receives progress callbacks from the runner and renders them."""

    def __init__(self, cfg: StudyConfig, console: Console, *, live: bool | None = None) -> None:
        self.cfg = cfg
        self.console = console
        self.live_mode = console.is_terminal if live is None else live
        self.t0 = time.monotonic()
        self.budget_s = cfg.study.budget_s
        self.done = 0
        self.failed = 0
        self.infeasible = 0
        self.pruned = 0  # PRUNED: stopped at a rung (study.pruning) or screened out before the box
        self.best: dict[str, float] = {}
        self.phase = "starting"
        self.phase_msg = ""
        self.fraction: float | None = None
        self.trial_times: list[float] = []
        self._last_line = 0.0
        self._last_phase = ""
        self._live: Live | None = None
        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                             TimeElapsedColumn(), console=console)
        self._task = self._bar.add_task("phase", total=1.0)

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> SearchDisplay:
        if self.live_mode:
            self._live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(*exc)
            self._live = None

    def note(self, text: str) -> None:
        """A line of information above the live panel (or a plain line)."""
        (self._live.console if self._live is not None else self.console).print(text, highlight=False, markup=False)

    # -- callbacks -----------------------------------------------------------------------------
    def progress(self, phase: str, fraction: float | None, message: str) -> None:
        self.phase, self.fraction, self.phase_msg = phase, fraction, message
        if self._live is not None:
            self._bar.update(self._task, completed=fraction or 0.0, description=f"{phase:<8} {message}"[:60])
            self._live.update(self._render())
            return
        now = time.monotonic()
        key = f"{phase}:{message}"
        # Plain mode: one line when the phase changes, at most one per 10 s otherwise.
        if key != self._last_phase or now - self._last_line > 10.0:
            pct = f" {100 * fraction:5.1f}%" if fraction is not None else ""
            self.console.print(f"[{format_duration(now - self.t0):>8}] {phase:<11}{pct} {message}", highlight=False)
            self._last_line, self._last_phase = now, key

    def trial_end(self, trial: optuna.trial.FrozenTrial | None, wall_s: float) -> None:
        if trial is None:
            return
        self.trial_times.append(wall_s)
        state = trial.state
        if state == optuna.trial.TrialState.COMPLETE:
            self.done += 1
            if trial.user_attrs.get(tr.FEASIBLE) is False:
                self.infeasible += 1
            else:
                for metric, direction, value in zip(self.cfg.metric_names, self.cfg.directions, trial.values or [], strict=False):
                    cur = self.best.get(metric)
                    better = cur is None or (value > cur if direction == "maximize" else value < cur)
                    if better:
                        self.best[metric] = value
        elif state == optuna.trial.TrialState.PRUNED:
            self.pruned += 1
        else:
            self.failed += 1
        line = self._trial_line(trial, wall_s)
        if self._live is not None:
            self._live.console.print(line, highlight=False)
            self._live.update(self._render())
        else:
            self.console.print(line, highlight=False)

    def _trial_line(self, trial: optuna.trial.FrozenTrial, wall_s: float) -> str:
        ua = trial.user_attrs
        head = f"trial {trial.number:>4} {ua.get(tr.STUDENT, '?'):<24}"
        if self.cfg.study.box_searched and isinstance(ua.get(tr.BOX_S), (int, float)):
            head += f" box {format_duration(float(ua[tr.BOX_S]))}"
        if trial.state == optuna.trial.TrialState.COMPLETE:
            vals = ", ".join(f"{m}={format_metric(m, v)}" for m, v in zip(self.cfg.metric_names, trial.values or [], strict=False))
            tag = "" if ua.get(tr.FEASIBLE, True) else f"  infeasible: {ua.get(tr.INFEASIBLE_REASON, '')}"
            return f"{head} COMPLETE {vals} ({format_duration(wall_s)}){tag}"
        if trial.state == optuna.trial.TrialState.PRUNED:
            if ua.get(tr.SCREENED):
                why = f"screened before training: {ua.get(tr.SCREEN_REASON, '')}"
            else:
                rung = ua.get(tr.PRUNED_RUNG)
                at = f"at rung {rung:.3g} of the box" if isinstance(rung, (int, float)) else "at a rung"
                why = f"{at}, {ua.get(tr.PRUNE_REASON, '')}"
            return f"{head} PRUNED {why} ({format_duration(wall_s)})"
        return f"{head} {trial.state.name} {ua.get(tr.FAIL_REASON, '')}: {ua.get(tr.FAIL_DETAIL, '')} ({format_duration(wall_s)})"

    # -- rendering -----------------------------------------------------------------------------
    def _render(self) -> Panel:
        used = time.monotonic() - self.t0
        left = max(self.budget_s - used, 0.0)
        mean_trial = sum(self.trial_times) / len(self.trial_times) if self.trial_times else None
        eta = f"~{int(left // mean_trial)} more trials" if mean_trial else "estimating"
        head = Table.grid(padding=(0, 2))
        head.add_row(
            f"[bold]{self.cfg.study.name}[/]",
            f"budget {format_duration(used)} used / {format_duration(left)} left ({eta})",
        )
        head.add_row(
            f"trials: [green]{self.done} done[/], [red]{self.failed} failed[/], [yellow]{self.infeasible} infeasible[/], "
            f"[magenta]{self.pruned} pruned[/]",
            box_text(self.cfg.study.trial_times_s),
        )
        best = Table(box=None, show_header=True, header_style="bold")
        best.add_column("objective")
        best.add_column("direction")
        best.add_column("best so far", justify="right")
        for metric, direction in zip(self.cfg.metric_names, self.cfg.directions, strict=True):
            best.add_row(metric, direction, format_metric(metric, self.best.get(metric)))
        budget_bar = Progress(TextColumn("budget"), BarColumn(), TextColumn(f"{100 * min(used / self.budget_s, 1):3.0f}%"))
        budget_bar.add_task("b", total=self.budget_s, completed=min(used, self.budget_s))
        return Panel(Group(head, budget_bar, self._bar, best), title="kdsearch optimize", border_style="cyan")


def box_text(boxes_s: tuple[float, ...]) -> str:
    """``box 1m00s per trial``, or ``box searched: 2m00s / 5m00s / 10m00s``."""
    if len(boxes_s) == 1:
        return f"box {format_duration(boxes_s[0])} per trial"
    return "box searched: " + " / ".join(format_duration(b) for b in boxes_s)
