"""The values both the command line and the package need, in one module that imports nothing.

``kdsearch --help`` builds its parsers without loading torch, Optuna or the study-file package, so
a default or a list of choices it shows cannot come from the module that uses it. It comes from
here, and that module reads it from here too: one value, nothing to keep equal.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_RUN_DIR",
    "EXPORT_FORMATS",
    "EXPORT_CARD_KIND",
    "FINETUNE_CARD_KIND",
    "QUANTIZE_CHOICES",
    "CALIBRATION_METHODS",
    "DEFAULT_MAX_INT8_DROP",
    "DEFAULT_CALIBRATION_IMAGES",
]

DEFAULT_RUN_DIR = "runs"
"""The run folder (``study.run_dir`` in a study file, ``--run-dir`` on the command line)."""

EXPORT_FORMATS: tuple[str, ...] = ("safetensors", "torchscript", "onnx")
"""What ``kdsearch export --format`` writes (:mod:`kdsearch.export.formats`)."""

EXPORT_CARD_KIND = "kdsearch-student-export"
"""``card.json`` ``kind`` of a ``kdsearch export`` folder (the HTML report links to one)."""

FINETUNE_CARD_KIND = "kdsearch-student-finetune"
"""``card.json`` ``kind`` of a ``kdsearch finetune`` folder."""

QUANTIZE_CHOICES: tuple[str, ...] = ("int8",)
"""``kdsearch export --quantize`` (:mod:`kdsearch.export.quantize`)."""

CALIBRATION_METHODS: tuple[str, ...] = ("minmax", "entropy", "percentile")
"""ONNX Runtime calibration methods for ``--quantize int8``."""

DEFAULT_MAX_INT8_DROP = 0.02
"""Warn when int8 val accuracy drops by more than this fraction (2 points)."""

DEFAULT_CALIBRATION_IMAGES = 512
"""Training images an int8 export calibrates on."""
