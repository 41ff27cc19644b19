from __future__ import annotations

import json

import pytest
import torch

from kdsearch.measure import collect_environment, environment_diff


def test_collect_environment_on_cpu() -> None:
    env = collect_environment("cpu")
    json.dumps(env)  # storable as a user attr
    assert env["device"] == "cpu" and env["device_name"] == "cpu"
    assert env["torch"] == torch.__version__
    assert env["torch_threads"] == torch.get_num_threads()
    assert isinstance(env["cpu_count"], int) and env["cpu_count"] >= 1
    assert env["hostname"] and env["python"]
    for pkg in ("torch", "torchvision", "timm", "optuna", "ptflops", "nvidia-ml-py"):
        assert f"pkg.{pkg}" in env
    assert env["pkg.ptflops"] is not None
    assert env["nvml.available"] is False and "cpu" in env["nvml.reason"]
    with open("/proc/cpuinfo", encoding="utf-8") as fh:
        names = [ln.split(":", 1)[1].strip() for ln in fh if ln.lower().startswith("model name")]
    if names:
        assert env["cpu_model"] == names[0]


def test_environment_diff_lists_only_changed_keys() -> None:
    study = {"torch": "2.15.0", "device_name": "H100", "threads": 8, "nested": {"a": 1, "b": 2}}
    trial = {"torch": "2.15.0", "device_name": "H200", "threads": 8, "nested": {"a": 1, "b": 3}, "new": "x"}
    diff = environment_diff(study, trial)
    assert diff == {
        "device_name": {"study": "H100", "trial": "H200"},
        "nested.b": {"study": 2, "trial": 3},
        "new": {"study": None, "trial": "x"},
    }
    env = collect_environment("cpu")
    assert environment_diff(env, dict(env)) == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_collect_environment_on_cuda() -> None:
    env = collect_environment("cuda")
    assert env["device"] == "cuda:0"
    assert env["device_name"] == torch.cuda.get_device_name(0)
    assert env["cuda"] == torch.version.cuda and env["device_memory_mb"] > 0
    assert env["nvml.available"] is True and env["driver"]
