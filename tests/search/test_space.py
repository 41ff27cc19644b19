"""The search space: what a trial proposes, fixed values, conditional params, grids."""

from __future__ import annotations

import optuna
import pytest

from kdsearch.config import config_from_dict
from kdsearch.search.space import grid_search_space, param_distributions, suggest


def test_fixed_values_are_not_suggested() -> None:
    cfg = config_from_dict({"student": {"family": "vgg", "resolution": 32, "vgg": {"depth": 5, "width": 0.25}}})
    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()
    p = suggest(trial, cfg, num_classes=10)
    assert trial.params == {}
    assert (p.spec.family, p.spec.arch.depth, p.spec.arch.width, p.spec.resolution, p.spec.num_classes) == ("vgg", 5, 0.25, 32, 10)
    assert (p.hyper.temperature, p.hyper.alpha) == (4.0, 0.9)


def test_searched_values_stay_in_their_space() -> None:
    cfg = config_from_dict({
        "student": {"resolution": [16, 32], "vgg": {"depth": [2, 3, 8], "width": {"low": 0.05, "high": 0.5, "log": True}}},
        "distill": {"temperature": {"low": 1, "high": 8}, "alpha": [0.5, 0.9]},
    })
    study = optuna.create_study(directions=["maximize"], sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        trial = study.ask()
        p = suggest(trial, cfg, 10)
        assert p.spec.arch.depth in (2, 3, 8) and 0.05 <= p.spec.arch.width <= 0.5 and p.spec.resolution in (16, 32)
        assert 1 <= p.hyper.temperature <= 8 and p.hyper.alpha in (0.5, 0.9)
        assert set(trial.params) == {"resolution", "vgg_depth", "vgg_width", "temperature", "alpha"}
        study.tell(trial, 0.0)


def test_family_search_only_suggests_the_chosen_family() -> None:
    cfg = config_from_dict({"student": {"family": ["vgg", "vit"], "resolution": [32, 64],
                                        "vit": {"embed_dim": [64, 100], "num_heads": [3, 4]}}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    families = set()
    for _ in range(30):
        trial = study.ask()
        p = suggest(trial, cfg, 10)
        families.add(p.spec.family)
        prefix = "vit_" if p.spec.family == "vit" else "vgg_"
        other = "vgg_" if prefix == "vit_" else "vit_"
        assert not any(k.startswith(other) for k in trial.params)
        if p.spec.family == "vit":
            assert p.spec.arch.embed_dim % p.spec.arch.num_heads == 0  # rounded up to a multiple of heads
            assert p.spec.resolution % p.spec.arch.patch_size == 0
        study.tell(trial, 0.0)
    assert families == {"vgg", "vit"}


def test_teacher_list_is_a_categorical_param() -> None:
    cfg = config_from_dict({"teacher": [{"name": "resnet18", "label": "CNN"}, {"name": "vit_tiny_patch16_224", "label": "ViT"}]})
    assert param_distributions(cfg)["teacher"].values() == ["CNN", "ViT"]
    p = suggest(optuna.trial.FixedTrial({"teacher": "ViT", "vgg_depth": 2, "vgg_width": 0.1, "resolution": 32}), cfg, 10)
    assert p.teacher.name == "vit_tiny_patch16_224"


def test_grid_space_lists_every_searched_value() -> None:
    cfg = config_from_dict({"study": {"sampler": "grid"},
                            "student": {"resolution": [32, 224], "vgg": {"depth": [2, 5], "width": [0.25, 0.5]}}})
    assert grid_search_space(cfg) == {"resolution": [32, 224], "vgg_depth": [2, 5], "vgg_width": [0.25, 0.5]}
    with pytest.raises(Exception, match="grid sampler"):
        config_from_dict({"study": {"sampler": "grid"}})
