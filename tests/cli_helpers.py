"""Helpers for tests that drive the CLI (a uniquely named module: every test folder can import it)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "studies" / "smoke.yaml"


def run_cli(*args: object) -> int:
    """Run the kdsearch CLI in this process (workers are still separate processes)."""
    from kdsearch.cli import main

    return main([str(a) for a in args])
