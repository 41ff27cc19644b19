"""Device honesty from faked device facts: why torch has no usable GPU, what study.device resolves
to, and the banner a worker prints (no GPU on the machines this runs on)."""

from __future__ import annotations

import contextlib
import time
from types import SimpleNamespace

import pytest
import torch

import kdsearch.measure.device as device_mod
from kdsearch.errors import ConfigError
from kdsearch.measure.device import (
    CudaFacts,
    arch_covers,
    collect_cuda_facts,
    cuda_usable,
    describe_worker_device,
    diagnose_no_cuda,
    format_device_banner,
    resolve_study_device,
    short_device_label,
    wheel_index_for,
)

CU130_ARCH = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")  # the default PyPI wheel of torch 2.14


def facts(**kw: object) -> CudaFacts:
    """A healthy H200 machine with the default cu130 wheel, changed by ``kw``."""
    base: dict[str, object] = dict(
        torch_version="2.14.1+cu130", torch_cuda="13.0", arch_list=CU130_ARCH, torch_device_count=1,
        driver_present=True, driver_version="580.65", driver_cuda=(13, 0),
        devices=(("NVIDIA H200", (9, 0)),),
    )
    base.update(kw)
    return CudaFacts(**base)  # type: ignore[arg-type]


# (what is wrong, facts, words the diagnosis must contain)
CASES: list[tuple[str, CudaFacts, tuple[str, ...]]] = [
    ("cpu-only torch", facts(torch_version="2.14.1+cpu", torch_cuda=None, arch_list=(), torch_device_count=0),
     ("built without CUDA", "--index-url https://download.pytorch.org/whl/cu126")),
    ("no driver", facts(driver_present=False, driver_reason="NVML init failed: LibraryNotFound", driver_version=None,
                        driver_cuda=None, devices=(), torch_device_count=0),
     ("no NVIDIA driver or GPU", "LibraryNotFound", "nvidia-smi")),
    ("driver with no GPU", facts(devices=(), torch_device_count=0), ("no NVIDIA driver or GPU",)),
    # A CUDA 12.4 driver under the cu130 wheel: torch sees no device. A T4 gets the cu124 wheel.
    ("driver too old", facts(driver_version="550.54", driver_cuda=(12, 4), torch_device_count=0,
                             devices=(("Tesla T4", (7, 5)),)),
     ("driver 550.54 supports CUDA up to 12.4", "CUDA 13.0", "whl/cu124", "update the driver")),
    # A V100 under the cu130 wheel (compute 7.5 and up): torch sees it, but has no kernel for it.
    ("volta not built", facts(devices=(("Tesla V100-SXM2-16GB", (7, 0)),)),
     ("compute capability 7.0", "not built for", "sm_75", "whl/cu126")),
    ("pascal not built", facts(devices=(("Tesla P100-PCIE-16GB", (6, 0)),)), ("6.0", "whl/cu126")),
    ("hidden", facts(torch_device_count=0, visible_devices=""), ("CUDA_VISIBLE_DEVICES=''",)),
    ("unexplained", facts(torch_device_count=0), ("torch sees no CUDA device", "NVIDIA H200")),
]


@pytest.mark.parametrize(("case", "f", "words"), CASES, ids=[c for c, _, _ in CASES])
def test_each_way_of_having_no_usable_gpu_is_told_apart(case: str, f: CudaFacts, words: tuple[str, ...]) -> None:
    why = diagnose_no_cuda(f)
    assert why is not None and "\n" not in why, case
    for w in words:
        assert w in why, (case, w, why)
    assert not cuda_usable(f)


def test_a_healthy_gpu_has_no_diagnosis() -> None:
    assert diagnose_no_cuda(facts()) is None and cuda_usable(facts())
    # CUDA minor-version compatibility: a 13.0 build on a driver of 13.0 sees the device; a lower
    # minor of the same major is fine as long as torch sees the device.
    assert diagnose_no_cuda(facts(torch_cuda="13.2", driver_cuda=(13, 0))) is None
    # An RTX 4090 (8.9) runs the sm_86 cubin (same major); a Blackwell 12.0 the sm_120 one.
    assert diagnose_no_cuda(facts(devices=(("RTX 4090", (8, 9)),))) is None
    assert diagnose_no_cuda(facts(devices=(("RTX 5090", (12, 0)),))) is None


@pytest.mark.parametrize(("arch", "cap", "covered"), [
    (CU130_ARCH, (7, 5), True), (CU130_ARCH, (7, 0), False), (CU130_ARCH, (6, 1), False),
    (CU130_ARCH, (8, 9), True), (CU130_ARCH, (10, 3), True), (CU130_ARCH, (11, 0), False),
    (("sm_80", "compute_80"), (9, 0), True),  # PTX is compiled on the spot for newer devices
    (("sm_90a",), (9, 0), True), ((), (3, 5), True),  # no list: nothing to compare against
])
def test_arch_coverage(arch: tuple[str, ...], cap: tuple[int, int], covered: bool) -> None:
    assert arch_covers(arch, cap) is covered


