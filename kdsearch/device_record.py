"""A worker's device as stored with each trial, read back for people: the banner line of
``kdsearch optimize`` and the report, the short cell of ``kdsearch trials``.

Torch-free on purpose (``kdsearch trials`` and the report never load torch): the record is made by
:func:`kdsearch.measure.device.describe_worker_device`, on the worker.
"""

from __future__ import annotations

from typing import Any

from kdsearch.trial_record import DEVICE_INFO

__all__ = ["DEVICE_INFO_ATTR", "format_device_banner", "short_device_label"]

DEVICE_INFO_ATTR = DEVICE_INFO
"""Trial user attr: :func:`kdsearch.measure.device.describe_worker_device` of the worker that
trained the trial (device, name, capability, precision, driver, torch, torch_cuda, energy)."""

_PRECISION_WORDS = {"bf16": "bf16 autocast", "fp16": "fp16 autocast + GradScaler", "fp32": "fp32"}


def format_device_banner(info: dict[str, Any]) -> str:
    """One line from :func:`describe_worker_device`: ``cuda:0 NVIDIA H200 (compute 9.0), bf16
    autocast, driver 570.86 (CUDA 12.8), torch 2.14.1+cu130 (CUDA 13.0), energy nvml``."""
    dev = str(info.get("device", "?"))
    precision = _PRECISION_WORDS.get(str(info.get("precision")), str(info.get("precision")))
    if dev.startswith("cuda"):
        drv = str(info.get("driver") or "?") + (f" (CUDA {info['driver_cuda']})" if info.get("driver_cuda") else "")
        head = f"{dev} {info.get('name') or '?'} (compute {info.get('capability') or '?'}), {precision}, driver {drv}"
        build = f"torch {info.get('torch')} (CUDA {info.get('torch_cuda')})"
    else:
        threads = f", {info['threads']} threads" if info.get("threads") else ""
        head = f"CPU ({info.get('name') or 'cpu'}{threads}), NOT a GPU, {precision}"
        build = f"torch {info.get('torch')}"
    return f"{head}, {build}, energy {info.get('energy') or '?'}"


def short_device_label(info: Any) -> str:
    """A table cell from a stored :data:`DEVICE_INFO_ATTR`: ``H200 8.0 bf16`` or ``cpu fp32``; ``""``
    when the trial stored none (a study made before it was recorded)."""
    if not isinstance(info, dict):
        return ""
    prec = str(info.get("precision") or "")
    if str(info.get("device", "")).startswith("cuda"):
        name = str(info.get("name") or "gpu").removeprefix("NVIDIA ").removeprefix("GeForce ")
        cap = info.get("capability")
        return " ".join(p for p in (name, str(cap) if cap else "", prec) if p)
    return f"cpu {prec}".strip()
