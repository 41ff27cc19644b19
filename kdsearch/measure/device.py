"""Which device a worker trains on, said out loud: the banner, the per-trial record, and why
torch has no usable GPU when it has none.

Every decision here is a pure function of device facts (:class:`CudaFacts`, a plain record of
what torch and NVML report), so each is tested on a CPU with faked facts:

* :func:`diagnose_no_cuda` tells apart the ways torch ends up without a usable GPU: a torch
  build without CUDA; no NVIDIA driver or device; a driver too old for this torch's CUDA build;
  a GPU whose compute capability this build does not include (``torch.cuda.get_arch_list()``
  against the device). Each message names its fix: a torch wheel from PyTorch's own index built
  for an older CUDA (``pip install torch --index-url https://download.pytorch.org/whl/cu126``),
  or a newer driver.
* :func:`resolve_study_device` turns ``study.device`` (``auto | cuda | cpu``) and the facts into
  the device type the workers get, or a one-line :class:`~kdsearch.errors.ConfigError` for
  ``cuda`` without a usable GPU (raised by the supervisor before any storage is written).
* :func:`describe_worker_device` and :func:`format_device_banner`: what a worker trains on (name,
  compute capability, precision, driver, torch's CUDA build, energy method), shown by
  ``kdsearch optimize`` before the first trial and stored with every trial
  (:data:`DEVICE_INFO_ATTR`).

Only :func:`collect_cuda_facts`, :func:`describe_worker_device` and :func:`energy_method` touch the
machine; they never raise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from kdsearch.config import STUDY_DEVICES
from kdsearch.device_record import DEVICE_INFO_ATTR, format_device_banner, short_device_label
from kdsearch.distill.precision import train_dtype_for
from kdsearch.errors import ConfigError

__all__ = [
    "CudaFacts",
    "DEVICE_INFO_ATTR",
    "STUDY_DEVICES",
    "WHEEL_INDEX_URL",
    "arch_covers",
    "collect_cuda_facts",
    "cuda_usable",
    "describe_worker_device",
    "diagnose_no_cuda",
    "energy_method",
    "format_device_banner",
    "resolve_study_device",
    "short_device_label",
    "wheel_index_for",
]

WHEEL_INDEX_URL = "https://download.pytorch.org/whl/"
# PyTorch's own wheel indexes by CUDA version (oldest first) and the compute capabilities their
# x86_64 builds include (torch.cuda.PYTORCH_RELEASES_CODE_CC for 12.6/13.0; 11.8-12.4 from the
# release notes). A build runs on any device of the same major capability at or above one it
# includes (binary compatibility within a major version).
_WHEEL_INDEXES: tuple[tuple[tuple[int, int], str, tuple[int, ...]], ...] = (
    ((11, 8), "cu118", (37, 50, 60, 61, 70, 75, 80, 86, 90)),
    ((12, 4), "cu124", (50, 60, 70, 75, 80, 86, 90)),
    ((12, 6), "cu126", (50, 60, 70, 75, 80, 86, 90)),
    ((12, 8), "cu128", (75, 80, 86, 90, 100, 120)),
    ((13, 0), "cu130", (75, 80, 86, 90, 100, 120)),
)


@dataclass(frozen=True)
class CudaFacts:
    """What torch and the NVIDIA driver report about CUDA on this machine (all plain values).

    ``driver_cuda`` is the newest CUDA version the installed driver supports (NVML's
    ``nvmlSystemGetCudaDriverVersion``), ``torch_cuda`` the CUDA version this torch was built
    for (``torch.version.cuda``, None for a CPU-only build), ``arch_list`` its compiled
    architectures (``torch.cuda.get_arch_list()``), ``devices`` the GPUs NVML sees as (name,
    (major, minor) compute capability), and ``torch_device_count`` how many devices torch sees.
    """

    torch_version: str
    torch_cuda: str | None
    arch_list: tuple[str, ...] = ()
    torch_device_count: int = 0
    driver_present: bool = False
    driver_reason: str | None = None  # why NVML did not answer, when it did not
    driver_version: str | None = None
    driver_cuda: tuple[int, int] | None = None
    devices: tuple[tuple[str, tuple[int, int]], ...] = field(default_factory=tuple)
    visible_devices: str | None = None  # CUDA_VISIBLE_DEVICES as set, None when unset


def _version_tuple(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    parts = text.split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return None


def _arch_number(arch: str) -> tuple[str, int] | None:
    """``"sm_90a"`` -> ``("sm", 90)``, ``"compute_75"`` -> ``("compute", 75)``; None otherwise."""
    kind, _, rest = arch.partition("_")
    digits = rest.rstrip("abf")
    if kind not in ("sm", "compute") or not digits.isdigit():
        return None
    return kind, int(digits)


def arch_covers(arch_list: tuple[str, ...] | list[str], capability: tuple[int, int]) -> bool:
    """Whether a torch build compiled for ``arch_list`` runs on a device of ``capability``.

    A cubin ``sm_XY`` runs on capability X.Z for Z >= Y (same major: binary compatibility); PTX
    ``compute_XY`` is compiled on the spot for any capability >= X.Y. An empty list (a build that
    reports none) is taken as covering everything: there is nothing to compare against.
    """
    if not arch_list:
        return True
    major, minor = capability
    cc = 10 * major + minor
    for arch in arch_list:
        parsed = _arch_number(arch)
        if parsed is None:
            continue
        kind, code = parsed
        if kind == "sm" and code // 10 == major and code % 10 <= minor:
            return True
        if kind == "compute" and code <= cc:
            return True
    return False


def wheel_index_for(driver_cuda: tuple[int, int] | None = None,
                    capability: tuple[int, int] | None = None) -> str | None:
    """The newest PyTorch wheel index (``cu126``, ...) whose CUDA the driver supports and whose
    builds include ``capability``; None when no listed index fits."""
    for version, name, ccs in reversed(_WHEEL_INDEXES):
        if driver_cuda is not None and version > driver_cuda:
            continue
        if capability is not None and not arch_covers([f"sm_{c}" for c in ccs], capability):
            continue
        return name
    return None


def _pip_fix(index: str | None) -> str:
    if index is None:
        return "no PyTorch wheel index covers it: build torch from source, or use another GPU"
    return f"pip install torch torchvision --index-url {WHEEL_INDEX_URL}{index}"


def diagnose_no_cuda(facts: CudaFacts) -> str | None:
    """Why torch has no usable CUDA device here, with the fix; None when nothing is wrong.

    Checked in this order (the first that holds is the cause): a torch built without CUDA; no
    NVIDIA driver or no GPU; a driver older than this torch's CUDA build (major.minor); a GPU
    whose compute capability the build does not include; GPUs hidden by ``CUDA_VISIBLE_DEVICES``;
    torch seeing no device for a reason none of these explain.
    """
    build = facts.torch_cuda
    if build is None:
        return (f"this torch ({facts.torch_version}) is built without CUDA; install a CUDA build, e.g. "
                f"{_pip_fix('cu126')}")
    if not facts.driver_present or not facts.devices:
        why = f" ({facts.driver_reason})" if facts.driver_reason and not facts.driver_present else ""
        return (f"no NVIDIA driver or GPU found{why}; run on a machine with an NVIDIA GPU and its driver "
                "installed (nvidia-smi must list it)")
    build_v = _version_tuple(build)
    # Within a major version a newer build runs on an older driver (CUDA minor-version
    # compatibility), so a lower minor is the cause only when torch then sees no device.
    drv_v = facts.driver_cuda
    if drv_v is not None and build_v is not None and (
            drv_v[0] < build_v[0] or (drv_v < build_v and facts.torch_device_count == 0)):
        drv = f"{drv_v[0]}.{drv_v[1]}"
        index = wheel_index_for(drv_v, min(cap for _, cap in facts.devices))
        wheel = f"install a torch built for CUDA <= {drv}: {_pip_fix(index)}, or " if index else ""
        return (f"the NVIDIA driver {facts.driver_version or '?'} supports CUDA up to {drv}, older than the CUDA "
                f"{build} this torch ({facts.torch_version}) is built for; {wheel}update the driver to one that "
                f"supports CUDA {build}")
    uncovered = [(name, cap) for name, cap in facts.devices if not arch_covers(facts.arch_list, cap)]
    if uncovered:
        name, cap = uncovered[0]
        index = wheel_index_for(facts.driver_cuda, cap)
        return (f"{name} has compute capability {cap[0]}.{cap[1]}, which this torch ({facts.torch_version}, CUDA "
                f"{build}) is not built for (it includes {' '.join(facts.arch_list)}); install a torch built for "
                f"it from PyTorch's own index: {_pip_fix(index)}")
    if facts.torch_device_count == 0:
        if facts.visible_devices is not None:
            return (f"CUDA_VISIBLE_DEVICES={facts.visible_devices!r} hides the GPU(s) NVML sees "
                    f"({', '.join(n for n, _ in facts.devices)}); unset it or name a GPU")
        return (f"torch sees no CUDA device although the driver ({facts.driver_version or '?'}) lists "
                f"{', '.join(n for n, _ in facts.devices)}; check that no other process holds the GPU "
                "exclusively and that torch.cuda.is_available() is True in this environment")
    return None


def cuda_usable(facts: CudaFacts) -> bool:
    """Whether torch can train on a GPU here: it sees one and :func:`diagnose_no_cuda` finds nothing."""
    return facts.torch_device_count > 0 and diagnose_no_cuda(facts) is None


def resolve_study_device(setting: str, facts: CudaFacts) -> tuple[str, str]:
    """``study.device`` and the facts -> (``"cuda"`` or ``"cpu"``, a line announcing the choice).

    ``cuda`` without a usable GPU is a :class:`ConfigError` that says why and what to do; ``auto``
    falls back to the CPU and says so, with the reason; ``cpu`` is taken as asked.
    """
    if setting not in STUDY_DEVICES:
        raise ConfigError("study.device", f"must be one of {list(STUDY_DEVICES)}", setting)
    if setting == "cpu":
        return "cpu", "device: cpu (study.device: cpu); latency, memory and time are CPU figures"
    why = diagnose_no_cuda(facts)
    if why is None and facts.torch_device_count > 0:
        return "cuda", f"device: cuda ({facts.torch_device_count} GPU(s) visible, study.device: {setting})"
    why = why or "torch sees no CUDA device"
    if setting == "cuda":
        raise ConfigError(
            "study.device", f"cuda needs a usable CUDA GPU, and there is none: {why}", None,
            "or run the study on the CPU on purpose with --set study.device=cpu",
        )
    return "cpu", f"device: cpu, NOT a GPU (study.device: auto): {why}"


def collect_cuda_facts() -> CudaFacts:
    """Read :class:`CudaFacts` from torch and NVML (nvidia-ml-py). Never raises; takes
    milliseconds (NVML init, no CUDA context is created)."""
    try:
        arch = tuple(torch.cuda.get_arch_list())
    except Exception:  # noqa: BLE001 - a broken build reports no architectures
        arch = ()
    try:
        count = int(torch.cuda.device_count()) if torch.version.cuda is not None else 0
    except Exception:  # noqa: BLE001
        count = 0
    base = {"torch_version": torch.__version__, "torch_cuda": torch.version.cuda, "arch_list": arch,
            "torch_device_count": count, "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    try:
        import pynvml  # noqa: PLC0415 - optional at runtime; lazy so a CPU import costs nothing
    except ImportError as exc:
        return CudaFacts(**base, driver_reason=f"nvidia-ml-py not importable ({exc})")
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - no driver: NVML cannot load or initialise
        return CudaFacts(**base, driver_reason=f"NVML init failed: {type(exc).__name__}: {exc}")
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        try:
            v = int(pynvml.nvmlSystemGetCudaDriverVersion())  # e.g. 12040 for 12.4
            driver_cuda: tuple[int, int] | None = (v // 1000, (v % 1000) // 10)
        except Exception:  # noqa: BLE001
            driver_cuda = None
        devices = []
        for i in range(int(pynvml.nvmlDeviceGetCount())):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            devices.append((name.decode() if isinstance(name, bytes) else str(name), (int(major), int(minor))))
        return CudaFacts(**base, driver_present=True, driver_version=driver, driver_cuda=driver_cuda,
                         devices=tuple(devices))
    except Exception as exc:  # noqa: BLE001
        return CudaFacts(**base, driver_present=True, driver_reason=f"NVML query failed: {type(exc).__name__}: {exc}")
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def energy_method(device: torch.device) -> str:
    """How a trial on ``device`` measures energy: the energy meter's own answer, asked the way
    the preflight asks it (the one place the banner depends on the energy code)."""
    from kdsearch.measure.energy import energy_unavailable_reason  # noqa: PLC0415 - opens NVML: only when asked

    try:
        reason = energy_unavailable_reason(device)
    except Exception as exc:  # noqa: BLE001 - a banner never fails a run
        reason = f"{type(exc).__name__}: {exc}"
    return "nvml" if reason is None else f"none ({reason})"


def describe_worker_device(device: torch.device | str, *, amp: bool = True) -> dict[str, Any]:
    """What a worker on ``device`` trains on, as a JSON-able dict: ``device``, ``name``,
    ``capability`` (``"9.0"``, None on a CPU), ``precision`` (:mod:`kdsearch.distill.precision`
    for ``distill.amp`` = ``amp``), ``driver``, ``torch``, ``torch_cuda``, ``energy``. Never raises."""
    dev = torch.device(device)
    info: dict[str, Any] = {"device": str(dev), "name": None, "capability": None, "precision": "fp32",
                            "driver": None, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                            "energy": None}
    if dev.type == "cuda":
        try:
            props = torch.cuda.get_device_properties(dev)
            info["name"], info["capability"] = props.name, f"{props.major}.{props.minor}"
        except Exception as exc:  # noqa: BLE001
            info["name"] = f"unknown ({type(exc).__name__})"
        facts = collect_cuda_facts()
        info["driver"] = facts.driver_version
        if facts.driver_cuda is not None:
            info["driver_cuda"] = f"{facts.driver_cuda[0]}.{facts.driver_cuda[1]}"
    else:
        from kdsearch.measure.environment import _cpu_model as cpu_model  # noqa: PLC0415 - same floor, only for a CPU

        info["name"] = cpu_model() or "cpu"
        info["threads"] = torch.get_num_threads()
    try:
        info["precision"] = train_dtype_for(dev, amp)
    except Exception as exc:  # noqa: BLE001
        info["precision"] = f"unknown ({type(exc).__name__})"
    info["energy"] = energy_method(dev)
    return info
