"""Storage URLs, study creation and resume checks, time bookkeeping."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdsearch.config import apply_overrides, load_config
from kdsearch.errors import StorageError, StudyMismatchError
from kdsearch.search.study import add_time_spent, create_or_resume, signature_diff
from kdsearch.storage import load_study, open_storage

SMOKE = Path(__file__).resolve().parents[2] / "studies" / "smoke.yaml"


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_create_then_resume(tmp_path: Path, kind: str) -> None:
    storage = None if kind == "journal" else f"sqlite:///{tmp_path}/s.db"
    cfg = apply_overrides(load_config(SMOKE), run_dir=str(tmp_path), storage=storage)
    study, resumed = create_or_resume(cfg)
    assert not resumed and study.metric_names == ["val_accuracy", "macs"]
    assert study.user_attrs["signature"]["trial_time_s"] == 2.0
    again, resumed = create_or_resume(apply_overrides(cfg, budget="1h", n_trials=9))
    assert resumed and again._study_id == study._study_id
    assert add_time_spent(again, 12.5) == pytest.approx(12.5)
    assert add_time_spent(again, 2.5) == pytest.approx(15.0)


def test_resume_with_other_objectives_names_the_difference(tmp_path: Path) -> None:
    cfg = apply_overrides(load_config(SMOKE), run_dir=str(tmp_path))
    create_or_resume(cfg)
    other = apply_overrides(cfg, ["objectives.kd_time_s=minimize"])
    with pytest.raises(StudyMismatchError, match="objectives.kd_time_s added"):
        create_or_resume(other)


def test_signature_diff() -> None:
    assert signature_diff({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}}) == ["b.c: stored 2, now 3"]
    assert signature_diff({"a": 1}, {"a": 1}) == []


def test_reading_a_missing_study_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no study storage"):
        load_study(f"journal:{tmp_path}/none.log", "x")
    cfg = apply_overrides(load_config(SMOKE), run_dir=str(tmp_path))
    create_or_resume(cfg)
    with pytest.raises(StorageError, match="no study 'nope'.*known: \\['smoke'\\]"):
        load_study(f"journal:{tmp_path}/smoke/journal.log", "nope")


@pytest.mark.parametrize("url", ["postgresql://nobody@127.0.0.1:1/none", "sqlite:////nonexistent-dir/x/y.db"])
def test_unreachable_storage_is_a_storage_error(url: str) -> None:
    with pytest.raises(StorageError) as exc:
        open_storage(url)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("sampler", ["tpe", "tpe-impute", "tpe-bohb", "nsga2", "nsga3", "random", "grid", "gp"])
def test_every_sampler_proposes_valid_students(tmp_path: Path, sampler: str) -> None:
    """Each sampler named in a study file runs an ask/tell loop over the real space, seeded."""
    import optuna

    from kdsearch.search.space import suggest
    from kdsearch.search.study import make_sampler

    cfg = apply_overrides(
        load_config(SMOKE),
        ["student.vgg.width=[0.0625, 0.125]", "study.n_startup_trials=2", "study.population_size=4"],
        sampler=sampler,
        run_dir=str(tmp_path),
    )
    proposals = []
    for _ in range(2):  # the same seed gives the same proposals
        study = optuna.create_study(directions=cfg.directions, sampler=make_sampler(cfg))
        seen = []
        for i in range(6):
            trial = study.ask()
            p = suggest(trial, cfg, num_classes=4)
            assert p.spec.arch.depth in (2, 3, 4, 5) and p.spec.resolution in (16, 24, 32)
            seen.append(p.spec)
            study.tell(trial, [0.1 * i + p.spec.arch.width, float(p.spec.arch.depth)])
        proposals.append(seen)
    assert proposals[0] == proposals[1]
