"""The family registry and StudentSpec: discovery, lookups, the spec's dict form (and the first,
union layout), the generic ``student`` section, and the contract every family's model keeps."""

from __future__ import annotations

import dataclasses
import pkgutil
import re
from dataclasses import dataclass

import optuna
import pytest
import torch
from torch import nn

import kdsearch.models.families as families_pkg
from kdsearch.config import Space, StudyConfig, config_from_dict, config_to_dict
from kdsearch.errors import ConfigError
from kdsearch.models import (
    StudentFamily,
    StudentSpec,
    UnknownFamilyError,
    build_student,
    family_names,
    get_family,
    param_groups,
)
from kdsearch.models.registry import SPEC_KEYS


def test_every_module_in_the_families_package_is_a_registered_family() -> None:
    modules = {m.name for m in pkgutil.iter_modules(families_pkg.__path__) if not m.name.startswith("_")}
    assert {"vgg", "vit"} <= modules
    assert set(family_names()) == modules
    for name in family_names():
        fam = get_family(name)
        assert fam.name == name
        assert not {f.name for f in dataclasses.fields(fam.arch)} & set(SPEC_KEYS)


def test_unknown_family_is_a_one_line_error_never_a_fallback() -> None:
    with pytest.raises(UnknownFamilyError, match=r"unknown student family 'vitt'; known: .*did you mean 'vit'\?$"):
        get_family("vitt")
    with pytest.raises(ValueError, match="unknown student family 'resnet'"):
        StudentSpec("resnet", 32, 10, {"depth": 18})
    with pytest.raises(ValueError, match="unknown student family"):
        StudentSpec.from_dict({"family": "resnet", "depth": 18, "resolution": 32, "num_classes": 10})


def test_a_family_record_checks_its_own_shape() -> None:
    @dataclass(frozen=True)
    class Clashing:
        resolution: int

    vgg = get_family("vgg")
    with pytest.raises(ValueError, match="clash with the spec keys"):
        dataclasses.replace(vgg, name="clash", arch=Clashing)
    with pytest.raises(ValueError, match="lower-case identifier"):
        dataclasses.replace(vgg, name="Bad-Name")


def _suggested_arch(name: str, resolution: int = 32, seed: int = 0) -> object:
    """An architecture the family's own suggest draws from its default section (a real trial)."""
    cfg = config_from_dict({"student": {"family": name, "resolution": resolution}})
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed)).ask()
    return get_family(name).suggest(trial, cfg.student.section(name), resolution)


@pytest.mark.parametrize("name", family_names())
def test_spec_round_trips_through_dict_and_json(name: str) -> None:
    arch = _suggested_arch(name)
    spec = StudentSpec(name, 32, 7, dataclasses.asdict(arch), in_chans=1)
    assert isinstance(spec.arch, get_family(name).arch) and spec.arch == arch
    flat = spec.to_dict()
    assert flat == {"family": name, "resolution": 32, "num_classes": 7, "in_chans": 1, **dataclasses.asdict(arch)}
    assert StudentSpec.from_dict(flat) == spec
    assert StudentSpec.from_json(spec.to_json()) == spec
    assert hash(StudentSpec.from_json(spec.to_json())) == hash(spec)


def test_the_first_union_layout_still_loads() -> None:
    """Trials and checkpoints stored before the split hold every family's fields, unused ones None."""
    old_vgg = {"family": "vgg", "depth": 8, "resolution": 32, "num_classes": 10, "width": 0.25,
               "embed_dim": None, "num_heads": None, "patch_size": None, "in_chans": 3}
    old_vit = {"family": "vit", "depth": 2, "resolution": 32, "num_classes": 10, "width": 1.0,
               "embed_dim": 64, "num_heads": 2, "patch_size": 8, "in_chans": 3}
    assert StudentSpec.from_dict(old_vgg) == StudentSpec("vgg", 32, 10, {"depth": 8, "width": 0.25})
    assert StudentSpec.from_dict(old_vit).label == "vit2-d64h2p8@32"
    with pytest.raises(ValueError, match="unknown fields"):  # a used value on the wrong family is not dropped
        StudentSpec.from_dict({**old_vgg, "embed_dim": 64})
    with pytest.raises(ValueError, match="missing fields"):
        StudentSpec.from_dict({"family": "vit", "depth": 2, "resolution": 32, "num_classes": 10})


