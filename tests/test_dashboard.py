"""optuna-dashboard on the fixture study: its API lists the study, serves the checkpoints, sees
trials another process writes meanwhile, and stops cleanly."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from kdsearch.dashboard import start_dashboard
from kdsearch.errors import ConfigError, StorageError

from study_helpers import FixtureStudy, build_fixture_study


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> FixtureStudy:
    return build_fixture_study(tmp_path_factory.mktemp("runs"))


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.status == 200
        return resp.read()


def _json(url: str) -> Any:
    return json.loads(_get(url))


def test_dashboard_lists_the_study_serves_checkpoints_and_stops(study: FixtureStudy) -> None:
    handle = start_dashboard(study.storage_url, study.artifact_dir, host="127.0.0.1", port=0)
    try:
        assert handle.running and handle.port > 0 and handle.warnings == []
        base = f"http://127.0.0.1:{handle.port}"
        assert handle.url == f"{base}/dashboard/"
        summaries = _json(f"{base}/api/studies")["study_summaries"]
        assert [s["study_name"] for s in summaries] == [study.study_name]
        sid = summaries[0]["study_id"]
        detail = _json(f"{base}/api/studies/{sid}")
        assert detail["objective_names"] == ["val_accuracy", "macs"]
        trials = {t["number"]: t for t in detail["trials"]}
        assert len(trials) == 10 and trials[9]["state"] == "Fail"
        # The stored checkpoint downloads byte for byte.
        t7 = trials[7]
        (art,) = t7["artifacts"]
        blob = _get(f"{base}/artifacts/{sid}/{t7['trial_id']}/{art['artifact_id']}")
        assert hashlib.sha256(blob).hexdigest() == study.open().trials[7].user_attrs["weights_sha256"]
        assert b"<html" in _get(handle.url).lower()
        # Another process appends a trial while the dashboard serves: it shows up, nothing breaks.
        script = textwrap.dedent(
            f"""
            import optuna
            from optuna.storages import JournalStorage
            from optuna.storages.journal import JournalFileBackend
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            s = optuna.load_study(study_name={study.study_name!r},
                                  storage=JournalStorage(JournalFileBackend({str(study.journal)!r})))
            t = s.ask()
            s.tell(t, [0.5, 5e5])
            """
        )
        subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
        # The dashboard caches trials for a few seconds (optuna-dashboard's TTL): poll.
        deadline = time.monotonic() + 30
        while len(_json(f"{base}/api/studies/{sid}")["trials"]) != 11:
            assert time.monotonic() < deadline, "the dashboard never showed the trial another process wrote"
            time.sleep(0.5)
        with pytest.raises(ConfigError, match=rf"--port: is already in use on 127.0.0.1 \(got {handle.port}\)"):
            start_dashboard(study.storage_url, study.artifact_dir, port=handle.port)
    finally:
        handle.stop()
    assert not handle.running
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{handle.port}/api/studies", timeout=5)
    handle.stop()  # a second stop is harmless


def test_dashboard_errors_and_warnings(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no study storage"):
        start_dashboard(f"journal:{tmp_path / 'none.log'}", None, port=0)
    with pytest.raises(ConfigError, match=r"--port: must be an integer in \[0, 65535\]"):
        start_dashboard(f"journal:{tmp_path / 'none.log'}", None, port=70000)
    fx = build_fixture_study(tmp_path / "runs", with_failures=False)
    with start_dashboard(fx.storage_url, tmp_path / "no-artifacts", port=0) as handle:
        assert any("checkpoints cannot be downloaded" in w for w in handle.warnings)
        assert [s["study_name"] for s in _json(f"http://127.0.0.1:{handle.port}/api/studies")["study_summaries"]] == ["fixture"]
    assert not handle.running
