"""Where command output goes: a rich console on stdout."""

from __future__ import annotations

from rich.console import Console

__all__ = ["stdout_console"]

PIPE_WIDTH = 160  # columns when stdout is not a terminal


def stdout_console() -> Console:
    """A console on stdout. Logs and pipes get :data:`PIPE_WIDTH` columns, so result tables are
    not folded into narrow columns."""
    console = Console(stderr=False, highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console = Console(stderr=False, highlight=False, soft_wrap=True, width=PIPE_WIDTH)
    return console
