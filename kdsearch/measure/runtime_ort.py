"""ONNX Runtime on the CPU: the deployment runtime as a measured device (``ort-cpu``).

A small student on a datacenter GPU is timed mostly in kernel launches; what an edge device
sees is closer to an ONNX Runtime session on a few CPU cores. This module holds the three pieces
both the measurement suite and ``kdsearch export`` use, so a figure measured during the search
and the file a user ships come from the same exporter and the same session settings:

* :func:`export_onnx`: the student to ONNX, the one exporter of kdsearch (``torch.onnx.export``
  with ``dynamo=True``, opset :data:`ONNX_OPSET`, input ``input``, output ``logits``, a dynamic
  batch dimension), in memory or to a file;
* :func:`ort_session`: an ``InferenceSession`` on the ``CPUExecutionProvider`` with a fixed
  intra-op thread count, one inter-op thread, sequential execution and a named graph
  optimisation level (:data:`GRAPH_OPTIMIZATION_LEVELS`);
* :func:`measure_latency_ort`: ``InferenceSession.run`` on a seeded random batch, timed with
  ``time.perf_counter`` by :func:`kdsearch.measure.latency.time_forwards`: the same warm-ups,
  adaptive repeats and hard budget as the PyTorch latencies.

:func:`ort_method` is what a stored ``*_ort`` figure says about how it was taken (onnxruntime
version, execution provider, intra/inter-op threads, graph optimisation level, opset, exporter).

onnxruntime, onnx and onnxscript are an optional extra (``pip install 'kdsearch[export]'``,
:data:`ORT_EXTRA`); :func:`onnxruntime_missing` names the first one that does not import.
"""

from __future__ import annotations

import importlib
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from kdsearch.config import LatencyConfig
from kdsearch.measure._common import cpu_copy, unwrap_model
from kdsearch.measure.latency import LatencyResult, OverBudget, eval_mode, latency_result, time_forwards

if TYPE_CHECKING:
    import onnxruntime

__all__ = [
    "GRAPH_OPTIMIZATION_LEVELS",
    "ONNX_EXPORTER",
    "ONNX_INPUT",
    "ONNX_OPSET",
    "ONNX_OUTPUT",
    "ORT_DEVICE",
    "ORT_EXTRA",
    "ORT_MODULES",
    "OrtLatency",
    "export_onnx",
    "last_export_s",
    "measure_latency_ort",
    "onnxruntime_missing",
    "ort_method",
    "ort_session",
]

ORT_DEVICE = "ort-cpu"
"""The ``measure.latency.devices`` entry that adds the ``latency_ms_b{N}_ort`` figures."""
ORT_EXTRA = "pip install 'kdsearch[export]'"
"""How to install what ``ort-cpu`` and ``--format onnx`` need."""
ORT_MODULES = ("onnxruntime", "onnx", "onnxscript")
"""What the ONNX path imports: the runtime, and the two the dynamo exporter needs."""
ONNX_OPSET = 18
ONNX_INPUT = "input"
ONNX_OUTPUT = "logits"
ONNX_EXPORTER = "torch.onnx.export(dynamo=True), dynamic batch dimension"
GRAPH_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
"""``measure.latency.ort_optimization`` values, onnxruntime's ``GraphOptimizationLevel`` names
without the ``ORT_ENABLE_`` prefix (``disable`` = ``ORT_DISABLE_ALL``)."""
DEFAULT_EXPORT_ESTIMATE_S = 5.0
"""What an export is assumed to cost (s) before this process has done one: the first export also
imports the exporter (onnxscript), which takes seconds on a small CPU."""
INPUT_SEED = 0

_last_export_s: list[float] = []  # wall times (s) of this process's exports, newest last


def onnxruntime_missing() -> str | None:
    """The first of :data:`ORT_MODULES` that does not import, or None when all do."""
    for name in ORT_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            return name
    return None


def last_export_s() -> float:
    """The estimated cost (s) of the next :func:`export_onnx`: this process's last export, or
    :data:`DEFAULT_EXPORT_ESTIMATE_S` before the first."""
    return _last_export_s[-1] if _last_export_s else DEFAULT_EXPORT_ESTIMATE_S


def _export_estimate_detail() -> str:
    if _last_export_s:
        return "the last ONNX export in this process took as long"
    return "no ONNX export yet in this process: the default estimate, exporter import included"


def export_onnx(model: nn.Module, resolution: int, in_chans: int = 3, path: Path | None = None) -> bytes:
    """The serialised ONNX model of ``model`` for ``in_chans`` x ``resolution`` px input.

    Exported from a float32 CPU copy when ``model`` lives elsewhere or in another dtype (the
    original is never moved), in eval mode, traced on a batch of 2 with a dynamic batch
    dimension. Also written to ``path`` when given. Raises ImportError when onnx or onnxscript
    is missing.
    """
    t0 = time.perf_counter()
    src = unwrap_model(model)  # a torch.compile wrapper exports as the module it wraps
    first = next(iter(src.parameters()), None)
    if first is not None and (first.device.type != "cpu" or first.dtype != torch.float32):
        src = cpu_copy(src, torch.float32)
    example = torch.randn(2, in_chans, resolution, resolution, generator=torch.Generator().manual_seed(INPUT_SEED))
    batch = torch.export.Dim("batch", min=1, max=65536)
    with eval_mode(src), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter notes; the result is verified by its users
        program = torch.onnx.export(
            src,
            (example,),
            None,
            input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT],
            dynamic_shapes=({0: batch},),
            opset_version=ONNX_OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    if program is None:  # pragma: no cover - dynamo=True always returns the program
        raise RuntimeError("torch.onnx.export returned no program")
    data = program.model_proto.SerializeToString()
    if path is not None:
        Path(path).write_bytes(data)
    _last_export_s.append(time.perf_counter() - t0)
    del _last_export_s[:-1]
    return data


