"""Durations in study files and flags: ``90s``, ``30m``, ``24h``, ``1h30m`` -> seconds."""

from __future__ import annotations

import math
import re
from typing import Any

from kdsearch.errors import ConfigError

__all__ = ["parse_duration", "format_duration"]

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|d|h|m|s)")
_UNIT_S = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3}


def parse_duration(value: Any, field_name: str = "duration") -> float:
    """Parse ``90s``, ``30m``, ``24h``, ``1h30m``, ``1.5h`` or a plain number of seconds.

    Returns seconds (float, > 0). Raises :class:`ConfigError` naming ``field_name``.
    """
    if isinstance(value, bool):
        raise ConfigError(field_name, "must be a duration such as 90s, 30m or 24h", value)
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            pos = 0
            seconds = 0.0
            for match in _DURATION_RE.finditer(text):
                if match.start() != pos:
                    break
                seconds += float(match.group(1)) * _UNIT_S[match.group(2)]
                pos = match.end()
            if pos != len(text) or not text:
                raise ConfigError(
                    field_name, "must be a duration such as 90s, 30m, 24h or 1h30m", value
                ) from None
    else:
        raise ConfigError(field_name, "must be a duration such as 90s, 30m or 24h", value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(field_name, "must be a positive duration", value)
    return seconds


def format_duration(seconds: float) -> str:
    """Render seconds as ``1h02m03s`` / ``4m05s`` / ``12.3s`` for humans."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    total = int(round(seconds))
    h, rem = divmod(total, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"

