"""Issue 22, a teacher cache paid once: the caches of a run folder are shared by its studies,
found by their content key; ``kdsearch cache`` lists them (key, size, studies) and removes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdsearch.storage import SHARED_CACHE_DIR, list_caches, run_paths

from cli_helpers import SMOKE, run_cli


def test_the_caches_of_a_run_folder_are_shared_by_its_studies(tmp_path: Path) -> None:
    a, b = run_paths(tmp_path, "a"), run_paths(tmp_path, "b")
    assert a.cache == b.cache == tmp_path / SHARED_CACHE_DIR / "logits"
    assert a.teachers == b.teachers == tmp_path / SHARED_CACHE_DIR / "teachers"  # fitted teachers too
    assert a.journal != b.journal and a.artifacts != b.artifacts
    moved = run_paths(tmp_path, "a", "/elsewhere")  # --cache-dir: the fitted teachers go with the caches
    assert (moved.cache, moved.teachers) == (Path("/elsewhere"), Path("/elsewhere/_teachers"))
    moved_teachers = tmp_path / "elsewhere" / "_teachers"
    moved_teachers.mkdir(parents=True)
    assert list_caches(tmp_path / "elsewhere") == []  # not a cache


def test_cache_lists_the_session_runs_cache(smoke_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (entry,) = list_caches(smoke_run / SHARED_CACHE_DIR / "logits")
    assert run_cli("cache", "--run-dir", smoke_run) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith(entry.key[:16]))
    assert "ViT-tiny" in row and "synthetic" in row and row.rstrip().endswith("smoke")
    assert run_cli("cache", "--run-dir", smoke_run, "--json") == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["key"] == entry.key and listed["studies"] == ["smoke"] and listed["nbytes"] == entry.nbytes > 0
    assert listed["views"] == 4 and listed["build_time_s"] > 0


def test_cache_rm_asks_for_yes_and_names_one_cache(copy_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = copy_run / SHARED_CACHE_DIR / "logits"
    (entry,) = list_caches(folder)
    assert run_cli("cache", "rm", entry.key[:8], "--run-dir", copy_run) == 0  # no --yes: says what it would do
    assert f"would remove {entry.key[:16]}" in capsys.readouterr().out and entry.folder.is_dir()
    assert run_cli("cache", "rm", "abc", "--run-dir", copy_run) == 2  # too short a prefix
    assert run_cli("cache", "rm", "ffffffffff", "--run-dir", copy_run, "--yes") == 2  # no such cache
    assert run_cli("cache", "rm", "--run-dir", copy_run, "--yes") == 2  # neither KEY nor --all
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and "matches no cache" in err and entry.key[:16] in err
    assert run_cli("cache", "rm", "--all", "--yes", "--run-dir", copy_run) == 0
    assert f"removed {entry.key[:16]}" in capsys.readouterr().out
    assert not entry.folder.exists() and list_caches(folder) == []


@pytest.mark.slow
def test_a_second_study_reuses_the_first_ones_cache(copy_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Same teacher, data and views, another study name, same run folder: no second build."""
    (before,) = list_caches(copy_run / SHARED_CACHE_DIR / "logits")
    code = run_cli("optimize", "--config", SMOKE, "--study-name", "second", "--n-trials", "1",
                   "--run-dir", copy_run, "--plain")
    out = capsys.readouterr().out
    assert code == 0, out[-2000:]
    assert f"teacher cache ViT-tiny: reused {before.key[:16]}" in out and "built by study smoke" in out
    (after,) = list_caches(copy_run / SHARED_CACHE_DIR / "logits")
    assert after.key == before.key and after.manifest["build_id"] == before.manifest["build_id"]
    assert after.studies == ["second", "smoke"]
