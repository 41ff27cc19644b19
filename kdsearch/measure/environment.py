"""What a measurement was taken on: device, driver, libraries, CPU, threads, NVML.

The study stores :func:`collect_environment` once (``environment``); each trial stores
:func:`environment_diff` against it (``env_diff``), which is empty when nothing changed.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
from collections.abc import Mapping
from typing import Any

import torch

from kdsearch.measure._common import BYTES_PER_MB, resolve_device

__all__ = ["collect_environment", "environment_diff", "PACKAGES"]

PACKAGES: tuple[str, ...] = ("torch", "torchvision", "timm", "optuna", "ptflops", "nvidia-ml-py", "zeus", "kdsearch")


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect_environment(device: torch.device | str | None) -> dict[str, Any]:
    """A flat, JSON-able record of the machine and software a measurement ran on. Never raises.

    Keys: ``device``, ``device_name``, ``device_capability``, ``device_memory_mb`` (MB = 10^6
    bytes), ``driver``, ``cuda``, ``cudnn``, ``torch``, ``cpu_model``, ``cpu_count``,
    ``cpu_affinity``, ``torch_threads``, ``hostname``, ``python``, ``platform``,
    ``pkg.<name>`` for each of :data:`PACKAGES`, and ``nvml.*`` (what Zeus can measure: GPU backend, energy counter, RAPL; CUDA devices only).
    """
    from kdsearch.measure.energy import nvml_status  # noqa: PLC0415 - avoid a cycle at import

    dev = resolve_device(device)
    env: dict[str, Any] = {
        "device": str(dev),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": None,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:  # noqa: BLE001 - a broken cuDNN install is itself worth recording
        env["cudnn"] = "error"
    for pkg in PACKAGES:
        env[f"pkg.{pkg}"] = _version(pkg)
    if dev.type == "cuda":
        try:
            props = torch.cuda.get_device_properties(dev)
            env["device_name"] = props.name
            env["device_capability"] = f"{props.major}.{props.minor}"
            env["device_memory_mb"] = round(props.total_memory / BYTES_PER_MB, 1)
        except Exception as exc:  # noqa: BLE001
            env["device_name"] = f"error: {type(exc).__name__}: {exc}"
        status = nvml_status(dev.index or 0)  # Zeus's GPU index = torch's (after CUDA_VISIBLE_DEVICES)
        env["driver"] = status.get("driver")
        for k, v in status.items():
            if k != "driver":
                env[f"nvml.{k}"] = v
    else:
        env["device_name"] = "cpu"
        env["driver"] = None
        env["nvml.available"] = False
        env["nvml.reason"] = "not queried: cpu device"
    return env


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def environment_diff(study_env: Mapping[str, Any], trial_env: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Keys whose values differ: ``{key: {"study": old, "trial": new}}`` (nested dicts are
    compared by dotted key; a key present on one side only shows ``None`` on the other)."""
    a, b = _flatten(study_env), _flatten(trial_env)
    out: dict[str, dict[str, Any]] = {}
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            out[key] = {"study": a.get(key), "trial": b.get(key)}
    return out
