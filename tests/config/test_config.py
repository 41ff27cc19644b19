"""Study files: loading, validation, overrides, and the shipped studies."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdsearch.config import (
    Space,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_duration,
)
from kdsearch.errors import ConfigError
from kdsearch.metrics import is_known_metric

STUDIES = Path(__file__).resolve().parents[2] / "studies"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), ("24h", 86400), ("1h30m", 5400), ("1.5h", 5400), (45, 45), ("2d", 172800), ("250ms", 0.25)],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "2x", "h", "-5m", "5m3", 0, True, None, "1h 2q"])
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_duration(bad, "study.budget")
    assert str(exc.value).startswith("study.budget:")


def test_unknown_key_suggests_close_match() -> None:
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"distill": {"temprature": 3}})
    assert str(exc.value) == "distill.temprature: unknown key 'temprature' in distill; did you mean 'temperature'?"


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"student": {"vgg": {"depth": [2, 7]}}}, "student.vgg.depth: must be one of"),
        ({"student": {"resolution": [8, 32]}}, "student.resolution"),
        ({"distill": {"alpha": 1.5}}, "distill.alpha: must be <= 1.0"),
        ({"distill": {"batch_size": "big"}}, "distill.batch_size: must be an integer"),
        ({"objectives": {"val_acc": "maximize"}}, "did you mean 'val_accuracy'"),
        ({"objectives": {"val_accuracy": "up"}}, "must be maximize or minimize"),
        ({"objectives": {"latency_ms_b7": "minimize"}}, "objectives.latency_ms_b7: is measured only at the batch sizes"),
        # Figures this study's own measurement settings never produce (issue 19).
        ({"objectives": {"latency_ms_b1_cpu": "minimize"}}, "add cpu to measure.latency.devices"),
        ({"constraints": {"latency_ms_b64_ort": 3}}, "add ort-cpu to measure.latency.devices, e.g. [auto, ort-cpu]"),
        ({"constraints": {"latency_ms_b1": 3}, "measure": {"latency": {"devices": ["cuda"]}}},
         "constraints.latency_ms_b1: is measured only when measure.latency.devices lists auto (it lists [cuda])"),
        ({"objectives": {"val_accuracy": "maximize", "peak_infer_memory_mb_b8": "minimize"}},
         "add 8 to measure.latency.batch_sizes, e.g. [1, 8, 64]"),
        ({"objectives": {"val_accuracy": "maximize", "kd_mean_power_w": "minimize"},
          "measure": {"energy": {"enabled": False}}}, "set measure.energy.enabled: true"),
        ({"constraints": {"params": "lots"}}, "constraints.params: must be a finite number"),
        ({"study": {"sampler": "tpee"}}, "did you mean 'tpe'"),
        ({"study": {"storage": "redis://x"}}, "study.storage"),
        ({"study": {"name": "a b"}}, "study.name"),
        ({"data": {"dataset": "cifar11"}}, "did you mean 'cifar10'"),
        ({"data": {"dataset": "imagefolder"}}, "data.root: is required"),
        ({"teacher": {"mode": "live"}}, "teacher.mode"),
        ({"teacher": {"checkpoint": "w.txt"}}, "teacher.checkpoint"),
        ({"study": {"sampler": "grid"}}, "the grid sampler needs a list"),
        ({"teacher": [{"name": "resnet18"}, {"name": "resnet18"}]}, "distinct names"),
        ({"finetune": {"enabled": True}}, "data.finetune_fraction"),
        ({"bogus": 1}, "unknown key 'bogus'"),
        ({"distill": {"temperature": {"low": 4, "high": 2}}}, "'low' must be <= 'high'"),
    ],
)
def test_validation_errors_are_one_line(raw: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config_from_dict(raw)
    msg = str(exc.value)
    assert fragment in msg
    assert "\n" not in msg


def test_space_forms() -> None:
    cfg = config_from_dict(
        {"distill": {"temperature": 4, "alpha": [0.5, 0.9], "lr": {"low": 0.01, "high": 0.1, "log": True}}}
    )
    assert cfg.distill.temperature == Space(choices=(4.0,))
    assert cfg.distill.temperature.is_fixed
    assert cfg.distill.alpha.values() == [0.5, 0.9]
    assert cfg.distill.lr.log and cfg.distill.lr.low == 0.01
    stepped = Space.parse({"low": 16, "high": 32, "step": 8}, "student.resolution", kind=int)
    assert stepped.values() == [16, 24, 32]


def test_round_trip_and_overrides() -> None:
    cfg = load_config(STUDIES / "smoke.yaml")
    assert config_from_dict(config_to_dict(cfg)) == cfg
    over = apply_overrides(
        cfg,
        ["distill.temperature=[2, 4]", "constraints.params=1e6", "student.vgg.depth=[2, 3]"],
        budget="90s",
        trial_time="3s",
        study_name="other",
        n_trials=7,
        run_dir="/tmp/x",
        storage="sqlite:///x.db",
    )
    assert over.distill.temperature.values() == [2.0, 4.0]
    assert over.constraints == {"params": 1e6}
    assert over.student.vgg.depth.values() == [2, 3]
    assert (over.study.budget_s, over.study.trial_time_s, over.study.name) == (90.0, 3.0, "other")
    assert (over.study.n_trials, over.study.run_dir, over.study.storage) == (7, "/tmp/x", "sqlite:///x.db")
    with pytest.raises(ConfigError, match="unknown key 'temprature'"):
        apply_overrides(cfg, ["distill.temprature=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides(cfg, ["distill"])


def test_signature_ignores_budget_but_not_space() -> None:
    cfg = load_config(STUDIES / "smoke.yaml")
    assert apply_overrides(cfg, budget="9h", n_trials=3).search_signature() == cfg.search_signature()
    assert apply_overrides(cfg, ["student.vgg.depth=[2]"]).search_signature() != cfg.search_signature()


def test_known_metrics_follow_batch_sizes() -> None:
    cfg = load_config(STUDIES / "smoke.yaml")
    assert is_known_metric("latency_ms_b16", cfg.measure.latency.batch_sizes)
    assert not is_known_metric("latency_ms_b64", cfg.measure.latency.batch_sizes)
    assert is_known_metric("latency_ms_b1_cpu", cfg.measure.latency.batch_sizes)
    assert not is_known_metric("accuracy")


@pytest.mark.parametrize("path", sorted(STUDIES.rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_studies_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.objectives
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be an existing study file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


# -- early stop: the patience counts evaluations that can occur --------------------------------


@pytest.mark.parametrize(
    ("every", "patience", "ok"),
    [
        (0.25, 2, True),  # 3 in-box evaluations: the first sets the reference, 2 more can stop
        (0.25, 3, False),  # could only "fire" at the end of the box: the shipped study's old setting
        (0.1, 3, True),
        (0.1, 8, True),
        (0.1, 9, False),
        (0.2, 3, True),  # 4 in-box evaluations
        (0.3, 2, True),
        (0.5, 1, False),  # one in-box evaluation: nothing to compare it with
        (1.0, 1, False),  # no in-box evaluation at all
    ],
)
def test_early_stop_patience_must_be_reachable(every: float, patience: int, ok: bool) -> None:
    raw = {"distill": {"eval_every_fraction": every, "early_stop": {"enabled": True, "patience": patience}}}
    if ok:
        assert config_from_dict(raw).distill.early_stop.patience == patience
        return
    with pytest.raises(ConfigError) as exc:
        config_from_dict(raw)
    text = str(exc.value)
    assert text.startswith("distill.early_stop.patience: ") and "\n" not in text
    assert "eval_every_fraction" in text and f"(got {patience})" in text


def test_a_disabled_early_stop_is_not_checked() -> None:
    cfg = config_from_dict({"distill": {"eval_every_fraction": 1.0, "early_stop": {"enabled": False, "patience": 5}}})
    assert not cfg.distill.early_stop.enabled


def test_early_stop_defaults_are_consistent() -> None:
    cfg = config_from_dict({"distill": {"early_stop": {"enabled": True}}})
    assert cfg.distill.early_stop.patience == 2 and cfg.distill.early_stop.cooldown_fraction == 0.05


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [("cooldown_fraction", 0.6, "must be in [0, 0.5]"), ("min_delta", -0.1, "must be in [0, 1]")],
)
def test_early_stop_ranges(key: str, value: float, fragment: str) -> None:
    with pytest.raises(ConfigError, match=rf"distill.early_stop.{key}: {fragment}".replace("[", r"\[")):
        config_from_dict({"distill": {"early_stop": {key: value}}})


# -- the resume signature: every setting that changes a stored figure ---------------------------

# (--set overrides that change one setting, the signature path the mismatch must name)
SIGNATURE_FIELDS: list[tuple[list[str], str]] = [
    (["distill.temperature=3.0"], "distill.temperature"),
    (["distill.alpha=0.5"], "distill.alpha"),
    (["distill.lr=0.1"], "distill.lr"),
    (["distill.optimizer=adamw"], "distill.optimizer"),
    (["distill.weight_decay=0.01"], "distill.weight_decay"),
    (["distill.batch_size=32"], "distill.batch_size"),
    (["distill.warmup_fraction=0.1"], "distill.warmup_fraction"),
    (["distill.final_lr_fraction=0.1"], "distill.final_lr_fraction"),
    (["distill.eval_every_fraction=0.25"], "distill.eval_every_fraction"),
    (["distill.eval_subset=500"], "distill.eval_subset"),
    (["distill.early_stop.enabled=true", "distill.eval_every_fraction=0.1"], "distill.early_stop.enabled"),
    (["distill.early_stop.patience=3"], "distill.early_stop.patience"),
    (["distill.early_stop.min_delta=0.01"], "distill.early_stop.min_delta"),
    (["distill.early_stop.cooldown_fraction=0.1"], "distill.early_stop.cooldown_fraction"),
    (["distill.label_smoothing=0.1"], "distill.label_smoothing"),
    (["distill.compile=true"], "distill.compile"),
    (["distill.amp=false"], "distill.amp"),
    (["distill.channels_last=false"], "distill.channels_last"),
    (["measure.latency.batch_sizes=[1, 8]"], "measure.latency.batch_sizes"),
    (["measure.latency.devices=[auto, cpu]"], "measure.latency.devices"),
    (["measure.latency.cpu_threads=2"], "measure.latency.cpu_threads"),
    (["measure.latency.ort_threads=2"], "measure.latency.ort_threads"),
    (["measure.latency.ort_optimization=basic"], "measure.latency.ort_optimization"),
    (["measure.latency.warmup=2"], "measure.latency.warmup"),
    (["measure.latency.min_repeats=4"], "measure.latency.min_repeats"),
    (["measure.latency.max_repeats=40"], "measure.latency.max_repeats"),
    (["measure.latency.max_time=0.5s"], "measure.latency.max_time"),
    (["measure.latency.target_iqr_ratio=0.2"], "measure.latency.target_iqr_ratio"),
    (["measure.energy.enabled=false"], "measure.energy.enabled"),
    (["measure.energy.infer_min_time=3s"], "measure.energy.infer_min_time"),
    (["measure.energy.poll_interval=0.05s"], "measure.energy.poll_interval"),
    (["measure.eval_batch_size=128"], "measure.eval_batch_size"),
    (["measure.max_time=10s"], "measure.max_time"),
    (["study.grace=30s"], "measure.budget_s"),  # the grace sets the measurement budget when max_time is unset
    (["finetune.enabled=true", "data.finetune_fraction=0.1"], "finetune.enabled"),
    (["finetune.epochs=3"], "finetune.epochs"),
    (["finetune.lr=0.01"], "finetune.lr"),
    (["finetune.batch_size=32"], "finetune.batch_size"),
    (["finetune.unfreeze_last_block=true"], "finetune.unfreeze_last_block"),
    (["teacher.mean=[0.5, 0.5, 0.5]"], "teacher.mean"),
    (["teacher.std=[0.5, 0.5, 0.5]"], "teacher.std"),
    (["teacher.interpolation=bicubic"], "teacher.interpolation"),
    (["teacher.cache.views=2"], "teacher.cache.views"),
    (["data.val_fraction=0.3"], "data.val_fraction"),
    (["data.seed=1"], "data.seed"),
    (["data.finetune_fraction=0.1"], "data.finetune_fraction"),
    (["data.image_size=32"], "data.image_size"),
    (["data.max_train_samples=100"], "data.max_train_samples"),
    (["data.max_test_samples=50"], "data.max_test_samples"),
    (["data.num_classes=5"], "data.num_classes"),
    (["data.synthetic_train_size=400"], "data.synthetic_train_size"),
    (["data.synthetic_test_size=100"], "data.synthetic_test_size"),
    (["study.trial_time=3s"], "trial_time_s"),
    (["study.sampler=random"], "sampler"),
    (["objectives.kd_time_s=minimize"], "objectives.kd_time_s"),
    (["constraints.params=1.0e6"], "constraints.params"),
]


def _leaves(obj: object, prefix: str = "") -> set[str]:
    if isinstance(obj, dict):
        return set().union(*(_leaves(v, f"{prefix}.{k}" if prefix else str(k)) for k, v in obj.items())) or {prefix}
    return {prefix}


def test_every_distill_measure_and_finetune_setting_has_a_signature_row() -> None:
    """A new key in these sections must get a row above (and so be proven in the signature)."""
    sig = load_config(STUDIES / "smoke.yaml").search_signature()
    leaves = {p for p in _leaves(sig) if p.split(".")[0] in ("distill", "measure", "finetune")}
    covered = {path for _, path in SIGNATURE_FIELDS}
    assert leaves - covered == set()


@pytest.mark.parametrize(("sets", "path"), SIGNATURE_FIELDS, ids=[p for _, p in SIGNATURE_FIELDS])
def test_resume_refuses_a_changed_setting_naming_it(sets: list[str], path: str, tmp_path: Path) -> None:
    from kdsearch.errors import StudyMismatchError
    from kdsearch.search.study import create_or_resume

    cfg = apply_overrides(load_config(STUDIES / "smoke.yaml"), run_dir=str(tmp_path))
    create_or_resume(cfg)
    changed = apply_overrides(cfg, sets)
    with pytest.raises(StudyMismatchError) as exc:
        create_or_resume(changed)
    text = str(exc.value)
    assert "\n" not in text and "was stored with a different search" in text
    assert path in text, text
    # Settings that change no stored figure may change between runs.
    same, resumed = create_or_resume(apply_overrides(cfg, ["study.share_gpu=true", "data.num_workers=0"],
                                                     budget="9h", n_trials=2, workers=3))
    assert resumed
