"""The training precision on every GPU generation, from faked device properties (no GPU here).

torch's ``is_bf16_supported`` is faked the way torch implements it: native from compute
capability 8.0, and True below it too unless ``including_emulation=False`` is passed (it only
tries to make a bf16 tensor). A choice that forgot to turn emulation off would pick bf16 on a T4.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import kdsearch.distill.fit as fit_mod
from kdsearch.config import TeacherFitConfig
from kdsearch.distill import fit_teacher
from kdsearch.distill.precision import select_train_dtype, train_dtype_for
from kdsearch.distill.teacher_cache import build_dtype

from distill_helpers import tiny_bundle, tiny_teacher

# compute capability -> (generation, chosen train dtype with distill.amp on)
GENERATIONS: list[tuple[tuple[int, int], str, str]] = [
    ((6, 0), "Pascal P100", "fp32"),  # no tensor cores: fp16 autocast would gain nothing
    ((7, 0), "Volta V100", "fp16"),
    ((7, 5), "Turing T4 / RTX 20xx", "fp16"),
    ((8, 0), "Ampere A100", "bf16"),
    ((8, 6), "Ampere RTX 30xx / A10", "bf16"),
    ((8, 9), "Ada L4 / RTX 40xx", "bf16"),
    ((9, 0), "Hopper H100 / H200", "bf16"),
    ((10, 0), "Blackwell B200", "bf16"),
    ((12, 0), "Blackwell RTX 50xx", "bf16"),
]


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> Callable[[tuple[int, int]], None]:
    """Install a fake CUDA device of a given compute capability into ``torch.cuda``."""

    def install(capability: tuple[int, int]) -> None:
        def is_bf16_supported(including_emulation: bool = True) -> bool:
            return capability[0] >= 8 or including_emulation  # torch's own rule, emulation on by default

        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
        monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())

    return install


@pytest.mark.parametrize(("capability", "generation", "expected"), GENERATIONS, ids=[g for _, g, _ in GENERATIONS])
def test_the_precision_of_every_gpu_generation(
    fake_gpu: Callable[[tuple[int, int]], None], capability: tuple[int, int], generation: str, expected: str
) -> None:
    fake_gpu(capability)
    cuda = torch.device("cuda", 0)
    assert torch.cuda.is_bf16_supported() is True  # the default answer, emulation included: not to be trusted
    assert train_dtype_for(cuda, amp=True) == expected, generation
    assert train_dtype_for(cuda, amp=False) == "fp32"
    assert train_dtype_for("cpu", amp=True) == "fp32"
    # The teacher-cache build takes the same choice (a bf16 default keeps its old key: None).
    assert build_dtype(cuda, None) == (None if expected == "bf16" else expected)
    assert build_dtype(cuda, "fp32") == "fp32"  # an explicit precision is kept
    assert build_dtype(torch.device("cpu"), None) is None


def test_a_gpu_without_native_bf16_above_8_0_trains_in_fp16() -> None:
    assert select_train_dtype("cuda", (8, 0), False, True) == "fp16"
    assert select_train_dtype("cuda", None, True, True) == "bf16"  # capability unknown (not CUDA's report)
    assert select_train_dtype("cuda", None, False, True) == "fp32"


def test_the_teacher_fit_takes_the_students_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[torch.device, bool]] = []

    def spy(device: torch.device | str, amp: bool) -> str:
        calls.append((torch.device(device), amp))
        return train_dtype_for(device, amp)

    monkeypatch.setattr(fit_mod, "train_dtype_for", spy)
    bundle = tiny_bundle(train_size=64)
    _, info = fit_teacher(tiny_teacher(bundle.num_classes, seed=3), bundle,
                          TeacherFitConfig(time_s=0.2, lr=2e-3), tmp_path, "cpu")
    assert calls == [(torch.device("cpu"), True)]
    assert info["train_dtype"] == "fp32"
