"""The wheel, as a user gets it from ``pip install``: built from these sources, installed into a
fresh virtual environment outside the repository, and run from another folder.

The wheel must carry the study files (``studies/`` of the repository, as package data under
``kdsearch/studies/``), so ``kdsearch studies`` lists them and ``kdsearch optimize --config smoke``
finds one by name with no checkout in sight.

Offline and quick: the wheel is built with the setuptools of this environment
(``--no-build-isolation``), installed without its dependencies, and the fresh environment reaches
the heavy dependencies (torch, timm, Optuna) through a ``.pth`` line naming this environment's
site-packages. A plain path line adds no ``.pth`` processing of that folder, so the editable
install of this checkout stays invisible: the test asserts that kdsearch is imported from the
fresh environment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli_helpers import ROOT

SOURCES = ("kdsearch", "studies", "pyproject.toml", "README.md")  # what the wheel is built from


def _run(argv: list[str | Path], cwd: Path, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONUNBUFFERED"] = "1"
    out = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=timeout_s, check=False)
    assert out.returncode == 0, f"{argv}: exit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the sources (so the build writes nothing into the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            # symlinks=True: kdsearch/studies stays the link to ../studies, as in the repository.
            shutil.copytree(p, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(p, src / name)
    out = tmp_path_factory.mktemp("wheelhouse")
    _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", out], cwd=src)
    (whl,) = out.glob("kdsearch-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv outside the repository with the wheel installed; returns its ``bin`` folder."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=venv.parent)
    py = venv / "bin" / "python"
    purelib = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=venv).stdout.strip())
    # The heavy dependencies come from this environment: one path line, no .pth processing there.
    (purelib / "kdsearch-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q", wheel], cwd=venv)
    yield venv / "bin"


def test_the_wheel_carries_every_study_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    in_repo = {f"kdsearch/studies/{p.relative_to(ROOT / 'studies')}" for p in (ROOT / "studies").rglob("*.yaml")}
    assert in_repo and in_repo <= names, sorted(in_repo - names)
    assert "kdsearch/studies/paper/table1-arch.yaml" in names
    assert "kdsearch/py.typed" in names
    # Study files only: the folder is not a Python package (its scripts stay in the repository).
    assert not [n for n in names if n.startswith("kdsearch/studies/") and not n.endswith(".yaml")]


def test_an_installed_kdsearch_runs_a_bundled_study_from_any_folder(installed: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    kd = installed / "kdsearch"
    where = _run([installed / "python", "-c", "import kdsearch, kdsearch.cli; print(kdsearch.__file__)"], cwd=elsewhere)
    assert Path(where.stdout.strip()).is_relative_to(installed.parent), where.stdout  # not the checkout

    listing = _run([kd, "studies"], cwd=elsewhere).stdout
    for name in ("smoke", "cifar10-deit", "demo", "paper/table1-arch", "paper/table3-finetune"):
        assert any(line.split()[:1] == [name] for line in listing.splitlines()), (name, listing)
    shown = _run([kd, "studies", "show", "smoke"], cwd=elsewhere).stdout
    assert shown == (ROOT / "studies" / "smoke.yaml").read_text()

    run = _run([kd, "optimize", "--config", "smoke", "--n-trials", "1", "--run-dir", "runs", "--plain",
                "--set", "study.trial_time=1s", "--set", "teacher.fit.time=1s"], cwd=elsewhere)
    assert "1 complete, 0 pruned, 0 failed" in run.stdout, run.stdout[-2000:]
    trials = json.loads(_run([kd, "trials", "--study-name", "smoke", "--run-dir", "runs", "--json"], cwd=elsewhere).stdout)
    assert [t["state"] for t in trials] == ["COMPLETE"]
    assert (elsewhere / "runs" / "smoke" / "journal.log").is_file()
