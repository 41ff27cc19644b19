"""Study files: loading, validation, overrides, and the shipped studies."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdsearch.config import Space, apply_overrides, config_from_dict, config_to_dict, load_config, parse_duration
from kdsearch.metrics import is_known_metric
from kdsearch.errors import ConfigError

STUDIES = Path(__file__).resolve().parents[1] / "studies"


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
        ({"objectives": {"latency_ms_b7": "minimize"}}, "objectives.latency_ms_b7"),
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
