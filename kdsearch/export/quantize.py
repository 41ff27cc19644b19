"""int8 for the edge: ONNX Runtime static quantization of an exported student, with its cost measured.

``kdsearch export --format onnx --quantize int8`` writes ``model.int8.onnx`` beside the fp32
``model.onnx`` and a ``quantization`` section in the card. How:

1. **Data.** The study's stored data config (``data`` of the study user attr ``config``) is loaded with
   :func:`kdsearch.data.load_data`: the same seeded train/val/test splits the search used, and
   the trial's normalisation (its ``normalization`` user attr, else the data set's statistics).
2. **Calibration.** ``calibration_images`` images drawn from the **training** split (a seeded
   uniform sample without replacement, seed :data:`CALIBRATION_SEED`; never val or test), in
   batches of :data:`CALIBRATION_BATCH`, through the evaluation preprocessing. Method
   ``minmax`` (default), ``entropy`` or ``percentile``: onnxruntime's ``CalibrationMethod``.
3. **Quantization.** ``onnxruntime.quantization.quant_pre_process`` (shape inference and graph
   clean-up), then ``quantize_static`` in the QDQ format, weights ``QInt8`` per channel; on an
   x86 CPU activations ``QUInt8`` (with ``reduce_range`` when the CPU lacks VNNI, as onnxruntime
   recommends), on ARM ``QInt8``. The choice follows the CPU the export runs on and is recorded.
4. **Cost.** Val and test accuracy of both ONNX models through onnxruntime (the fp32 one too, so
   the drop compares like with like), the top-1 agreement of their predictions (the round-trip
   check: bit-level equality does not apply to int8), and their CPU latency at batch 1 and the
   study's largest latency batch, timed by :func:`kdsearch.measure.runtime_ort.measure_latency_ort`
   with the study's ``measure.latency`` settings (``ort_threads``, ``ort_optimization``, repeats).
   A val drop above ``max_drop`` (a fraction: 0.02 = 2 points) is still written, with a warning
   in the card and on the console.
"""

from __future__ import annotations

import os
import platform
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial

from kdsearch import trial_record as tr
from kdsearch.config import LatencyConfig, config_from_dict
from kdsearch.constants import (
    CALIBRATION_METHODS,
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_MAX_INT8_DROP,
    QUANTIZE_CHOICES,
)
from kdsearch.data import load_data, preprocess
from kdsearch.errors import ConfigError, ExportError
from kdsearch.measure.runtime_ort import measure_latency_ort, ort_method, ort_session
from kdsearch.models import StudentSpec

if TYPE_CHECKING:
    import onnxruntime

__all__ = [
    "CALIBRATION_METHODS",
    "DEFAULT_CALIBRATION_IMAGES",
    "DEFAULT_MAX_INT8_DROP",
    "INT8_FILE",
    "QUANTIZE_CHOICES",
    "QuantData",
    "QuantizeSettings",
    "drop_warning",
    "quantize_int8",
    "study_data",
]

INT8_FILE = "model.int8.onnx"
CALIBRATION_SEED = 0
CALIBRATION_BATCH = 32
EVAL_BATCH = 256
EVAL_THREADS = 2  # onnxruntime intra-op threads for the accuracy passes (modest on shared machines)


@dataclass(frozen=True)
class QuantizeSettings:
    """What ``--quantize int8`` does: calibration ``method`` (:data:`CALIBRATION_METHODS`) over
    ``calibration_images`` training images; ``max_drop`` is the val-accuracy drop (fraction)
    above which the card and the console warn."""

    method: str = "minmax"
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES
    max_drop: float = DEFAULT_MAX_INT8_DROP

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ConfigError("--calibration-method", f"must be one of {list(CALIBRATION_METHODS)}", self.method)
        if self.calibration_images < 1:
            raise ConfigError("--calibration-images", "must be >= 1", self.calibration_images)
        if not np.isfinite(self.max_drop) or self.max_drop > 1:
            raise ConfigError(
                "--max-int8-drop", "must be a fraction <= 1 (0.02 = 2 points of val accuracy)", self.max_drop
            )


@dataclass
class QuantData:
    """The splits and settings the int8 export reads from the study."""

    train: Any  # ImageSplit: uint8 [N, 3, S, S] images, int64 labels
    val: Any
    test: Any
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    normalization_source: str
    dataset: str
    fingerprint: str
    num_classes: int
    latency: LatencyConfig


