"""Shared fixtures: the smoke study run once per session through the real CLI."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cli_helpers import SMOKE, run_cli

# Keep the 2-core CI machine responsive: one intra-op thread per test process unless asked.
torch.set_num_threads(int(os.environ.get("KDSEARCH_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A finished 3-trial smoke study: ``kdsearch optimize --config studies/smoke.yaml --n-trials 3``.

    Read-only for tests: copy it (``copy_run``) before changing it.
    """
    run_dir = tmp_path_factory.mktemp("smoke-run")
    code = run_cli("optimize", "--config", SMOKE, "--n-trials", "3", "--run-dir", run_dir, "--plain")
    assert code == 0
    yield run_dir


@pytest.fixture
def copy_run(smoke_run: Path, tmp_path: Path) -> Path:
    """A private copy of the smoke run folder."""
    dst = tmp_path / "run"
    shutil.copytree(smoke_run, dst)
    return dst
