"""The paper's study files (studies/paper/): they load, their grids are the paper's cells, the
Table II students match the paper's parameter counts, each runs one real trial on synthetic data,
and the sampler-comparison script computes the hypervolume Optuna does."""

from __future__ import annotations

import importlib.util
import itertools
import math
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from kdsearch.config import config_from_dict, load_config
from kdsearch.models import StudentSpec, build_student, student_param_count
from kdsearch.models.families.vgg import vgg_width_for_params
from kdsearch.models.families.vit import ViTConfig
from kdsearch.search.space import grid_search_space, param_distributions, suggest
from kdsearch.storage import default_storage_url, load_study

from cli_helpers import ROOT, run_cli

PAPER = ROOT / "studies" / "paper"
STUDY_FILES = {
    "table1-arch": PAPER / "table1-arch.yaml",
    "table2-capacity-resolution": PAPER / "table2-capacity-resolution.yaml",
    "table3-finetune": PAPER / "table3-finetune.yaml",
    "search-vs-grid": PAPER / "search-vs-grid.yaml",
    "kd-time": PAPER / "kd-time.yaml",
}
# The paper's Table II student sizes (parameters): Extra Small .. Extra Large.
PAPER_SIZES = {"XS": 0.0042e6, "S": 0.016e6, "M": 0.062e6, "L": 0.25e6, "XL": 0.98e6}