def test_spec_rejects_a_foreign_arch_record_and_bad_sizes() -> None:
    vit_arch = StudentSpec("vit", 32, 10, {"depth": 2, "embed_dim": 64, "num_heads": 2, "patch_size": 8}).arch
    with pytest.raises(ValueError, match="StudentSpec.arch: must be a VGGArch"):
        StudentSpec("vgg", 32, 10, vit_arch)
    with pytest.raises(ValueError, match="StudentSpec.resolution: must be a positive integer"):
        StudentSpec("vgg", 0, 10, {"depth": 2})


def test_param_groups_of_a_non_student_use_the_generic_rule() -> None:
    class Tokens(nn.Module):  # a teacher-like model: no student_family
        def __init__(self) -> None:
            super().__init__()
            self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
            self.proj = nn.Linear(8, 8)

    groups = {g["weight_decay"]: g["params"] for g in param_groups(Tokens(), 0.1)}
    m = Tokens()
    assert len(groups[0.0]) == 2 and len(groups[0.1]) == 1  # pos_embed + bias; the weight
    assert groups[0.1][0].shape == m.proj.weight.shape


@pytest.mark.parametrize("name", family_names())
def test_every_family_keeps_the_student_contract(name: str) -> None:
    """The contract in kdsearch.models.registry: features/head disjoint and complete, last_block,
    forward == forward_head(forward_features), student_family names the family, and a label."""
    spec = StudentSpec(name, 32, 5, _suggested_arch(name))
    assert spec.label.endswith("@32") and " " not in spec.label
    get_family(name).preflight(StudyConfig().student.section(name), [16, 32, 224])
    model = build_student(spec).eval()
    assert model.student_family == name
    head = {id(p) for p in model.head.parameters()}
    feats = {id(p) for p in model.features.parameters()}
    assert head and feats and not head & feats and head | feats == {id(p) for p in model.parameters()}
    assert any(p is q for p in model.last_block.parameters() for q in model.features.parameters())
    assert not any(k.startswith("last_block") for k in model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.forward_head(model.forward_features(x)), model(x))
    assert model(x).shape == (2, 5)


# ----------------------------------------------------------------------------------------------
# The ``student`` section: generic, each family section validated by its family file


def test_student_section_holds_every_family_and_round_trips() -> None:
    cfg = config_from_dict({"student": {"family": ["vgg", "vit"], "vit": {"depth": [2]}}})
    assert set(cfg.student.sections) == set(family_names())
    assert cfg.student.vit is cfg.student.section("vit")
    assert cfg.student.vit.depth == Space(choices=(2,), integer=True)
    assert cfg.student.families == ["vgg", "vit"]
    d = config_to_dict(cfg)["student"]
    assert list(d)[:2] == ["family", "resolution"] and set(d) == {"family", "resolution", *family_names()}
    rebuilt = config_from_dict({"student": d})
    assert rebuilt.student == cfg.student
    with pytest.raises(AttributeError, match="no attribute or family section 'resnet'"):
        _ = cfg.student.resnet


@pytest.mark.parametrize(
    ("student", "message"),
    [
        ({"family": ["vgg", "vitt"]}, "student.family: must be one of ["),
        ({"family": "resnet"}, "student.family: must be one of"),
        ({"vggg": {"depth": [2]}}, "student.vggg: unknown key 'vggg' in student; did you mean 'vgg'?"),
        ({"vgg": {"dept": [2]}}, "student.vgg.dept: unknown key 'dept' in student.vgg; did you mean 'depth'?"),
        ({"vit": {"num_heads": 0}}, "student.vit.num_heads: must be >= 1"),
        ({"vgg": {"depth": 4}}, None),
    ],
)
def test_student_section_errors_are_one_line(student: dict, message: str | None) -> None:
    if message is None:
        assert config_from_dict({"student": student}).student.vgg.depth.fixed_value == 4
        return
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"student": student})
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value)


