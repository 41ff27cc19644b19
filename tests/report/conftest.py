"""Fixtures for the report tests: a real stored study (see tests/study_helpers.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# tests/ holds the shared study builder; pytest's default import mode only puts this folder on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from study_helpers import FixtureStudy, build_fixture_study  # noqa: E402


@pytest.fixture(scope="module")
def fixture_study(tmp_path_factory: pytest.TempPathFactory) -> FixtureStudy:
    """The 2-objective fixture study (read-only: tests must not add trials to it)."""
    return build_fixture_study(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def fixture_study3(tmp_path_factory: pytest.TempPathFactory) -> FixtureStudy:
    """The 3-objective variant (val_accuracy, macs, kd_time_s)."""
    return build_fixture_study(tmp_path_factory.mktemp("runs3"), study_name="fixture3", n_objectives=3)
