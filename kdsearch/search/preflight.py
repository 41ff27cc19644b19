"""Checks that run before a study is created or touched, so bad input writes nothing.

Everything a worker would trip over during preparation (a missing data folder, a teacher name
timm does not know, a checkpoint that does not fit) is found here first,
in the supervisor, and reported as one line with exit code 2.

It starts with what takes milliseconds: an objective or constraint that this machine cannot
measure (a GPU-only figure without CUDA, an energy figure without a usable NVML counter or
power reading) would otherwise fail every trial as ``missing_objective`` after its full box.
:func:`check_workers` refuses more workers than visible GPUs unless ``study.share_gpu`` allows it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kdsearch.config import Space, StudyConfig
from kdsearch.data import load_data
from kdsearch.distill.cache_size import check_caches_fit
from kdsearch.errors import ConfigError
from kdsearch.measure.energy import cpu_energy_unavailable_reason, energy_unavailable_reason
from kdsearch.measure.runtime_ort import ORT_DEVICE, ORT_EXTRA, onnxruntime_missing
from kdsearch.metrics import metric_info
from kdsearch.models import create_teacher, get_family

__all__ = ["preflight", "check_measurable", "check_ort_runtime", "check_workers"]


def preflight(cfg: StudyConfig, *, cuda_available: bool | None = None) -> int:
    """Run each listed student family's preflight check, then validate the data and teachers;
    return the data set's class count (in a rehearsal: check the table instead of the data and
    teachers, and return the table's class count). Storage is checked when the study is opened, which writes
    nothing until the URL has opened. ``cuda_available``: whether the workers get a GPU (the
    resolved ``study.device``; default: whether torch sees one)."""
    check_measurable(cfg, cuda_available=cuda_available)
    check_ort_runtime(cfg)
    resolutions = _int_values(cfg.student.resolution)
    for name in cfg.student.families:
        # e.g. a ViT needs a patch size that divides every resolution the study can propose
        get_family(name).preflight(cfg.student.section(name), resolutions)
    if cfg.rehearsal.enabled:  # replayed trials: no data set, no teacher (kdsearch.search.rehearsal)
        from kdsearch.search.rehearsal import TABLE_NUM_CLASSES, check_table  # noqa: PLC0415

        check_table(str(cfg.rehearsal.table))
        return TABLE_NUM_CLASSES
    bundle = load_data(cfg.data)
    check_caches_fit([t.cache for t in cfg.teachers if t.mode == "cached"], len(bundle.train), bundle.num_classes)
    for tcfg in cfg.teachers:
        # Builds the model on the CPU: catches unknown names, bad kwargs and checkpoints that do
        # not fit. The weights are dropped at once; workers build their own on their device.
        teacher = create_teacher(tcfg, bundle.num_classes, torch.device("cpu"))
        del teacher
    return bundle.num_classes


def _int_values(space: Space) -> list[int]:
    if space.choices is not None:
        return [int(v) for v in space.choices]
    step = int(space.step or 1)
    return list(range(int(space.low), int(space.high) + 1, step))  # type: ignore[arg-type]


def check_measurable(
    cfg: StudyConfig,
    *,
    cuda_available: bool | None = None,
    energy_reason: str | None | Callable[[], str | None] = energy_unavailable_reason,
    cpu_energy_reason: str | None | Callable[[], str | None] = cpu_energy_unavailable_reason,
) -> None:
    """Refuse an objective or constraint this machine cannot measure, in milliseconds.

    A metric the registry marks ``needs_cuda`` needs a visible CUDA device; one marked
    ``needs_nvml`` also needs NVML energy (the counter, or power polling) on it: not on a CPU,
    not without the driver's NVML, not on a MIG slice; one marked ``needs_rapl`` needs readable
    RAPL counters (CPU energy). ``cuda_available``, ``energy_reason`` and ``cpu_energy_reason``
    (a reason string, None for "usable", or a function returning either) default to asking this
    machine; tests pass them.
    """
    wanted = [("objectives", n) for n in cfg.objectives] + [("constraints", n) for n in cfg.constraints]
    rapl = [(sec, n) for sec, n in wanted if (info := metric_info(n)) is not None and info.needs_rapl]
    if rapl:
        why = cpu_energy_reason() if callable(cpu_energy_reason) else cpu_energy_reason
        if why is not None:
            sec, name = rapl[0]
            raise ConfigError(
                f"{sec}.{name}", f"needs CPU energy (RAPL through Zeus), which is not readable here ({why})", name,
                "run where /sys/class/powercap/intel-rapl/*/energy_uj is readable (root, or a udev rule), "
                "or drop the CPU energy figure from the study",
            )
    gpu = [(sec, n) for sec, n in wanted if (info := metric_info(n)) is not None and info.needs_cuda]
    if not gpu:
        return
    has_cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if not has_cuda:
        sec, name = gpu[0]
        raise ConfigError(
            f"{sec}.{name}", "can only be measured on a CUDA GPU, and none is visible here", name,
            "run on a machine with an NVIDIA GPU (check CUDA_VISIBLE_DEVICES), or drop it from the study",
        )
    nvml = [(sec, n) for sec, n in gpu if (info := metric_info(n)) is not None and info.needs_nvml]
    if not nvml:
        return
    reason = energy_reason() if callable(energy_reason) else energy_reason
    if reason is not None:
        sec, name = nvml[0]
        raise ConfigError(
            f"{sec}.{name}", f"needs NVML energy on this GPU, which is not usable here ({reason})", name,
            "install zeus (pip install zeus) with a driver that exposes NVML, use a whole GPU (not a MIG slice), "
            "or drop the energy figure from the study",
        )


def check_workers(cfg: StudyConfig, n_workers: int, n_gpus: int) -> int:
    """How many workers share each GPU (1 on a CPU machine); refuse sharing unless allowed.

    Several workers on one GPU corrupt each other's latency, energy and memory figures, so more
    workers than visible GPUs is an error unless ``study.share_gpu: true`` makes it a recorded
    choice (every trial stores ``gpu_sharing``).
    """
    if n_gpus <= 0:
        return 1
    per_gpu = -(-n_workers // n_gpus)
    if per_gpu > 1 and not cfg.study.share_gpu:
        raise ConfigError(
            "--workers",
            f"{n_workers} workers on {n_gpus} visible GPU(s) would share a GPU and corrupt each other's "
            "latency, energy and memory figures",
            n_workers,
            f"use --workers {n_gpus} or fewer, or set study.share_gpu: true to share on purpose (recorded per trial)",
        )
    return per_gpu


def check_ort_runtime(cfg: StudyConfig) -> None:
    """Refuse an ``ort-cpu`` latency this machine cannot measure, in a second.

    ``ort-cpu`` in ``measure.latency.devices`` needs onnxruntime, and onnx and onnxscript to
    export the student (the optional ``export`` extra). (An objective or constraint on a
    ``*_ort`` latency without ``ort-cpu`` listed is refused when the study file loads:
    :func:`kdsearch.metrics.why_not_produced`.)
    """
    devices = cfg.measure.latency.devices
    if ORT_DEVICE in devices and (missing := onnxruntime_missing()) is not None:
        raise ConfigError(
            "measure.latency.devices", f"{ORT_DEVICE} needs {missing}, which is not installed", ORT_DEVICE,
            f"{ORT_EXTRA}, or drop {ORT_DEVICE}",
        )
