"""kdsearch: multi-objective search for the best small CNN student to distil from a large teacher.

See README.md and docs/ARCHITECTURE.md. ``load_student(DIR)`` rebuilds an exported student.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_student"]


def load_student(path: str):  # noqa: ANN201 - returns torch.nn.Module; imported lazily
    """Rebuild an exported student from a folder (``model.safetensors`` + ``card.json``) or a file."""
    from kdsearch.export import load_student as _load

    return _load(path)