def test_signature_holds_only_the_listed_families() -> None:
    vgg_only = config_from_dict({"student": {"family": "vgg"}})
    assert set(vgg_only.search_signature()["student"]) == {"family", "resolution", "vgg"}
    other_vit = config_from_dict({"student": {"family": "vgg", "vit": {"depth": [6]}}})
    assert other_vit.search_signature() == vgg_only.search_signature()  # an unlisted section
    both = config_from_dict({"student": {"family": ["vgg", "vit"]}})
    assert set(both.search_signature()["student"]) == {"family", "resolution", "vgg", "vit"}


def test_grid_rule_applies_to_the_listed_families_params_only() -> None:
    grid = {"sampler": "grid"}
    config_from_dict({"study": grid, "student": {"vgg": {"width": [0.25]}, "vit": {"depth": {"low": 1, "high": 4}}}})
    with pytest.raises(ConfigError, match=r"^student\.vit\.depth: the grid sampler needs"):
        config_from_dict({"study": grid, "student": {"family": ["vgg", "vit"], "vgg": {"width": [0.25]},
                                                     "vit": {"depth": {"low": 1.0, "high": 4.0, "log": True}}}})


def test_vit_preflight_lives_in_its_family() -> None:
    cfg = StudyConfig()
    vit = get_family("vit")
    vit.preflight(cfg.student.section("vit"), [16, 32, 224])
    with pytest.raises(ConfigError, match=r"^student\.resolution: a ViT student needs a resolution .*17 px"):
        vit.preflight(cfg.student.section("vit"), [16, 17])
    get_family("vgg").preflight(cfg.student.section("vgg"), [17])  # nothing to check


def test_a_family_built_from_the_record_alone() -> None:
    """What search/space.py does, with no family name in the code."""
    fam: StudentFamily = get_family("vgg")
    section = config_from_dict({"student": {"vgg": {"depth": [3], "width": [0.5]}}}).student.section("vgg")
    assert set(fam.params(section)) == {"vgg_depth", "vgg_width"}
    arch = fam.suggest(optuna.trial.FixedTrial({}), section, 16)
    spec = StudentSpec("vgg", 16, 3, arch)
    assert fam.label(spec) == spec.label == "vgg3-w0.5@16"
    assert fam.build(spec)(torch.randn(1, 3, 16, 16)).shape == (1, 3)


# ----------------------------------------------------------------------------------------------
# What a family need not write: the registry's defaults


def test_params_default_to_the_sections_searchable_keys_and_suggest_draws_them() -> None:
    """mobilenetv3 writes neither params nor suggest: its Optuna params are ``<family>_<key>`` for
    each searchable key of its section, drawn in field order, and the arch record is built from them."""
    fam = get_family("mobilenetv3")
    assert fam.search_params is None and fam.arch_from_params is None
    section = config_from_dict({"student": {"family": "mobilenetv3", "mobilenetv3": {
        "size": ["small", "large"], "channel_multiplier": [0.75, 1.0], "depth_multiplier": [0.5]}}}).student.mobilenetv3
    assert list(fam.params(section)) == ["mobilenetv3_size", "mobilenetv3_channel_multiplier",
                                         "mobilenetv3_depth_multiplier"]
    trial = optuna.trial.FixedTrial({"mobilenetv3_size": "large", "mobilenetv3_channel_multiplier": 0.75})
    assert fam.suggest(trial, section, 32) == fam.arch(size="large", channel_multiplier=0.75, depth_multiplier=0.5)
    # A fixed key (one choice) is a value, never an Optuna parameter.
    study = optuna.create_study()
    live = study.ask()
    fam.suggest(live, section, 32)
    assert set(live.params) == {"mobilenetv3_size", "mobilenetv3_channel_multiplier"}


