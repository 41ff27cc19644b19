"""Errors a user can act on.

Every :class:`KDSearchError` renders as one line that names the field, the rule, the value and,
where one exists, a fix. The CLI prints that line and exits with code 2; a traceback appears only
with ``--debug``. Internal failures of a single trial (OOM, NaN, timeout) are *not* user errors:
they are :class:`TrialFailure` and are stored on the trial as data.

``kdsearch --help`` imports this module, so it imports nothing that Python has not loaded already
(no ``typing``; ``difflib`` on first use).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "KDSearchError",
    "ConfigError",
    "DataError",
    "TeacherError",
    "CheckpointError",
    "StorageError",
    "StudyMismatchError",
    "ExportError",
    "TrialFailure",
    "FAIL_REASONS",
    "unknown_key_error",
]


class KDSearchError(Exception):
    """Base class of every error shown to a user as one line with exit code 2."""

    exit_code: int = 2

    def __init__(self, message: str) -> None:
        # One line, always: a multi-line message would break the CLI contract.
        super().__init__(" ".join(str(message).split()))


class ConfigError(KDSearchError):
    """A study-file key or CLI flag that breaks a rule.

    The message reads ``<field>: <rule> (got <value>)[; <fix>]``.
    """

    def __init__(self, field: str, rule: str, value: object = None, fix: str | None = None) -> None:
        self.field = field
        self.rule = rule
        self.value = value
        msg = f"{field}: {rule}"
        if value is not None:
            msg += f" (got {value!r})"
        if fix:
            msg += f"; {fix}"
        super().__init__(msg)



def unknown_key_error(section: str, key: str, known: Sequence[str]) -> ConfigError:
    """The one error for a key that a section does not have, suggesting the closest known key."""
    import difflib  # on first use: the CLI imports this module for --help

    m = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
    where = f" in {section}" if section else ""
    hint = f"did you mean {m[0]!r}?" if m else f"known keys: {', '.join(known)}"
    return ConfigError(f"{section}.{key}" if section else str(key), f"unknown key {key!r}{where}; {hint}")


class DataError(KDSearchError):
    """A data set that is missing, unreadable or in the wrong layout."""


class TeacherError(KDSearchError):
    """A teacher that cannot be created (unknown name, offline weights, bad kwargs)."""


class CheckpointError(KDSearchError):
    """A checkpoint whose keys or shapes do not fit the model, or whose hash does not match."""


class StorageError(KDSearchError):
    """A storage URL that cannot be opened, or a study that does not exist."""


class StudyMismatchError(KDSearchError):
    """Resuming a study whose search space or objectives differ from the stored ones."""


class ExportError(KDSearchError):
    """An export that cannot be written or does not verify."""


FAIL_REASONS = ("oom", "diverged", "timeout", "error", "stale", "interrupted", "missing_objective")


class TrialFailure(Exception):
    """A single trial failed in a way that is stored as data (``fail_reason``), not shown as an error.

    ``reason`` is one of :data:`FAIL_REASONS`; ``detail`` is a short human-readable explanation;
    ``attrs`` are extra user attrs to store on the FAIL trial (for example ``peak_kd_memory_mb``).
    """

    def __init__(self, reason: str, detail: str = "", attrs: dict[str, object] | None = None) -> None:
        if reason not in FAIL_REASONS:
            raise ValueError(f"unknown fail reason {reason!r}")
        self.reason = reason
        self.detail = detail
        self.attrs = dict(attrs or {})
        super().__init__(f"{reason}: {detail}" if detail else reason)