def _compare_samplers() -> Any:
    spec = importlib.util.spec_from_file_location("compare_samplers", PAPER / "compare_samplers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_paper_study_file_is_listed() -> None:
    assert sorted(p.name for p in PAPER.glob("*.yaml")) == sorted(p.name for p in STUDY_FILES.values())


@pytest.mark.parametrize("name", sorted(STUDY_FILES))
def test_study_file_loads_with_its_name(name: str) -> None:
    cfg = load_config(STUDY_FILES[name])
    assert cfg.study.name == name
    assert cfg.data.dataset == "imagefolder" and cfg.data.root  # real CIFAR-10 by default


def test_kd_time_searches_the_box_and_minimises_kd_time() -> None:
    cfg = load_config(STUDY_FILES["kd-time"])
    assert cfg.study.box_searched and cfg.study.trial_times_s == (10.0, 30.0, 90.0)
    assert cfg.objectives["kd_time_s"] == "minimize" and cfg.study.pruning.enabled


def test_table1_grid_is_teacher_type_by_student_type() -> None:
    cfg = load_config(STUDY_FILES["table1-arch"])
    assert cfg.study.sampler == "grid"
    assert grid_search_space(cfg) == {"teacher": ["CNN", "ViT"], "family": ["vgg", "vit"]}
    assert [t.name for t in cfg.teachers] == ["resnet18", "vit_tiny_patch16_224"]
    assert cfg.teachers[0].input_size == 32  # the CNN teacher runs at the data's side, not 224


def test_table2_grid_is_five_sizes_by_two_resolutions() -> None:
    cfg = load_config(STUDY_FILES["table2-capacity-resolution"])
    grid = grid_search_space(cfg)
    assert grid == {"resolution": [32, 224], "vgg_preset": list(PAPER_SIZES)}
    assert math.prod(len(v) for v in grid.values()) == 10
    assert len({p.depth for p in cfg.student.vgg.presets}) >= 2  # not one depth for every size


@pytest.mark.parametrize("name", sorted(PAPER_SIZES))
def test_table2_students_match_the_paper_sizes(name: str) -> None:
    """Each preset's width is what vgg_width_for_params gives for its depth, within 2 %."""
    cfg = load_config(STUDY_FILES["table2-capacity-resolution"])
    preset = next(p for p in cfg.student.vgg.presets if p.name == name)
    target = PAPER_SIZES[name]
    count = student_param_count(StudentSpec("vgg", 32, 10, {"depth": preset.depth, "width": preset.width}))
    assert abs(count - target) / target < 0.02, (name, count, target)
    best = vgg_width_for_params(preset.depth, target, num_classes=10)
    assert count == student_param_count(StudentSpec("vgg", 32, 10, {"depth": preset.depth, "width": best}))


def test_table3_splits_kd_finetune_and_evaluation() -> None:
    cfg = load_config(STUDY_FILES["table3-finetune"])
    assert cfg.finetune.enabled and cfg.data.finetune_fraction > 0
    assert grid_search_space(cfg) == {"family": ["vgg", "vit"]}
    assert "post_ft_val_accuracy" in cfg.objectives  # selection on val; the test figures only report


def test_search_study_opens_table2_to_the_full_space() -> None:
    search = load_config(STUDY_FILES["search-vs-grid"])
    table2 = load_config(STUDY_FILES["table2-capacity-resolution"])
    searched = {k for k, sp in param_distributions(search).items() if not sp.is_fixed}
    assert searched == {"vgg_depth", "vgg_width", "resolution", "temperature", "alpha"}
    # Same per-trial budget, data, teacher and objectives as the grid it is compared with.
    assert search.study.trial_time_s == table2.study.trial_time_s
    assert search.data == table2.data and search.teachers == table2.teachers
    assert search.objectives == table2.objectives
    # Every Table II cell lies inside the search space.
    for p in table2.student.vgg.presets:
        assert p.depth in search.student.vgg.depth.values()
        assert search.student.vgg.width.contains(p.width)
    assert set(table2.student.resolution.values()) <= set(search.student.resolution.values())


# ----------------------------------------------------------------------------------------------
# ViT students at every resolution a paper study can propose


def _vit_resolutions() -> list[int]:
    res: set[int] = set()
    for path in STUDY_FILES.values():
        cfg = load_config(path)
        if "vit" in cfg.student.family.values():
            res |= set(cfg.student.resolution.values())
    res |= set(load_config(ROOT / "studies" / "cifar10-deit.yaml").student.resolution.values())
    return sorted(res | {16, 224})


@pytest.mark.parametrize("resolution", _vit_resolutions())
def test_vit_space_builds_every_sampled_spec(resolution: int) -> None:
    """Every combination of the default ViT space, through ``suggest`` (which rounds the width
    up to a multiple of the heads), builds; the smallest and largest also run a forward."""
    space = ViTConfig()
    cfg = config_from_dict({"student": {"family": "vit", "resolution": resolution}})
    specs = []
    for depth, dim, heads, pps in itertools.product(space.depth.values(), space.embed_dim.values(),
                                                   space.num_heads.values(), space.patches_per_side.values()):
        trial = optuna.trial.FixedTrial({"vit_depth": depth, "vit_embed_dim": dim, "vit_num_heads": heads,
                                         "vit_patches_per_side": pps})
        spec = suggest(trial, cfg, 10).spec
        a = spec.arch
        assert spec.resolution % a.patch_size == 0 and a.embed_dim % a.num_heads == 0
        assert resolution // a.patch_size >= pps
        build_student(spec)
        specs.append(spec)
    for spec in (min(specs, key=student_param_count), max(specs, key=student_param_count)):
        with torch.no_grad():
            out = build_student(spec).eval()(torch.randn(1, 3, resolution, resolution))
        assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_table1_vit_student_at_its_resolution() -> None:
    cfg = load_config(STUDY_FILES["table1-arch"])
    spec = suggest(optuna.trial.FixedTrial({"teacher": "ViT", "family": "vit"}), cfg, 10).spec
    assert (spec.arch.depth, spec.arch.embed_dim, spec.arch.num_heads, spec.arch.patch_size) == (4, 64, 2, 4)
    assert student_param_count(spec) == 208_074


# ----------------------------------------------------------------------------------------------
# Hypervolume of the sampler comparison


def test_hypervolume_2d_known_answer() -> None:
    cs = _compare_samplers()
    # Two boxes of the staircase: (4-1)*(4-3) + (4-2)*(3-1) = 3 + 4; the dominated (3, 3) and the
    # point outside the reference add nothing.
    pts = [(1.0, 3.0), (2.0, 1.0), (3.0, 3.0), (5.0, 0.0)]
    assert cs.hypervolume_2d(pts, (4.0, 4.0)) == pytest.approx(7.0)
    assert cs.pareto_points(pts) == [(1.0, 3.0), (2.0, 1.0), (5.0, 0.0)]
    assert cs.hypervolume_2d([], (1.0, 1.0)) == 0.0


def test_hypervolume_matches_optunas_public_history_and_counts_first_n() -> None:
    cs = _compare_samplers()
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_metric_names(["val_accuracy", "macs"])
    rows = [(0.3, 5e6), (0.5, 2e7), (0.45, 3e7), (0.6, 9e7), (0.2, 1e6)]
    for acc, macs in rows:
        study.add_trial(optuna.trial.create_trial(values=[acc, macs], user_attrs={"val_accuracy": acc}))
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
    # On the raw scale (maximised objective negated) it is the number Optuna's public plot shows.
    raw_ref = (0.0, 1e8)  # accuracy 0 (negated: 0), 1e8 MACs
    fig = optuna.visualization.plot_hypervolume_history(study, reference_point=[0.0, 1e8])
    raw = cs.hypervolume_2d(cs.study_points(study, transform=False), (-raw_ref[0], raw_ref[1]))
    assert raw == pytest.approx(fig.data[0].y[-1], rel=1e-9)
    # The documented scale: (1 - acc, log10 macs), reference (0.9, 9.0); first 2 trials only.
    pts2 = cs.study_points(study, n=2)
    assert pts2 == [(pytest.approx(0.7), pytest.approx(math.log10(5e6))), (0.5, pytest.approx(math.log10(2e7)))]
    s = cs.summarise(study, 2, (0.9, 9.0))
    expected = (0.9 - 0.5) * (9.0 - math.log10(2e7)) + (0.9 - 0.7) * (math.log10(2e7) - math.log10(5e6))
    assert s["hypervolume"] == pytest.approx(expected)
    assert (s["trials"], s["complete"], s["best_val_accuracy"], s["front"]) == (2, 2, 0.5, 2)
    all_ = cs.summarise(study, None, (0.9, 9.0))
    assert (all_["trials"], all_["complete"], all_["front"]) == (6, 5, 4)
    assert all_["hypervolume"] > s["hypervolume"]


# ----------------------------------------------------------------------------------------------
# One real trial of each study, on synthetic data


def _tiny(raw: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The study with synthetic data, a 1 s box, a 2 s teacher fit and cheap measurements."""
    raw = dict(raw)
    raw["study"] = {**raw["study"], "trial_time": "1s", "grace": "2m", "n_trials": 1, "budget": "5m",
                    "run_dir": str(run_dir)}
    raw["data"] = {"dataset": "synthetic", "num_classes": 10, "synthetic_train_size": 200,
                   "synthetic_test_size": 60, "image_size": 32, "val_fraction": 0.2,
                   "finetune_fraction": raw["data"].get("finetune_fraction", 0.0)}
    teachers = raw["teacher"] if isinstance(raw["teacher"], list) else [raw["teacher"]]
    small = [{**t, "fit": {**t.get("fit", {}), "time": "2s"}, "cache": {**t.get("cache", {}), "views": 2}}
             for t in teachers]
    raw["teacher"] = small if isinstance(raw["teacher"], list) else small[0]
    if raw.get("finetune", {}).get("enabled"):
        raw["finetune"] = {**raw["finetune"], "epochs": 1}
    raw["measure"] = {"latency": {"batch_sizes": [1, 16], "min_repeats": 3, "max_repeats": 5, "max_time": "0.2s"},
                      "eval_batch_size": 64}
    return raw


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STUDY_FILES))
def test_paper_study_runs_one_trial_on_synthetic_data(name: str, tmp_path: Path) -> None:
    raw = _tiny(yaml.safe_load(STUDY_FILES[name].read_text()), tmp_path / "runs")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert run_cli("optimize", "--config", path, "--plain") == 0
    study = load_study(default_storage_url(tmp_path / "runs", name), name)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE]
    ua = trials[0].user_attrs
    assert 0.0 <= ua["val_accuracy"] <= 1.0 and ua["macs"] > 0
    cfg = load_config(STUDY_FILES[name])
    assert trials[0].values == [ua[m] for m in cfg.metric_names]
    teachers = study.user_attrs["teachers"]
    assert set(teachers) == {t.display_name for t in cfg.teachers}  # every teacher was fitted
    for info in teachers.values():
        assert 0.0 <= info["val_accuracy"] <= 1.0
    if cfg.finetune.enabled:
        assert ua["ft_gain"] == pytest.approx(ua["post_ft_accuracy"] - ua["pre_ft_accuracy"])
        assert ua["ft_gain_val"] == pytest.approx(ua["post_ft_val_accuracy"] - ua["pre_ft_val_accuracy"])
        assert ua["pre_ft_val_accuracy"] == ua["val_accuracy"] and ua["pre_ft_accuracy"] == ua["test_accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["resnet18", "resnet10t"])
def test_timm_cnn_teacher_fits_and_teaches_at_32px(teacher: str, tmp_path: Path) -> None:
    """A timm CNN from random init, pinned to 32 px, is fitted, cached and teaches a trial."""
    raw = yaml.safe_load(STUDY_FILES["table1-arch"].read_text())
    raw["teacher"] = [{**raw["teacher"][0], "name": teacher}]
    raw["student"] = {"family": "vgg", "resolution": 32, "vgg": {"depth": 2, "width": 0.25}}
    raw["study"]["sampler"] = "tpe"
    raw = _tiny(raw, tmp_path / "runs")
    path = tmp_path / "cnn.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert run_cli("optimize", "--config", path, "--plain") == 0
    study = load_study(default_storage_url(tmp_path / "runs", "table1-arch"), "table1-arch")
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]
    info = study.user_attrs["teachers"]["CNN"]
    assert 0.0 <= info["val_accuracy"] <= 1.0 and info["weights_sha256"]


# ----------------------------------------------------------------------------------------------
# student.vgg.presets (added for Table II): named (depth, width) pairs as one categorical param

PRESETS = [{"name": "XS", "depth": 4, "width": 0.0996}, {"depth": 8, "width": 0.4697}]


def test_presets_are_one_categorical_param() -> None:
    cfg = config_from_dict({"study": {"sampler": "grid"},
                            "student": {"resolution": [32, 224], "vgg": {"presets": PRESETS}}})
    # The default width is a continuous range, but presets replace it: the grid is still valid.
    assert grid_search_space(cfg) == {"resolution": [32, 224], "vgg_preset": ["XS", "d8-w0.4697"]}
    p = suggest(optuna.trial.FixedTrial({"resolution": 224, "vgg_preset": "d8-w0.4697"}), cfg, 10)
    assert (p.spec.family, p.spec.arch.depth, p.spec.arch.width, p.spec.resolution) == ("vgg", 8, 0.4697, 224)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        spec = suggest(trial, cfg, 10).spec
        assert set(trial.params) == {"resolution", "vgg_preset"}
        seen.add((spec.arch.depth, spec.arch.width))
        study.tell(trial, 0.0)
    assert seen == {(4, 0.0996), (8, 0.4697)}  # only the listed pairs, never a cross product


def test_presets_with_family_search_and_a_single_preset() -> None:
    cfg = config_from_dict({"student": {"family": ["vgg", "vit"], "vgg": {"presets": PRESETS}}})
    p = suggest(optuna.trial.FixedTrial({"family": "vit", "resolution": 32, "vit_depth": 2, "vit_embed_dim": 64,
                                         "vit_num_heads": 2, "vit_patches_per_side": 4}), cfg, 10)
    assert p.spec.family == "vit"
    one = config_from_dict({"student": {"resolution": 32, "vgg": {"presets": PRESETS[:1]}}})
    trial = optuna.create_study().ask()
    assert suggest(trial, one, 10).spec.arch.depth == 4 and trial.params == {}  # fixed: not suggested


def test_presets_round_trip_and_change_the_signature() -> None:
    from kdsearch.config import apply_overrides, config_to_dict

    cfg = config_from_dict({"student": {"vgg": {"presets": PRESETS}}})
    assert config_from_dict(config_to_dict(cfg)) == cfg
    other = apply_overrides(cfg, ["student.vgg.presets=[{depth: 5, width: 0.2}]"])
    assert [p.display_name for p in other.student.vgg.presets] == ["d5-w0.2"]
    assert other.search_signature() != cfg.search_signature()


@pytest.mark.parametrize(
    ("vgg", "message"),
    [
        ({"depth": [4, 8], "presets": PRESETS}, "student.vgg.presets: replaces student.vgg.depth"),
        ({"presets": [{"depth": 6, "width": 0.1}]}, "student.vgg.presets.depth: must be one of"),
        ({"presets": [{"depth": 4}]}, "student.vgg.presets.width: is required"),
        ({"presets": [{"depth": 4, "width": 4.0}]}, r"student.vgg.presets.width: must lie in \[1/128, 2.0\]"),
        ({"presets": [{"depth": 4, "width": 0.1, "nam": "x"}]}, "presets\\[0\\].nam: unknown key 'nam'.*'name'"),
        ({"presets": [{"depth": 4, "width": 0.1}, {"depth": 4, "width": 0.1}]}, "presets: need distinct names"),
        ({"presets": [{"depth": 4, "width": 0.1, "name": "a"}, {"depth": 4, "width": 0.1, "name": "b"}]},
         "must not repeat a \\(depth, width\\) pair"),
    ],
)
def test_bad_presets_are_one_line_errors(vgg: dict[str, Any], message: str) -> None:
    from kdsearch.errors import ConfigError

    with pytest.raises(ConfigError, match=message) as exc:
        config_from_dict({"student": {"vgg": vgg}})
    assert "\n" not in str(exc.value)