def study_data(study: optuna.Study, trial: FrozenTrial, data_root: str | None = None) -> QuantData:
    """Load the study's data as the search saw it (stored data config; ``data_root`` overrides
    ``data.root`` when the data has moved) and its ``measure.latency`` settings."""
    stored = study.user_attrs.get(tr.CONFIG)
    if not isinstance(stored, dict) or not isinstance(stored.get("data"), dict):
        raise ExportError(
            f"--quantize: study {study.study_name!r} has no stored data config (user attr {tr.CONFIG!r}); "
            "the calibration and accuracy data cannot be found"
        )
    raw: dict[str, Any] = {"data": dict(stored["data"])}
    if isinstance(stored.get("measure"), dict):
        raw["measure"] = stored["measure"]
    if data_root is not None:
        raw["data"]["root"] = str(data_root)
    cfg = config_from_dict(raw)
    bundle = load_data(cfg.data)
    norm = trial.user_attrs.get(tr.NORMALIZATION)
    if isinstance(norm, dict) and "mean" in norm and "std" in norm:
        mean, std, source = tuple(norm["mean"]), tuple(norm["std"]), "the trial's normalization"
    else:
        mean, std, source = bundle.mean, bundle.std, "the data set's statistics"
    return QuantData(
        train=bundle.train,
        val=bundle.val,
        test=bundle.test,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        normalization_source=source,
        dataset=bundle.name,
        fingerprint=bundle.fingerprint,
        num_classes=bundle.num_classes,
        latency=cfg.measure.latency,
    )