def _optimization_level(name: str) -> Any:
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if name not in levels:
        raise ValueError(f"graph optimisation level must be one of {list(levels)}, got {name!r}")
    return levels[name]


def ort_session(
    model: bytes | str | Path, threads: int = 1, optimization: str = "all"
) -> onnxruntime.InferenceSession:
    """A CPU ``InferenceSession`` of ``model`` (serialised bytes or a file): ``threads`` intra-op
    threads (0: onnxruntime's default, one per physical core), one inter-op thread, sequential
    execution, graph optimisation level ``optimization`` (see :data:`GRAPH_OPTIMIZATION_LEVELS`)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = _optimization_level(optimization)
    so.log_severity_level = 3  # errors only: no per-session notes on the console
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])


def ort_method(session: onnxruntime.InferenceSession, threads: int, optimization: str) -> dict[str, Any]:
    """How an ``*_ort`` figure was taken: runtime, version, provider, threads, optimisation, export."""
    import onnxruntime as ort

    return {
        "runtime": "onnxruntime",
        "onnxruntime_version": ort.__version__,
        "execution_provider": session.get_providers()[0],
        "intra_op_threads": int(threads),
        "inter_op_threads": 1,
        "execution_mode": "sequential",
        "graph_optimization_level": optimization,
        "opset": ONNX_OPSET,
        "export": ONNX_EXPORTER,
    }


def measure_latency_ort(
    session: onnxruntime.InferenceSession,
    resolution: int,
    batch_size: int,
    cfg: LatencyConfig,
    in_chans: int = 3,
    *,
    threads: int | None = None,
    budget_s: float | None = None,
    expected_forward_s: float | None = None,
) -> LatencyResult:
    """Median latency (ms) of one ``session.run`` on a seeded float32 batch of ``batch_size``
    images of ``in_chans`` x ``resolution`` px, timed with ``time.perf_counter``.

    Warm-ups, adaptive repeats and the hard ``budget_s`` (s) are those of
    :func:`kdsearch.measure.latency.time_forwards` (raises its ``OverBudget``). ``threads`` is
    the session's intra-op thread count, recorded in the result.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(INPUT_SEED)
    x = rng.standard_normal((batch_size, in_chans, resolution, resolution), dtype=np.float32)
    name = session.get_inputs()[0].name
    feed = {name: x}

    def forward_ms() -> float:
        t = time.perf_counter()
        session.run(None, feed)
        return (time.perf_counter() - t) * 1e3

    timing = time_forwards(
        forward_ms, batch_size, cfg,
        budget_s=None if budget_s is None else budget_s - (time.perf_counter() - t0),
        expected_forward_s=expected_forward_s,
    )
    return latency_result(
        timing,
        method="onnxruntime InferenceSession.run, perf_counter",
        device="cpu",
        threads=threads,
        batch_size=batch_size,
        budget_s=budget_s,
        elapsed_s=time.perf_counter() - t0,
    )


class OrtLatency:
    """The ``ort-cpu`` latencies of one student: exported and loaded once, timed per batch size.

    The export (:func:`export_onnx`) and session (:func:`ort_session`, ``cfg.ort_threads``
    threads, ``cfg.ort_optimization``) are made on the first :meth:`measure`, and only when the
    budget left covers the export's estimate (:func:`last_export_s`); the export itself cannot
    be interrupted. Its cost counts against that call's budget. A failed or refused export is
    kept and raised again for every batch size, so each ``*_ort`` figure is missing with the
    same reason. :attr:`method` describes the runtime (see :func:`ort_method`), plus the export's
    wall time ``export_s`` (s) and the ONNX model's size ``onnx_bytes``.
    """

    def __init__(self, model: nn.Module, resolution: int, in_chans: int, cfg: LatencyConfig) -> None:
        self.model = model
        self.resolution = int(resolution)
        self.in_chans = int(in_chans)
        self.cfg = cfg
        self.method: dict[str, Any] = {}
        self._session: onnxruntime.InferenceSession | None = None
        self._failure: Exception | None = None

    def _load(self, budget_s: float | None) -> onnxruntime.InferenceSession:
        if self._failure is not None:
            raise self._failure
        if self._session is not None:
            return self._session
        estimate = last_export_s()
        if budget_s is not None and estimate > budget_s:
            self._failure = OverBudget(
                "ONNX export for ort-cpu", estimate, budget_s, 0.0, _export_estimate_detail()
            )
            raise self._failure
        try:
            t0 = time.perf_counter()
            data = export_onnx(self.model, self.resolution, self.in_chans)
            export_s = time.perf_counter() - t0
            session = ort_session(data, self.cfg.ort_threads, self.cfg.ort_optimization)
        except Exception as exc:  # noqa: BLE001 - kept, raised again for every batch size
            self._failure = exc
            raise
        self.method = {
            **ort_method(session, self.cfg.ort_threads, self.cfg.ort_optimization),
            "export_s": export_s,
            "onnx_bytes": len(data),
        }
        self._session = session
        return session

    def measure(
        self, batch_size: int, *, budget_s: float | None = None, expected_forward_s: float | None = None
    ) -> LatencyResult:
        """ORT CPU latency of ``batch_size`` images under the hard ``budget_s`` (s), export included."""
        t0 = time.perf_counter()
        session = self._load(budget_s)
        left = None if budget_s is None else budget_s - (time.perf_counter() - t0)
        return measure_latency_ort(
            session, self.resolution, batch_size, self.cfg, self.in_chans,
            threads=self.cfg.ort_threads, budget_s=left, expected_forward_s=expected_forward_s,
        )
