"""kdsearch.report: the feasible Pareto front, plotly figures, the HTML report.

Reads stored studies only (docs/ARCHITECTURE.md, "Storage contract").
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = [
    "build_report",
    "render_report",
    "feasible",
    "load_trials",
    "metric_columns",
    "pareto_front",
    "trial_rows",
]

_HOME = {"build_report": "html", "render_report": "html"} | {name: "pareto" for name in __all__[2:]}
"""Which module of the package defines each exported name."""


def __getattr__(name: str) -> Any:
    # PEP 562: loaded on first use, so ``kdsearch trials`` (the front, with Optuna) does not load
    # the HTML report's plotly and, through the checkpoint format, torch and timm.
    if name in _HOME:
        return getattr(import_module(f"kdsearch.report.{_HOME[name]}"), name)
    raise AttributeError(f"module 'kdsearch.report' has no attribute {name!r}")
