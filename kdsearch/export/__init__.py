"""Ship a trial's student: safetensors + model card, TorchScript, or ONNX.

Modules, by concept: ``pick`` (which trial: a number or a ``--pick`` rule), ``formats`` (the
writers and their round-trip verification), ``card`` (what the model card says) and ``trial``
(:func:`export_trial`: download, check, write, verify, publish). The folder staging and card
writing are shared with ``kdsearch finetune`` in :mod:`kdsearch.modelcard`; loading an export is
:func:`kdsearch.checkpoint.load_student`. Reads the study storage only.

The names below load their module on first use (PEP 562), so the HTML report can import
:mod:`kdsearch.export.pick` without the writers' torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

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

_HOME = {
    "ExportResult": "trial",
    "export_trial": "trial",
    "FORMATS": "formats",
    "MODEL_FILES": "formats",
    "TOLERANCE": "formats",
    "ONNX_OPSET": "formats",
    "export_card": "card",
    "select_trial": "pick",
}
"""Which module of the package defines each exported name."""


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(import_module(f"kdsearch.export.{_HOME[name]}"), name)
    raise AttributeError(f"module 'kdsearch.export' has no attribute {name!r}")