def _inputs(images_u8: torch.Tensor, spec: StudentSpec, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """The evaluation preprocessing (:func:`kdsearch.data.preprocess`) as a float32 NCHW array."""
    return preprocess(images_u8.cpu(), spec.resolution, mean, std).contiguous().numpy()


def calibration_indices(n_train: int, n: int, seed: int = CALIBRATION_SEED) -> np.ndarray:
    """``min(n, n_train)`` training indices: a seeded uniform sample without replacement, sorted."""
    g = torch.Generator().manual_seed(seed)
    return np.sort(torch.randperm(n_train, generator=g)[: min(n, n_train)].numpy())


def _calibration_reader(batches: Iterator[np.ndarray], input_name: str) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        """Feeds preprocessed training batches to onnxruntime's calibrator, once."""

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(batches, None)
            return None if x is None else {input_name: x}

    return _Reader()


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def _types_for_this_cpu() -> tuple[str, str, bool, str]:
    """(activation type, weight type, reduce_range, why) per onnxruntime's CPU guidance."""
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64") or machine.startswith("arm"):
        return "QInt8", "QInt8", False, f"{machine} CPU: symmetric int8 activations and weights"
    flags = _cpu_flags()
    vnni = bool({"avx512_vnni", "avx_vnni"} & flags)
    if vnni or not flags:
        why = f"{machine} CPU with VNNI" if vnni else f"{machine} CPU (flags unknown)"
        return "QUInt8", "QInt8", False, f"{why}: uint8 activations, int8 weights"
    return "QUInt8", "QInt8", True, f"{machine} CPU without VNNI: 7-bit weights (reduce_range) against saturation"


def _predict(session: onnxruntime.InferenceSession, split: Any, spec: StudentSpec, data: QuantData) -> np.ndarray:
    """Top-1 predictions (int64 [N]) of ``session`` on ``split``."""
    name = session.get_inputs()[0].name
    n = int(split.labels.shape[0])
    out = np.empty(n, dtype=np.int64)
    for i in range(0, n, EVAL_BATCH):
        x = _inputs(split.images[i : i + EVAL_BATCH], spec, data.mean, data.std)
        out[i : i + EVAL_BATCH] = session.run(None, {name: x})[0].argmax(axis=1)
    return out


def drop_warning(drop: float, fp32: float, int8: float, limit: float) -> str:
    """The card's and console's warning for a val drop above ``limit`` (fractions)."""
    return (
        f"int8 val accuracy {100 * int8:.2f}% is {100 * drop:.2f} points below fp32 {100 * fp32:.2f}%, more than "
        f"the --max-int8-drop limit of {100 * limit:.2f} points; model.int8.onnx was written anyway: check it on "
        "your data, try --calibration-method entropy or more --calibration-images, or ship the fp32 model.onnx"
    )


def quantize_int8(
    fp32_path: Path,
    int8_path: Path,
    spec: StudentSpec,
    data: QuantData,
    settings: QuantizeSettings,
    pytorch_accuracy: dict[str, float | None] | None = None,
) -> dict[str, Any]:
    """Quantize ``fp32_path`` to ``int8_path`` and measure both; return the card's ``quantization``.

    See the module docstring for every step. ``pytorch_accuracy`` (the trial's stored val/test
    accuracy) is recorded beside the onnxruntime figures. Accuracies, drops and agreements are
    fractions; latencies ms; sizes MB (10^6 bytes).
    """
    if data.num_classes != spec.num_classes:
        raise ExportError(
            f"--quantize: the study's data ({data.dataset}) has {data.num_classes} classes but the student "
            f"has {spec.num_classes} outputs; was the data config or data folder changed since the search?"
        )
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    act, weight, reduce_range, why = _types_for_this_cpu()
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[settings.method]
    idx = calibration_indices(int(data.train.labels.shape[0]), settings.calibration_images)

    def batches() -> Iterator[np.ndarray]:
        for i in range(0, len(idx), CALIBRATION_BATCH):
            sel = torch.from_numpy(idx[i : i + CALIBRATION_BATCH])
            yield _inputs(data.train.images[sel], spec, data.mean, data.std)

    with tempfile.TemporaryDirectory(prefix="kdsearch-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre))
        input_name = ort_session(pre, threads=1).get_inputs()[0].name
        quantize_static(
            str(pre),
            str(int8_path),
            _calibration_reader(batches(), input_name),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=getattr(QuantType, act),
            weight_type=getattr(QuantType, weight),
            calibrate_method=method,
        )

    # Accuracy and agreement through onnxruntime, both models, same images and preprocessing.
    threads = min(EVAL_THREADS, os.cpu_count() or 1)
    fp32_eval = ort_session(fp32_path, threads=threads)
    int8_eval = ort_session(int8_path, threads=threads)
    acc: dict[str, dict[str, float]] = {"fp32": {}, "int8": {}, "drop": {}}
    agree: dict[str, float] = {}
    same = total = 0
    for split_name, split in (("val", data.val), ("test", data.test)):
        labels = split.labels.cpu().numpy()
        p32 = _predict(fp32_eval, split, spec, data)
        p8 = _predict(int8_eval, split, spec, data)
        acc["fp32"][split_name] = float((p32 == labels).mean())
        acc["int8"][split_name] = float((p8 == labels).mean())
        acc["drop"][split_name] = acc["fp32"][split_name] - acc["int8"][split_name]
        agree[split_name] = float((p32 == p8).mean())
        same += int((p32 == p8).sum())
        total += len(labels)
    agree["all"] = same / total
    del fp32_eval, int8_eval

    # CPU latency, batch 1 and the study's largest latency batch, interleaved fp32/int8.
    lat = data.latency
    sizes = sorted({1, max(lat.batch_sizes)})
    sessions = {
        "fp32": ort_session(fp32_path, lat.ort_threads, lat.ort_optimization),
        "int8": ort_session(int8_path, lat.ort_threads, lat.ort_optimization),
    }
    latency: dict[str, dict[str, float]] = {"fp32": {}, "int8": {}, "speedup": {}}
    repeats: dict[str, dict[str, Any]] = {"fp32": {}, "int8": {}}
    for b in sizes:
        for kind, sess in sessions.items():
            r = measure_latency_ort(sess, spec.resolution, b, lat, spec.in_chans, threads=lat.ort_threads)
            latency[kind][f"b{b}"] = r.median_ms
            repeats[kind][f"b{b}"] = {"p90_ms": r.p90_ms, "iqr_ms": r.iqr_ms, "repeats": r.repeats,
                                      "stop_reason": r.stop_reason}
        latency["speedup"][f"b{b}"] = latency["fp32"][f"b{b}"] / latency["int8"][f"b{b}"]

    drop_val = acc["drop"]["val"]
    warning = (
        drop_warning(drop_val, acc["fp32"]["val"], acc["int8"]["val"], settings.max_drop)
        if drop_val > settings.max_drop
        else None
    )
    return {
        "scheme": "int8",
        "file": int8_path.name,
        "tool": "onnxruntime.quantization.quantize_static",
        "onnxruntime_version": ort.__version__,
        "preprocess": "onnxruntime.quantization.shape_inference.quant_pre_process",
        "format": "QDQ",
        "activations": act,
        "weights": f"{weight}, per channel",
        "per_channel": True,
        "reduce_range": reduce_range,
        "types_chosen_for": why,
        "calibration": {
            "method": {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}[settings.method],
            "images": len(idx),
            "requested_images": settings.calibration_images,
            "split": "train",
            "sampling": f"uniform without replacement from the training split, seed {CALIBRATION_SEED}",
            "batch": CALIBRATION_BATCH,
        },
        "data": {
            "dataset": data.dataset,
            "fingerprint": data.fingerprint,
            "n_val": int(data.val.labels.shape[0]),
            "n_test": int(data.test.labels.shape[0]),
            "normalization": {"mean": list(data.mean), "std": list(data.std), "source": data.normalization_source},
        },
        "accuracy": {**acc, "runtime": f"onnxruntime CPUExecutionProvider, {threads} threads, both models",
                     "pytorch": dict(pytorch_accuracy or {})},
        "top1_agreement": agree,
        "latency_ms": latency,
        "latency_detail": repeats,
        "latency_method": {
            **ort_method(sessions["int8"], lat.ort_threads, lat.ort_optimization),
            "method": "onnxruntime InferenceSession.run, perf_counter; median of adaptive repeats",
            "warmup": lat.warmup,
            "min_repeats": lat.min_repeats,
            "max_repeats": lat.max_repeats,
        },
        "size_mb": {"fp32": fp32_path.stat().st_size / 1e6, "int8": int8_path.stat().st_size / 1e6},
        "max_val_drop": settings.max_drop,
        "within_limit": warning is None,
        "warning": warning,
    }