def test_the_suggested_wheel_fits_the_driver_and_the_gpu() -> None:
    assert wheel_index_for((13, 0), (9, 0)) == "cu130"
    assert wheel_index_for((13, 0), (7, 0)) == "cu126"  # Volta: the newest index still built for it
    assert wheel_index_for((12, 8), (12, 0)) == "cu128"
    assert wheel_index_for((12, 4), (12, 0)) is None  # a Blackwell needs a newer driver
    assert wheel_index_for((11, 8), (3, 7)) == "cu118"


def test_study_device_resolves_or_refuses_in_one_line() -> None:
    no_gpu = facts(driver_present=False, driver_reason="NVML init failed", devices=(), torch_device_count=0)
    with pytest.raises(ConfigError) as err:
        resolve_study_device("cuda", no_gpu)
    msg = str(err.value)
    assert msg.startswith("study.device: cuda needs a usable CUDA GPU") and "\n" not in msg
    assert "no NVIDIA driver or GPU" in msg and "--set study.device=cpu" in msg
    dev, line = resolve_study_device("auto", no_gpu)
    assert dev == "cpu" and "NOT a GPU" in line and "no NVIDIA driver or GPU" in line
    assert resolve_study_device("cpu", facts())[0] == "cpu"  # asked for: the GPU stays unused
    assert resolve_study_device("cuda", facts())[0] == "cuda"
    assert resolve_study_device("auto", facts())[0] == "cuda"
    volta = facts(devices=(("Tesla V100", (7, 0)),))
    assert resolve_study_device("auto", volta)[0] == "cpu"  # a GPU torch cannot run on is no GPU
    with pytest.raises(ConfigError, match="compute capability 7.0"):
        resolve_study_device("cuda", volta)


def test_the_facts_of_this_machine_are_read_in_milliseconds() -> None:
    t0 = time.perf_counter()
    f = collect_cuda_facts()
    resolve_study_device("auto", f)
    assert time.perf_counter() - t0 < 2.0  # NVML init or its absence; no CUDA context
    assert f.torch_version == torch.__version__ and f.torch_cuda == torch.version.cuda
    assert (diagnose_no_cuda(f) is None) == cuda_usable(f) or f.torch_device_count == 0


H200 = {"device": "cuda:0", "name": "NVIDIA H200", "capability": "9.0", "precision": "bf16", "driver": "570.86.15",
        "driver_cuda": "12.8", "torch": "2.14.1+cu130", "torch_cuda": "13.0", "energy": "nvml"}


def test_the_banner_names_device_capability_precision_driver_and_energy() -> None:
    assert format_device_banner(H200) == (
        "cuda:0 NVIDIA H200 (compute 9.0), bf16 autocast, driver 570.86.15 (CUDA 12.8), "
        "torch 2.14.1+cu130 (CUDA 13.0), energy nvml"
    )
    t4 = {**H200, "name": "Tesla T4", "capability": "7.5", "precision": "fp16"}
    assert "fp16 autocast + GradScaler" in format_device_banner(t4)
    assert short_device_label(H200) == "H200 9.0 bf16" and short_device_label(None) == ""


def test_a_cpu_worker_says_it_is_not_on_a_gpu() -> None:
    info = describe_worker_device("cpu")
    assert info["device"] == "cpu" and info["precision"] == "fp32" and info["capability"] is None
    assert info["energy"].startswith("none (")
    banner = format_device_banner(info)
    assert banner.startswith("CPU (") and "NOT a GPU" in banner and "fp32" in banner
    assert short_device_label(info) == "cpu fp32"


def test_a_gpu_worker_is_described_from_its_properties(monkeypatch: pytest.MonkeyPatch) -> None:
    """A T4 (7.5) faked into torch.cuda: fp16, never the emulated bf16 torch's default reports."""
    props = SimpleNamespace(name="Tesla T4", major=7, minor=5, total_memory=16 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(device_mod, "collect_cuda_facts",
                        lambda: facts(driver_version="550.54", driver_cuda=(12, 4), devices=(("Tesla T4", (7, 5)),)))
    monkeypatch.setattr(device_mod, "energy_method", lambda device: "nvml")
    info = describe_worker_device(torch.device("cuda", 0), amp=True)
    assert info["name"] == "Tesla T4" and info["capability"] == "7.5" and info["precision"] == "fp16"
    assert info["driver"] == "550.54" and info["driver_cuda"] == "12.4"
    assert describe_worker_device(torch.device("cuda", 0), amp=False)["precision"] == "fp32"
    assert format_device_banner(info).startswith("cuda:0 Tesla T4 (compute 7.5), fp16 autocast + GradScaler, driver 550.54")
