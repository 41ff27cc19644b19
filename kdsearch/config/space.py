"""Searchable values: fixed, a categorical choice, or a numeric range."""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kdsearch.errors import ConfigError, unknown_key_error

__all__ = ["Space", "space_field"]


@dataclass(frozen=True)
class Space:
    """A value that is fixed, a categorical choice, or a numeric range.

    Exactly one of ``choices`` (tuple, length >= 1) or ``low``/``high`` is set. A ``choices`` of
    length 1 is a fixed value and is not suggested to Optuna.
    """

    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False

    @property
    def is_fixed(self) -> bool:
        return self.choices is not None and len(self.choices) == 1

    @property
    def fixed_value(self) -> Any:
        assert self.choices is not None and len(self.choices) == 1
        return self.choices[0]

    def values(self) -> list[Any]:
        """Every value (for grid samplers): the choices, or the stepped range. Raises if continuous."""
        if self.choices is not None:
            return list(self.choices)
        if self.step is None:
            raise ValueError("a continuous range has no finite list of values")
        n = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1  # type: ignore[operator]
        vals = [self.low + i * self.step for i in range(n)]  # type: ignore[operator]
        return [int(round(v)) for v in vals] if self.integer else vals

    def contains(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        return self.low <= value <= self.high  # type: ignore[operator]

    def to_yaml(self) -> Any:
        if self.choices is not None:
            return self.choices[0] if self.is_fixed else list(self.choices)
        out: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out

    @classmethod
    def parse(
        cls,
        raw: Any,
        field_name: str,
        kind: type = float,
        allowed: Sequence[Any] | None = None,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> Space:
        """Build a Space from YAML, checking type, the allowed set and numeric bounds."""

        def check_scalar(v: Any) -> Any:
            if kind is str:
                if not isinstance(v, str):
                    raise ConfigError(field_name, "must be a string or a list of strings", v)
            elif kind is int:
                if isinstance(v, bool) or not (
                    isinstance(v, int) or (isinstance(v, float) and v.is_integer())
                ):
                    raise ConfigError(field_name, "must be an integer or a list of integers", v)
                v = int(v)
            else:
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ConfigError(field_name, "must be a number or a list of numbers", v)
                v = float(v)
            if allowed is not None and v not in allowed:
                close = ""
                if kind is str:
                    m = difflib.get_close_matches(str(v), [str(a) for a in allowed], n=1)
                    close = f"did you mean {m[0]!r}?" if m else ""
                raise ConfigError(
                    field_name,
                    f"must be one of {list(allowed)}",
                    v,
                    close or None,
                )
            if kind is not str:
                if minimum is not None and v < minimum:
                    raise ConfigError(field_name, f"must be >= {minimum}", v)
                if maximum is not None and v > maximum:
                    raise ConfigError(field_name, f"must be <= {maximum}", v)
            return v

        if isinstance(raw, Mapping):
            unknown = set(raw) - {"low", "high", "log", "step"}
            if unknown:
                key = sorted(unknown)[0]
                raise unknown_key_error(field_name, key, ["low", "high", "log", "step"])
            if "low" not in raw or "high" not in raw:
                raise ConfigError(field_name, "a range needs both 'low' and 'high'", dict(raw))
            if kind is str:
                raise ConfigError(field_name, "a text value cannot be a range", dict(raw))
            low = check_scalar(raw["low"])
            high = check_scalar(raw["high"])
            if low > high:
                raise ConfigError(field_name, "'low' must be <= 'high'", dict(raw))
            log = raw.get("log", False)
            if not isinstance(log, bool):
                raise ConfigError(f"{field_name}.log", "must be true or false", log)
            if log and low <= 0:
                raise ConfigError(field_name, "a log range needs 'low' > 0", low)
            step = raw.get("step")
            if step is not None:
                if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0:
                    raise ConfigError(f"{field_name}.step", "must be a positive number", step)
                if log:
                    raise ConfigError(field_name, "'step' and 'log' cannot be combined", dict(raw))
            return cls(low=low, high=high, log=log, step=step, integer=kind is int)
        if isinstance(raw, (list, tuple)):
            if not raw:
                raise ConfigError(field_name, "must not be an empty list", list(raw))
            vals = tuple(check_scalar(v) for v in raw)
            if len(set(vals)) != len(vals):
                raise ConfigError(field_name, "must not repeat a value", list(raw))
            return cls(choices=vals, integer=kind is int)
        if raw is None:
            raise ConfigError(field_name, "is required", raw)
        return cls(choices=(check_scalar(raw),), integer=kind is int)



def space_field(
    default: Space,
    *,
    kind: type = float,
    allowed: Sequence[Any] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
) -> Any:
    """A dataclass field holding a :class:`Space`, with the rule its YAML value must follow.

    The loader reads the rule from the field's metadata, so a section (a student family's
    included) declares its own searchable keys in one place.
    """
    rule = {"kind": kind, "allowed": tuple(allowed) if allowed is not None else None,
            "minimum": minimum, "maximum": maximum}
    return field(default=default, metadata={"space": rule})
