"""What may steer a study, and what this machine can measure (issue 11, points 2, 4 and 8).

* The test split never steers: a test-split metric as an objective, a constraint or in ``--pick``
  is a one-line error naming why and the validation metric to use instead; the fine-tune stage
  selects on val and stores the test figures beside them.
* An objective this machine cannot measure is refused before the study starts, in seconds.
* More workers than GPUs only on purpose; a worker pinned to a GPU it cannot see fails loudly.
* The training precision is chosen from the device (table-driven) and keys the teacher cache.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import yaml

from kdsearch.config import apply_overrides, config_from_dict, load_config
from kdsearch.distill.precision import autocast_dtype, select_train_dtype
from kdsearch.errors import ConfigError, KDSearchError
from kdsearch.export.pick import parse_pick
from kdsearch.metrics import (
    FIXED_METRICS,
    TEST_SPLIT_RULE,
    is_selectable_metric,
    metric_info,
    val_counterpart,
)
from kdsearch.search.preflight import check_measurable, check_workers
from kdsearch.search.worker_setup import pick_device, prepare_worker
from kdsearch.storage import default_storage_url, load_study, run_paths

from cli_helpers import SMOKE, run_cli

FT = {"finetune": {"enabled": True}, "data": {"finetune_fraction": 0.1}}

# -- the test split never steers ----------------------------------------------------------------


@pytest.mark.parametrize("metric", sorted(n for n, m in FIXED_METRICS.items() if m.split == "test"))
@pytest.mark.parametrize("section", ["objectives", "constraints"])
def test_a_test_split_metric_cannot_steer(metric: str, section: str) -> None:
    value = "maximize" if section == "objectives" else 0.5
    raw = {**FT, section: {metric: value, **({"val_accuracy": "maximize"} if section == "constraints" else {})}}
    with pytest.raises(ConfigError) as exc:
        config_from_dict(raw)
    text = str(exc.value)
    assert text == f"{section}.{metric}: {TEST_SPLIT_RULE} (got {metric!r}); use {val_counterpart(metric)!r} instead"


@pytest.mark.parametrize("metric", ["val_accuracy", "pre_ft_val_accuracy", "post_ft_val_accuracy", "ft_gain_val"])
def test_the_val_counterparts_are_accepted(metric: str) -> None:
    info = metric_info(metric)
    assert info is not None and info.split == "val" and is_selectable_metric(metric)
    cfg = config_from_dict({**FT, "objectives": {metric: "maximize"}, "constraints": {metric: 1.0}})
    assert metric in cfg.objectives


@pytest.mark.parametrize("metric", ["pre_ft_val_accuracy", "post_ft_val_accuracy", "ft_gain_val"])
def test_fine_tune_selection_metrics_need_the_fine_tune_stage(metric: str) -> None:
    with pytest.raises(ConfigError, match=rf"^objectives.{metric}: needs finetune.enabled: true"):
        config_from_dict({"objectives": {metric: "maximize"}})


@pytest.mark.parametrize(
    "rule", ["max test_accuracy", "max val_accuracy where test_accuracy >= 0.5", "max post_ft_accuracy"]
)
def test_a_pick_rule_cannot_select_on_test(rule: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_pick(rule)
    assert str(exc.value).startswith("--pick: ") and TEST_SPLIT_RULE in str(exc.value)


def test_an_energy_objective_with_energy_switched_off_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^constraints.kd_energy_j: is an energy figure, and measure.energy"):
        config_from_dict({"constraints": {"kd_energy_j": 100.0}, "measure": {"energy": {"enabled": False}}})


def test_fine_tune_stage_selects_on_val_and_reports_test(tmp_path: Path) -> None:
    """One real trial with the fine-tune stage: the objective is the val figure, the test figures
    sit beside it, marked for reporting, and the distilled student's own figures are unchanged."""
    raw = yaml.safe_load(SMOKE.read_text())
    raw["objectives"] = {"val_accuracy": "maximize", "post_ft_val_accuracy": "maximize"}
    raw["finetune"] = {"enabled": True, "epochs": 2}
    study_file = tmp_path / "ft.yaml"
    study_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    run_dir = tmp_path / "run"
    code = run_cli(
        "optimize", "--config", study_file, "--n-trials", "1", "--run-dir", run_dir, "--plain",
        "--set", "data.finetune_fraction=0.2",
    )
    assert code == 0
    (t,) = load_study(default_storage_url(run_dir, "smoke"), "smoke").get_trials()
    ua = t.user_attrs
    assert t.values == [ua["val_accuracy"], ua["post_ft_val_accuracy"]]
    assert ua["pre_ft_val_accuracy"] == ua["val_accuracy"] and ua["pre_ft_accuracy"] == ua["test_accuracy"]
    assert ua["ft_gain_val"] == pytest.approx(ua["post_ft_val_accuracy"] - ua["pre_ft_val_accuracy"])
    assert ua["ft_gain"] == pytest.approx(ua["post_ft_accuracy"] - ua["pre_ft_accuracy"])
    methods = ua["methods"]
    assert methods["post_ft_val_accuracy"]["split"] == "val" and methods["post_ft_val_accuracy"]["use"] == "selection"
    assert methods["post_ft_accuracy"]["split"] == "test" and methods["post_ft_accuracy"]["use"] == "reporting only"
    assert ua["train_dtype"] == "fp32" and ua["kd_history"]["train_dtype"] == "fp32"


