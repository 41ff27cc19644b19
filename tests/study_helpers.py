"""Build a small REAL stored kdsearch study for report/export/dashboard/CLI tests.

``build_fixture_study(root)`` writes, under ``root/<study_name>/`` (the default run layout of
:func:`kdsearch.search.study.run_paths`):

* ``journal.log``: an Optuna ``JournalStorage(JournalFileBackend)`` study made through
  ``study.ask()``/``study.tell()`` with the storage contract of docs/ARCHITECTURE.md: metric names,
  every metric as a user attr (``None`` + a ``missing_metrics`` reason when not measured),
  ``methods``, ``spec``, ``student``, ``teacher``, ``temperature``/``alpha``/``lr``, constraints through
  ``trial.set_constraint`` (Optuna 5), ``constraint_violations``/``feasible``, FAIL trials with
  ``fail_reason``/``fail_detail``, and study user attrs (``config``, ``environment``, ...);
* ``artifacts/``: a ``FileSystemArtifactStore`` holding each COMPLETE trial's real student
  checkpoint (``kdsearch.checkpoint.save_student``) with ``artifact_id`` / ``weights_sha256``.

The trial table is fixed so tests can assert on known answers (objectives val_accuracy max,
macs min; constraint latency_ms_b1 <= 2.0 ms):

====  =====  ==========  =====  ========  =======  ==============================
  #   depth  width@res   acc    macs      lat ms   status
====  =====  ==========  =====  ========  =======  ==============================
  0   2      0.0625@16   0.41   1.0e5     0.5      feasible front
  1   3      0.125@32    0.62   8.0e5     1.2      feasible front
  2   3      0.0625@32   0.55   9.0e5     1.1      dominated by 1
  3   4      0.25@32     0.78   4.0e6     3.5      INFEASIBLE (latency over the limit)
  4   4      0.125@16    0.70   1.5e6     1.8      feasible front
  5   2      0.125@32    0.50   6.0e5     None     INFEASIBLE (latency missing)
  6   3      0.25@16     0.66   1.6e6     1.5      dominated by 4
  7   4      0.0625@32   0.74   2.5e6     1.95     feasible front
  8   -                                            FAIL (oom)
  9   -                                            FAIL (diverged)
====  =====  ==========  =====  ========  =======  ==============================

With ``n_objectives=3`` the third objective is ``kd_time_s`` (minimize).
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from kdsearch.checkpoint import save_student
from kdsearch.models import build_student
from kdsearch.models.spec import StudentSpec

__all__ = ["FixtureStudy", "build_fixture_study", "FIXTURE_ROWS", "LATENCY_LIMIT_MS"]

LATENCY_LIMIT_MS = 2.0
NUM_CLASSES = 10

# number: (depth, width, resolution, val_accuracy, macs, latency_ms_b1 or None, kd_time_s)
FIXTURE_ROWS: dict[int, tuple[int, float, int, float, float, float | None, float]] = {
    0: (2, 0.0625, 16, 0.41, 1.0e5, 0.5, 31.5),
    1: (3, 0.125, 32, 0.62, 8.0e5, 1.2, 42.25),
    2: (3, 0.0625, 32, 0.55, 9.0e5, 1.1, 40.0),
    3: (4, 0.25, 32, 0.78, 4.0e6, 3.5, 58.75),
    4: (4, 0.125, 16, 0.70, 1.5e6, 1.8, 45.5),
    5: (2, 0.125, 32, 0.50, 6.0e5, None, 33.0),
    6: (3, 0.25, 16, 0.66, 1.6e6, 1.5, 50.0),
    7: (4, 0.0625, 32, 0.74, 2.5e6, 1.95, 44.0),
}
FAILS: dict[int, tuple[str, str]] = {
    8: ("oom", "CUDA out of memory at batch 256 (tried 2 halvings)"),
    9: ("diverged", "loss became NaN at step 412"),
}


@dataclass
class FixtureStudy:
    """Where the fixture study lives and what it holds (trial numbers by category)."""

    run_dir: Path
    study_name: str
    storage_url: str
    journal: Path
    artifact_dir: Path
    directions: list[str]
    metric_names: list[str]
    complete: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    infeasible: list[int] = field(default_factory=list)
    feasible_front: list[int] = field(default_factory=list)
    specs: dict[int, StudentSpec] = field(default_factory=dict)
    latency_limit_ms: float = LATENCY_LIMIT_MS

    def open(self) -> optuna.Study:
        storage = JournalStorage(JournalFileBackend(str(self.journal)))
        return optuna.load_study(study_name=self.study_name, storage=storage)


def _metrics(row: tuple[int, float, int, float, float, float | None, float], params: int) -> dict[str, Any]:
    depth, width, res, acc, macs, lat, kd_time = row
    return {
        "val_accuracy": acc,
        "test_accuracy": round(acc - 0.0125, 4),
        "kd_time_s": kd_time,
        "params": params,
        "macs": macs,
        "model_size_mb": round(params * 4 / 1e6, 6),
        "activation_peak_mb_b1": round(0.01 * res * depth, 4),
        "peak_kd_memory_mb": None,
        "kd_energy_j": None,
        "infer_energy_mj_per_image": None,
        "latency_ms_b1": lat,
        "latency_p90_ms_b1": None if lat is None else round(lat * 1.1, 4),
    }


def build_fixture_study(
    root: str | Path,
    study_name: str = "fixture",
    n_objectives: int = 2,
    with_failures: bool = True,
    teacher: str = "deit_tiny",
    dataset: str = "synthetic",
) -> FixtureStudy:
    """Create the fixture study under ``root/<study_name>/`` and return where it lives."""
    if n_objectives not in (2, 3):
        raise ValueError("n_objectives must be 2 or 3")
    root = Path(root)
    run = root / study_name
    run.mkdir(parents=True, exist_ok=True)
    journal = run / "journal.log"
    artifacts = run / "artifacts"
    artifacts.mkdir(exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(journal)))
    names = ["val_accuracy", "macs"] + (["kd_time_s"] if n_objectives == 3 else [])
    directions = ["maximize", "minimize"] + (["minimize"] if n_objectives == 3 else [])
    study = optuna.create_study(study_name=study_name, storage=storage, directions=directions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(names)
    study.set_user_attr(
        "config",
        {
            "study": {"name": study_name, "sampler": "tpe", "trial_time": 60.0},
            "data": {"dataset": dataset, "val_fraction": 0.1, "seed": 0},
            "objectives": dict(zip(names, directions, strict=False)),
            "constraints": {"latency_ms_b1": LATENCY_LIMIT_MS},
        },
    )
    study.set_user_attr(
        "environment",
        {"device": "cpu", "device_name": "Test CPU", "torch": torch.__version__, "optuna": optuna.__version__,
         "python": "3.11", "host": "testhost"},
    )
    study.set_user_attr("time_spent_s", 1234.5)
    study.set_user_attr("teachers", {teacher: {"val_accuracy": 0.91, "test_accuracy": 0.9, "weights_sha256": "ab" * 32}})
    study.set_user_attr("kdsearch_version", "0.1.0")
    store = FileSystemArtifactStore(str(artifacts))

    fx = FixtureStudy(run_dir=root, study_name=study_name, storage_url=f"journal:{journal}", journal=journal,
                      artifact_dir=artifacts, directions=directions, metric_names=names)
    numbers = sorted(list(FIXTURE_ROWS) + (list(FAILS) if with_failures else []))
    for number in numbers:
        if number in FIXTURE_ROWS:
            depth, width, res = FIXTURE_ROWS[number][:3]
            params_in = {"family": "vgg", "resolution": res, "vgg_depth": depth, "vgg_width": width,
                         "temperature": 2.0 + number % 3, "alpha": 0.5 + 0.05 * number, "lr": 1e-3 * (1 + number % 2)}
        else:
            params_in = {"family": "vgg", "resolution": 32, "vgg_depth": 4, "vgg_width": 0.25,
                         "temperature": 4.0, "alpha": 0.7, "lr": 2e-3}
        study.enqueue_trial(params_in)
        trial = study.ask()
        assert trial.number == number
        p = {
            "family": trial.suggest_categorical("family", ["vgg"]),
            "resolution": trial.suggest_categorical("resolution", [16, 32]),
            "vgg_depth": trial.suggest_categorical("vgg_depth", [2, 3, 4]),
            "vgg_width": trial.suggest_float("vgg_width", 0.03125, 0.5, log=True),
            "temperature": trial.suggest_float("temperature", 1.0, 8.0),
            "alpha": trial.suggest_float("alpha", 0.0, 1.0),
            "lr": trial.suggest_float("lr", 1e-4, 1e-2, log=True),
        }
        spec = StudentSpec("vgg", int(p["resolution"]), NUM_CLASSES, {"depth": int(p["vgg_depth"]), "width": float(p["vgg_width"])})
        trial.set_user_attr("spec", spec.to_dict())
        trial.set_user_attr("student", spec.label)
        trial.set_user_attr("teacher", teacher)
        trial.set_user_attr("teacher_name", teacher)
        trial.set_user_attr("temperature", p["temperature"])
        trial.set_user_attr("alpha", p["alpha"])
        trial.set_user_attr("lr", p["lr"])
        trial.set_user_attr("dataset", dataset)
        if number in FAILS:
            reason, detail = FAILS[number]
            trial.set_user_attr("fail_reason", reason)
            trial.set_user_attr("fail_detail", detail)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            fx.failed.append(number)
            continue
        torch.manual_seed(1000 + number)
        model = _nontrivial(build_student(spec)).eval()
        n_params = sum(q.numel() for q in model.parameters())
        metrics = _metrics(FIXTURE_ROWS[number], n_params)
        for k, v in metrics.items():
            trial.set_user_attr(k, v)
        missing = {
            "peak_kd_memory_mb": "cpu: torch.cuda.max_memory_allocated is CUDA-only",
            "kd_energy_j": "unavailable: NVML not available on this machine",
            "infer_energy_mj_per_image": "unavailable: NVML not available on this machine",
        }
        if metrics["latency_ms_b1"] is None:
            missing["latency_ms_b1"] = "error: RuntimeError during timing"
            missing["latency_p90_ms_b1"] = "error: RuntimeError during timing"
        trial.set_user_attr("missing_metrics", missing)
        trial.set_user_attr("methods", {
            "latency_ms_b1": {"method": "perf_counter", "device": "cpu", "repeats": 50, "batch_size": 1},
            "macs": {"method": "ptflops"},
            "val_accuracy": {"method": "top1"},
            "kd_energy_j": {"method": "unavailable"},
        })
        lat = metrics["latency_ms_b1"]
        violation = 1e18 if lat is None else lat - LATENCY_LIMIT_MS
        trial.set_constraint("latency_ms_b1", violation)
        trial.set_user_attr("constraint_violations", {"latency_ms_b1": violation})
        trial.set_user_attr("feasible", violation <= 0)
        if violation > 0:
            trial.set_user_attr(
                "infeasible_reason",
                "latency_ms_b1 missing (error)" if lat is None else f"latency_ms_b1={lat:.4g} > {LATENCY_LIMIT_MS:.4g}",
            )
            fx.infeasible.append(number)
        trial.set_user_attr("kd_history", {"val": [[1.0, metrics["val_accuracy"] / 2], [2.0, metrics["val_accuracy"]]]})
        trial.set_user_attr("device", "cpu")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"trial-{number}.safetensors"
            sha = save_student(model, spec, path, {"teacher": teacher, "trial": str(number)})
            artifact_id = upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial)
        trial.set_user_attr("artifact_id", artifact_id)
        trial.set_user_attr("weights_sha256", sha)
        study.tell(trial, [metrics[n] for n in names])
        fx.complete.append(number)
        fx.specs[number] = spec
    fx.feasible_front = [0, 1, 4, 7] if n_objectives == 2 else _front3(fx)
    return fx


def _nontrivial(model: torch.nn.Module) -> torch.nn.Module:
    """Give the fresh student weights whose outputs are O(1) and whose BatchNorm statistics are
    not the identity, so export comparisons (|diff| <= 1e-4) test something."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.normal_(0.0, mod.in_features**-0.5)
                if mod.bias is not None:
                    mod.bias.normal_(0.0, 0.1)
            elif isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0.0, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0.0, 0.1)
    return model


def _front3(fx: FixtureStudy) -> list[int]:
    feas = [n for n in fx.complete if n not in fx.infeasible]
    pts = {n: (-FIXTURE_ROWS[n][3], FIXTURE_ROWS[n][4], FIXTURE_ROWS[n][6]) for n in feas}

    def dom(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return all(x <= y for x, y in zip(a, b, strict=False)) and a != b

    return sorted(n for n in feas if not any(dom(pts[m], pts[n]) for m in feas if m != n))
