"""The export formats and their round-trip check.

Every writer saves the model, loads it back with the runtime a user would use (safetensors:
:func:`kdsearch.checkpoint.load_student`; TorchScript: ``torch.jit.load``; ONNX: onnxruntime on the
CPU) and compares its outputs with the PyTorch model on a seeded batch of :data:`VERIFY_BATCH`
images: a max |difference| above :data:`TOLERANCE` (or NaN) is an :class:`ExportError`, and the
caller then writes nothing. ONNX files have a dynamic batch dimension (opset :data:`ONNX_OPSET`,
input ``input``, output ``logits``); TorchScript is traced at the spec resolution.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdsearch.checkpoint import MODEL_FILE, load_student
from kdsearch.constants import EXPORT_FORMATS
from kdsearch.errors import ExportError
from kdsearch.measure.runtime_ort import ONNX_OPSET, ORT_EXTRA, export_onnx, onnxruntime_missing, ort_session
from kdsearch.models import StudentSpec

__all__ = [
    "FORMATS",
    "MODEL_FILES",
    "TOLERANCE",
    "ONNX_OPSET",
    "VERIFY_SEED",
    "VERIFY_BATCH",
    "verify_safetensors",
    "write_torchscript",
    "write_onnx",
    "verification_record",
]

FORMATS = EXPORT_FORMATS  # the writers below, one per format
MODEL_FILES = {"safetensors": MODEL_FILE, "torchscript": "model.pt", "onnx": "model.onnx"}
TOLERANCE = 1e-4  # max |output difference| allowed between an export and the PyTorch model
VERIFY_SEED = 0
VERIFY_BATCH = 3  # > 1 and != the tracing batch, so the ONNX dynamic batch dimension is exercised
_RUNTIMES = {"torchscript": "torch.jit.load", "onnx": "onnxruntime CPUExecutionProvider",
             "safetensors": "kdsearch.load_student"}


def _verify_batch(spec: StudentSpec, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(VERIFY_SEED)
    return torch.randn(n, spec.in_chans, spec.resolution, spec.resolution, generator=g)


@torch.no_grad()
def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).float()


def _check_diff(fmt: str, diff: float) -> float:
    if not diff <= TOLERANCE:  # also catches NaN
        raise ExportError(
            f"--format {fmt}: the exported model's outputs differ from PyTorch by {diff:.3g} "
            f"(max allowed {TOLERANCE:g}); the export was not written"
        )
    return diff


def verify_safetensors(model: nn.Module, spec: StudentSpec, folder: Path) -> float:
    """Max |output difference| of the folder's ``model.safetensors`` against ``model``."""
    reloaded = load_student(folder)
    x = _verify_batch(spec, VERIFY_BATCH)
    diff = float((_reference(reloaded, x) - _reference(model, x)).abs().max())
    return _check_diff("safetensors", diff)


def write_torchscript(model: nn.Module, spec: StudentSpec, path: Path) -> float:
    """Trace ``model`` to ``path`` and return the verified max |output difference|."""
    example = _verify_batch(spec, 2)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # trace deprecation and tracer notes; verified below
        traced = torch.jit.trace(model, example)
        traced.save(str(path))
        loaded = torch.jit.load(str(path), map_location="cpu").eval()
        x = _verify_batch(spec, VERIFY_BATCH)
        diff = float((loaded(x).float() - _reference(model, x)).abs().max())
    return _check_diff("torchscript", diff)


def write_onnx(model: nn.Module, spec: StudentSpec, path: Path) -> float:
    """Export ``model`` to ONNX at ``path`` (dynamic batch) and return the verified max |output difference|.

    The exporter is :func:`kdsearch.measure.runtime_ort.export_onnx`, the one the ``ort-cpu``
    latency of the search used, and the check runs an onnxruntime CPU session.
    """
    missing = onnxruntime_missing()
    if missing is not None:
        raise ExportError(f"--format onnx: needs onnx, onnxscript and onnxruntime ({missing} is missing); {ORT_EXTRA}")
    try:
        export_onnx(model, spec.resolution, spec.in_chans, path)
    except ImportError as exc:
        raise ExportError(f"--format onnx: {exc.name or exc} is not installed; {ORT_EXTRA}") from None
    sess = ort_session(path, threads=0)
    shape = sess.get_inputs()[0].shape
    if isinstance(shape[0], int):
        raise ExportError(f"--format onnx: the batch dimension came out fixed ({shape}); expected a dynamic one")
    x = _verify_batch(spec, VERIFY_BATCH)
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    diff = float((torch.from_numpy(out).float() - _reference(model, x)).abs().max())
    return _check_diff("onnx", diff)


def verification_record(fmt: str, diff: float, safetensors_diff: float) -> dict[str, Any]:
    """The card's ``verification`` entry: what was compared, with what, and the result."""
    record: dict[str, Any] = {
        "format": fmt,
        "max_abs_diff": diff,
        "safetensors_max_abs_diff": safetensors_diff,
        "tolerance": TOLERANCE,
        "batch": VERIFY_BATCH,
        "seed": VERIFY_SEED,
        "input": "torch.randn(batch, C, R, R) from torch.Generator().manual_seed(seed)",
        "runtime": _RUNTIMES[fmt],
    }
    if fmt == "onnx":
        record["opset"] = ONNX_OPSET
        record["dynamic_axes"] = {"input": {"0": "batch"}, "logits": {"0": "batch"}}
    return record