# -- what this machine can measure --------------------------------------------------------------

_NO_NVML = "nvml: init failed (NVMLError: Driver Not Loaded)"

# (objective or constraint, CUDA visible, NVML energy reason (None: usable), error fragment or None)
MEASURABLE = [
    ("val_accuracy", False, _NO_NVML, None),
    ("latency_ms_b1", False, _NO_NVML, None),  # the trial's device: the CPU here
    ("latency_ms_b1_cpu", False, _NO_NVML, None),
    ("latency_ms_b1_cuda", False, None, "can only be measured on a CUDA GPU"),
    ("peak_kd_memory_mb", False, None, "can only be measured on a CUDA GPU"),
    ("peak_kd_memory_total_mb", False, None, "can only be measured on a CUDA GPU"),
    ("peak_infer_memory_mb_b1", False, None, "can only be measured on a CUDA GPU"),
    ("kd_energy_j", False, None, "can only be measured on a CUDA GPU"),
    ("peak_kd_memory_mb", True, _NO_NVML, None),  # memory needs CUDA, not NVML
    ("latency_ms_b1_cuda", True, _NO_NVML, None),
    ("kd_energy_j", True, _NO_NVML, "Driver Not Loaded"),
    ("kd_energy_mj_per_image", True, "mig: NVML energy and power cover the whole GPU", "mig:"),
    ("kd_mean_power_w", True, _NO_NVML, "needs NVML energy"),
    ("infer_energy_mj_per_image", True, _NO_NVML, "needs NVML energy"),
    ("infer_energy_mj_per_image_b1", True, _NO_NVML, "needs NVML energy"),
    ("infer_energy_mj_per_image_b1", True, None, None),
]


@pytest.mark.parametrize("section", ["objectives", "constraints"])
@pytest.mark.parametrize(("metric", "cuda", "nvml", "fragment"), MEASURABLE)
def test_an_unmeasurable_objective_is_refused(section: str, metric: str, cuda: bool, nvml: str | None,
                                              fragment: str | None) -> None:
    value = "minimize" if section == "objectives" else 1.0e9
    # A _cpu/_cuda latency must be one the study measures (else it is refused when the file loads).
    suffix = metric.rsplit("_", 1)[-1] if metric.startswith("latency") else ""
    devices = [f"measure.latency.devices=[auto, {suffix}]"] if suffix in ("cpu", "cuda") else []
    cfg = apply_overrides(load_config(SMOKE), [f"{section}.{metric}={value}", *devices])
    if fragment is None:
        check_measurable(cfg, cuda_available=cuda, energy_reason=nvml)
        return
    with pytest.raises(ConfigError) as exc:
        check_measurable(cfg, cuda_available=cuda, energy_reason=nvml)
    text = str(exc.value)
    assert text.startswith(f"{section}.{metric}: ") and fragment in text and "\n" not in text
    assert "; " in text  # and the fix


def test_nvml_is_not_asked_unless_an_energy_figure_is_wanted() -> None:
    def boom() -> str | None:
        raise AssertionError("NVML probed for a study without an energy figure")

    cfg = apply_overrides(load_config(SMOKE), ["objectives.peak_kd_memory_mb=minimize"])
    check_measurable(cfg, cuda_available=True, energy_reason=boom)


def test_an_energy_objective_on_the_cpu_is_refused_before_the_study_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine, also on a GPU host
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    code = run_cli("optimize", "--config", SMOKE, "--run-dir", run_dir, "--plain",
                   "--set", "objectives.kd_energy_mj_per_image=minimize")
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: objectives.kd_energy_mj_per_image: ") and "\n" not in err
    assert "CUDA" in err and elapsed < 10.0  # seconds, not a box per trial
    assert not (run_dir / "smoke" / "journal.log").exists()  # no study was created


# -- workers and GPUs ---------------------------------------------------------------------------

