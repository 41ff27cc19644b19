"""kdsearch.measure: accuracy, latency, memory, energy, complexity and environment of a student.

Every figure carries its unit in its name (``_ms``, ``_mb`` = 10^6 bytes, ``_j``, ``mj``) and is
stored with how it was taken; a figure that cannot be taken is ``None`` with a reason, never 0.
"""

from __future__ import annotations

from kdsearch.measure.accuracy import evaluate_accuracy
from kdsearch.measure.complexity import PTFLOPS_BACKEND, measure_complexity
from kdsearch.measure.energy import (
    COUNTER_RESET_REASON,
    CPU_REASON,
    EnergyMeter,
    EnergyResult,
    measure_inference_energy,
    nvml_status,
)
from kdsearch.measure.environment import collect_environment, environment_diff
from kdsearch.measure.latency import LatencyResult, measure_latency, measure_latency_on_cpu
from kdsearch.measure.memory import (
    CUDA_ONLY_REASON,
    KDMemoryTracker,
    activation_peak_mb,
    model_size_bytes,
    model_size_mb,
    peak_inference_memory_mb,
)
from kdsearch.measure.suite import Measurements, measure_inference

__all__ = [
    "evaluate_accuracy",
    "measure_latency",
    "measure_latency_on_cpu",
    "LatencyResult",
    "model_size_bytes",
    "model_size_mb",
    "activation_peak_mb",
    "peak_inference_memory_mb",
    "KDMemoryTracker",
    "CUDA_ONLY_REASON",
    "EnergyMeter",
    "EnergyResult",
    "measure_inference_energy",
    "nvml_status",
    "CPU_REASON",
    "COUNTER_RESET_REASON",
    "measure_complexity",
    "PTFLOPS_BACKEND",
    "collect_environment",
    "environment_diff",
    "Measurements",
    "measure_inference",
]
