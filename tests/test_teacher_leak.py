"""Issue 22, a comparison with the teacher that a leak cannot inflate: a teacher trained on the
validation images is named at the start of a study, the verdict is stored, and every "vs teacher"
figure compares test accuracies (a split the teacher did not train on)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import save_file

from kdsearch.config import apply_overrides, load_config
from kdsearch.data import load_data, preprocess
from kdsearch.models.teacher import LEAK_MIN_GAP, LEAK_Z, val_leak_check
from kdsearch.report.trials_table import VS_TEACHER, leak_warnings, trials_table
from kdsearch.storage import default_storage_url, load_study

from cli_helpers import SMOKE, run_cli

# The smoke study's tiny ViT, on the smoke study's synthetic data with a larger test split (so
# the binomial noise of the val - test difference is small).
TINY_VIT = {"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2}
TEST_SIZE = 512


def test_the_rule_needs_a_gap_above_three_points_and_above_the_noise() -> None:
    # The user: 78.6 % val (5,000 images) against 69.65 % test (10,000): a leak.
    leak = val_leak_check("ViT", 0.786, 0.6965, 5000, 10000)
    assert leak["suspected"] and "probably trained on the validation images" in leak["message"]
    se = math.sqrt(0.786 * 0.214 / 5000 + 0.6965 * 0.3035 / 10000)
    assert leak["gap_points"] == pytest.approx(8.95) and leak["noise_points"] == pytest.approx(100 * LEAK_Z * se, abs=1e-3)
    # Within 3 points on big splits: not a leak, however significant.
    small = val_leak_check("ViT", 0.70 + LEAK_MIN_GAP - 0.001, 0.70, 50000, 50000)
    assert not small["suspected"] and small["message"] is None
    # 10 points on 20-image splits is noise (3 standard errors are about 25 points).
    noisy = val_leak_check("ViT", 0.95, 0.85, 20, 20)
    assert not noisy["suspected"] and noisy["noise_points"] > 10
    # A teacher that does better on test than on val is no leak.
    assert not val_leak_check("ViT", 0.80, 0.90, 5000, 10000)["suspected"]


def _text(table: object) -> list[list[str]]:
    console = Console(file=io.StringIO(), width=220, color_system=None)
    console.print(table)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    return [[c.strip() for c in line.strip("│").split("│")] for line in out.splitlines() if line.startswith("│")]


def _teacher_trained_on_train_and_val(cfg_path: Path, out: Path) -> Path:
    """A tiny ViT trained on train + val of the study's own split: its val accuracy is inflated."""
    cfg = load_config(cfg_path)
    bundle = load_data(cfg.data)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=bundle.num_classes, **TINY_VIT)
    x = preprocess(torch.cat([bundle.train.images, bundle.val.images]), 16, bundle.mean, bundle.std)
    y = torch.cat([bundle.train.labels, bundle.val.labels])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(40):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 64):
            j = perm[i : i + 64]
            loss = F.cross_entropy(model(x[j]), y[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
    path = out / "teacher-train-and-val.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.mark.slow
def test_a_teacher_trained_on_val_is_named_and_the_comparison_is_on_test(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study_file = tmp_path / "leak.yaml"
    study_file.write_text(SMOKE.read_text().replace("name: smoke", "name: leak")
                          .replace("synthetic_test_size: 128", f"synthetic_test_size: {TEST_SIZE}"))
    weights = _teacher_trained_on_train_and_val(study_file, tmp_path)
    run_dir = tmp_path / "run"
    code = run_cli("optimize", "--config", study_file, "--n-trials", "1", "--run-dir", run_dir, "--plain",
                   "--set", f"teacher.checkpoint={weights}", "--set", "teacher.fit.enabled=false")
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    study = load_study(default_storage_url(run_dir, "leak"), "leak")
    teacher = study.user_attrs["teachers"]["ViT-tiny"]
    val_acc, test_acc = teacher["val_accuracy"], teacher["test_accuracy"]
    cfg = apply_overrides(load_config(study_file))
    bundle = load_data(cfg.data)
    assert val_acc - test_acc > LEAK_MIN_GAP, (val_acc, test_acc)  # the leak is real
    leak = teacher["val_leak"]
    # Stored with the study, said plainly at the start (console, --plain) and under the tables.
    assert leak["suspected"] and (leak["val_images"], leak["test_images"]) == (len(bundle.val), len(bundle.test))
    assert leak_warnings(study) == [leak["message"]]
    start = out.index("warning: teacher ViT-tiny: val accuracy")
    assert start < out.index("trial    0"), "the warning comes before the first trial"
    assert "probably trained on the validation images" in out[start:]
    # Every "vs teacher" figure: the student's test accuracy minus the teacher's.
    trial = study.trials[0]
    rows = _text(trials_table(study, pareto=False))
    header = next(line for line in _text_header(trials_table(study, pareto=False)))
    col = header.index(VS_TEACHER)
    student_row = next(r for r in rows if r[0] == "0")
    assert student_row[col] == f"{100 * (trial.user_attrs['test_accuracy'] - test_acc):+.2f} pts"
    assert rows[0][col] == f"test {100 * test_acc:.2f}%"
    # `kdsearch trials` repeats the warning (stderr), selection stays on val.
    assert run_cli("trials", "--study-name", "leak", "--run-dir", run_dir) == 0
    assert "probably trained on the validation images" in capsys.readouterr().err
    assert study.metric_names[0] == "val_accuracy" and trial.values[0] == trial.user_attrs["val_accuracy"]


def _text_header(table: object) -> list[list[str]]:
    console = Console(file=io.StringIO(), width=220, color_system=None)
    console.print(table)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    return [[c.strip() for c in line.strip("┃").split("┃")] for line in out.splitlines() if line.startswith("┃")]
