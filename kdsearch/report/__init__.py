"""kdsearch.report: the feasible Pareto front, ``--pick`` rules, plotly figures, the HTML report.

Reads stored studies only (docs/ARCHITECTURE.md, "Storage contract").
"""

from __future__ import annotations

from kdsearch.report.html import build_report, render_report
from kdsearch.report.pareto import (
    PickRule,
    feasible,
    load_trials,
    metric_columns,
    pareto_front,
    parse_pick,
    pick_trial,
    trial_rows,
)

__all__ = [
    "build_report",
    "render_report",
    "PickRule",
    "feasible",
    "load_trials",
    "metric_columns",
    "pareto_front",
    "parse_pick",
    "pick_trial",
    "trial_rows",
]
