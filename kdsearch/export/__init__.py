"""Ship a trial's student: safetensors + model card, TorchScript, or ONNX.

Modules, by concept: ``pick`` (which trial: a number or a ``--pick`` rule), ``formats`` (the
writers and their round-trip verification), ``card`` (what the model card says) and ``trial``
(:func:`export_trial`: download, check, write, verify, publish). The folder staging and card
writing are shared with ``kdsearch finetune`` in :mod:`kdsearch.modelcard`; loading an export is
:func:`kdsearch.checkpoint.load_student`. Reads the study storage only.
"""

from __future__ import annotations

from kdsearch.export.card import export_card
from kdsearch.export.formats import FORMATS, MODEL_FILES, ONNX_OPSET, TOLERANCE
from kdsearch.export.pick import select_trial
from kdsearch.export.trial import ExportResult, export_trial

__all__ = [
    "ExportResult",
    "FORMATS",
    "MODEL_FILES",
    "TOLERANCE",
    "ONNX_OPSET",
    "export_card",
    "export_trial",
    "select_trial",
]