def test_a_family_with_special_needs_says_only_what_differs() -> None:
    """vgg: presets replace depth x width (one categorical); vit: the arch rounds the width to the
    heads and sizes the patch from the resolution. Both keep the default parameter names."""
    vgg = get_family("vgg")
    presets = config_from_dict({"student": {"vgg": {"presets": [{"depth": 4, "width": 0.25, "name": "S"},
                                                               {"depth": 8, "width": 0.5}]}}}).student.vgg
    assert list(vgg.params(presets)) == ["vgg_preset"]
    assert vgg.suggest(optuna.trial.FixedTrial({"vgg_preset": "d8-w0.5"}), presets, 32) == vgg.arch(8, 0.5)
    vit = get_family("vit")
    section = config_from_dict({"student": {"vit": {"embed_dim": [64, 100], "num_heads": [3]}}}).student.vit
    assert list(vit.params(section)) == ["vit_num_heads", "vit_embed_dim", "vit_patches_per_side", "vit_depth"]
    arch = vit.suggest(optuna.trial.FixedTrial({"vit_embed_dim": 100, "vit_patches_per_side": 8, "vit_depth": 2}),
                       section, 32)
    assert (arch.embed_dim, arch.num_heads, arch.patch_size, arch.depth) == (102, 3, 4, 2)


@pytest.mark.parametrize("name", family_names())
def test_param_groups_default_to_timms_rule_plus_the_familys_names(name: str) -> None:
    from timm.optim import param_groups_weight_decay

    fam = get_family(name)
    model = build_student(StudentSpec(name, 32, 5, _suggested_arch(name)))
    names = {id(p): n for n, p in model.named_parameters()}

    def grouped(groups: list[dict]) -> dict[float, set[str]]:
        return {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in groups}

    expected = grouped(param_groups_weight_decay(model, 0.05, no_weight_decay_list=fam.no_weight_decay))
    assert grouped(param_groups(model, 0.05)) == grouped(fam.param_groups(model, 0.05)) == expected
    assert all(n in expected[0.0] for n in fam.no_weight_decay)
    assert any(n.endswith(".bias") for n in expected[0.0]) and expected[0.05]


def test_the_default_preflight_checks_nothing() -> None:
    default = next(f.default for f in dataclasses.fields(StudentFamily) if f.name == "preflight")
    assert get_family("mobilenetv3").preflight is default  # mobilenetv3 writes none
    get_family("mobilenetv3").preflight(StudyConfig().student.mobilenetv3, [16, 17, 224])


def test_vgg_depth_and_width_have_one_rule_wherever_they_are_given() -> None:
    """The arch record's check: the model, the arch, the sizing, a preset and the section's depth
    choices all refuse depth 7 and width 0 with the same rule."""
    from kdsearch.models.families.vgg import VGG, VGGArch, VGGConfig, VGGPreset, vgg_width_for_params

    depth_rule, width_rule = "depth: must be one of [2, 3, 4, 5, 8, 11, 13, 16, 19] (got 7)", "width: must be a positive number"
    for make in (lambda: VGG(7, 10), lambda: VGGArch(7), lambda: vgg_width_for_params(7, 1e4),
                 lambda: VGGPreset(depth=7, width=0.5), lambda: VGGConfig(depth=Space(choices=(2, 7), integer=True))):
        with pytest.raises((ValueError, ConfigError), match=re.escape(depth_rule)):
            make()
    for make in (lambda: VGG(4, 10, width=0.0), lambda: VGGArch(4, 0.0), lambda: VGGPreset(depth=4, width=0.0)):
        with pytest.raises((ValueError, ConfigError), match=width_rule):
            make()
    with pytest.raises(ConfigError, match=r"^student\.vgg\.presets\.depth: "):
        VGGPreset(depth=7, width=0.5)