# (workers, visible GPUs, study.share_gpu, workers per GPU or None for an error)
WORKERS = [
    (1, 0, False, 1),  # CPU machine: CPU workers split the cores
    (4, 0, False, 1),
    (1, 1, False, 1),
    (2, 2, False, 1),
    (2, 1, False, None),
    (3, 2, False, None),
    (2, 1, True, 2),
    (3, 2, True, 2),
]


@pytest.mark.parametrize(("workers", "gpus", "share", "per_gpu"), WORKERS)
def test_workers_beyond_the_gpus_only_on_purpose(workers: int, gpus: int, share: bool, per_gpu: int | None) -> None:
    cfg = apply_overrides(load_config(SMOKE), [f"study.share_gpu={str(share).lower()}"])
    if per_gpu is not None:
        assert check_workers(cfg, workers, gpus) == per_gpu
        return
    with pytest.raises(ConfigError) as exc:
        check_workers(cfg, workers, gpus)
    text = str(exc.value)
    assert text.startswith("--workers: ") and "study.share_gpu: true" in text and f"--workers {gpus}" in text


def test_optimize_refuses_two_workers_on_one_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import kdsearch.search.supervisor as supervisor

    monkeypatch.setattr(supervisor, "_visible_gpus", lambda: ["0"])
    # One usable GPU, as the device decision would find it (it refuses before any worker starts).
    monkeypatch.setattr(supervisor, "resolve_study_device", lambda setting, facts: ("cuda", "device: cuda (faked)"))
    run_dir = tmp_path / "run"
    code = run_cli("optimize", "--config", SMOKE, "--run-dir", run_dir, "--plain", "--workers", "2")
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: --workers: 2 workers on 1 visible GPU(s)"), err
    assert not (run_dir / "smoke" / "journal.log").exists()


def test_a_worker_pinned_to_a_gpu_it_cannot_see_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device(expect_cuda=False).type == "cpu"
    with pytest.raises(KDSearchError, match=r"worker: pinned to GPU .* but .+ \(it would otherwise run on the CPU and measure the wrong device\)"):
        pick_device(expect_cuda=True)
    monkeypatch.setenv("KDSEARCH_EXPECT_CUDA", "1")
    with pytest.raises(KDSearchError, match="pinned to GPU"):
        pick_device()


def test_a_cpu_worker_refuses_a_gpu_only_objective(tmp_path: Path) -> None:
    cfg = apply_overrides(load_config(SMOKE), ["objectives.peak_kd_memory_mb=minimize"], run_dir=str(tmp_path))
    with pytest.raises(KDSearchError, match="peak_kd_memory_mb can only be measured on a CUDA device"):
        prepare_worker(cfg, run_paths(cfg.study.run_dir, cfg.study.name), torch.device("cpu"))


# -- training precision -------------------------------------------------------------------------

# (device type, compute capability, native bf16, distill.amp, train dtype); the table over GPU
# generations is tests/distill/test_precision.py
DTYPES = [
    ("cuda", (9, 0), True, True, "bf16"),  # Ampere, Hopper
    ("cuda", (7, 5), False, True, "fp16"),  # Turing, Volta: fp16 autocast + GradScaler
    ("cuda", (9, 0), True, False, "fp32"),
    ("cuda", (7, 5), False, False, "fp32"),
    ("cpu", None, True, True, "fp32"),  # the CPU always trains in fp32
    ("cpu", None, False, True, "fp32"),
    ("cpu", None, False, False, "fp32"),
    ("mps", None, True, True, "fp32"),
]


@pytest.mark.parametrize(("device", "capability", "bf16", "amp", "expected"), DTYPES)
def test_train_dtype_selection(
    device: str, capability: tuple[int, int] | None, bf16: bool, amp: bool, expected: str
) -> None:
    assert select_train_dtype(device, capability, bf16, amp) == expected
    assert autocast_dtype(expected) == {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[expected]


def test_the_train_dtype_keys_the_teacher_cache() -> None:
    from kdsearch.config import TeacherCacheConfig
    from kdsearch.data import ViewSpec
    from kdsearch.distill import cache_key

    class Teacher:
        name, weights_sha256, input_size, interpolation = "t", "ab" * 32, 32, "bilinear"
        mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    class Bundle:
        fingerprint, num_classes = "f" * 64, 10

    args = (Teacher(), Bundle(), TeacherCacheConfig(views=2), ViewSpec(32, 4, True))
    keys = {d: cache_key(*args, dtype=d) for d in ("bf16", "fp16", "fp32")}
    assert len(set(keys.values())) == 3
    assert cache_key(*args) not in keys.values()  # unset: the key of a cache built the default way
