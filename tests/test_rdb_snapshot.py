"""kdsearch.rdb_snapshot: a database study's finished trials kept across processes, so that an
open reads only the trials changed since (SQLite here: the same Optuna RDB storage and cache as
PostgreSQL; the soak runs it on PostgreSQL, benchmarks/RESULTS.md issue 19)."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from kdsearch import rdb_snapshot
from kdsearch.storage import load_study, open_storage, run_paths

NAME = "snap"


def _url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'study.db'}"


def _make(tmp_path: Path, n_complete: int, running: int = 0) -> optuna.Study:
    study = optuna.create_study(study_name=NAME, storage=open_storage(_url(tmp_path)), directions=["maximize", "minimize"],
                                load_if_exists=True)
    for i in range(n_complete):
        t = study.ask()
        t.set_user_attr("student", f"vgg{i}")
        t.suggest_float("x", 0.0, 1.0)
        study.tell(t, [i / 10, float(i)])
    for _ in range(running):
        study.ask()
    return study


def _seen(study: optuna.Study) -> list[tuple[Any, ...]]:
    return [(t.number, t.state, t.values, t.params, t.user_attrs) for t in study.get_trials(deepcopy=False)]


def _snapshot(tmp_path: Path) -> Path:
    return rdb_snapshot.snapshot_file(run_paths(tmp_path, NAME).root)


@pytest.fixture
def small_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rdb_snapshot, "SAVE_EVERY_TRIALS", 5)


def _delta_reads(study: optuna.Study, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the ``trial_id_greater_than`` of every database read of ``study``'s trials."""
    backend = study._storage._backend
    calls: list[int] = []
    real = backend._get_trials

    def spy(study_id: int, states: Any, included_trial_ids: set[int], trial_id_greater_than: int) -> Any:
        calls.append(trial_id_greater_than)
        return real(study_id, states, included_trial_ids, trial_id_greater_than)

    monkeypatch.setattr(backend, "_get_trials", spy)
    return calls


def test_a_command_saves_the_snapshot_and_the_next_open_reads_only_what_changed(
        tmp_path: Path, small_step: None, monkeypatch: pytest.MonkeyPatch) -> None:
    study = _make(tmp_path, n_complete=8, running=1)
    assert not _snapshot(tmp_path).exists()
    first = load_study(_url(tmp_path), NAME, tmp_path)
    assert _snapshot(tmp_path).is_file()  # 8 finished trials >= the step: the read was kept
    header = json.loads(_snapshot(tmp_path).read_bytes().split(b"\n", 1)[0])
    assert header["trials"] == 8 and header["study_name"] == NAME and "sqlite" not in json.dumps(header)
    assert _seen(first)[:8] == _seen(study)[:8]
    # Meanwhile the running trial ends and two more finish.
    running = study.get_trials(states=(TrialState.RUNNING,))[0]
    study.tell(running.number, [0.5, 0.5])
    _make(tmp_path, n_complete=2)
    plain = optuna.load_study(study_name=NAME, storage=open_storage(_url(tmp_path)))

    real_load = optuna.load_study
    reads: list[list[int]] = []

    def load_and_spy(**kwargs: Any) -> optuna.Study:
        s = real_load(**kwargs)
        reads.append(_delta_reads(s, monkeypatch))
        return s

    monkeypatch.setattr(optuna, "load_study", load_and_spy)
    again = load_study(_url(tmp_path), NAME, tmp_path)
    assert _seen(again) == _seen(plain)  # the same trials, the one that ended in its new state
    assert len(_seen(again)) == 11 and {s for _, s, *_ in _seen(again)} == {TrialState.COMPLETE}
    # One database read, of the trials after the snapshot's last finished one (and the one that
    # was running then): not the whole study.
    assert reads[0] and reads[0][0] == header["last_finished_trial_id"] > -1


def test_a_snapshot_of_another_study_or_a_damaged_one_is_ignored(tmp_path: Path, small_step: None) -> None:
    _make(tmp_path, n_complete=6)
    load_study(_url(tmp_path), NAME, tmp_path)
    good = _snapshot(tmp_path).read_bytes()
    # The study deleted and made again under the same name: a new study id.
    optuna.delete_study(study_name=NAME, storage=open_storage(_url(tmp_path)))
    fresh = _make(tmp_path, n_complete=2)
    opened = load_study(_url(tmp_path), NAME, tmp_path)
    assert _seen(opened) == _seen(fresh)
    # A damaged payload.
    _make(tmp_path, n_complete=6)  # the new study reaches the step; its snapshot is written
    load_study(_url(tmp_path), NAME, tmp_path)
    data = _snapshot(tmp_path).read_bytes()
    _snapshot(tmp_path).write_bytes(data[:-10] + b"0123456789")
    plain = optuna.load_study(study_name=NAME, storage=open_storage(_url(tmp_path)))
    assert _seen(load_study(_url(tmp_path), NAME, tmp_path)) == _seen(plain)
    assert good != data


def test_a_snapshot_that_misses_a_trial_is_dropped_for_a_whole_read(
        tmp_path: Path, small_step: None, caplog: pytest.LogCaptureFixture) -> None:
    """A trial committed late with a lower id than one the snapshot holds would be missed by the
    delta read; the gap in the trial numbers gives it away and the study is read whole."""
    _make(tmp_path, n_complete=7)
    load_study(_url(tmp_path), NAME, tmp_path)
    path = _snapshot(tmp_path)
    head, payload = path.read_bytes().split(b"\n", 1)
    trials = [t for t in pickle.loads(payload) if t.number != 3]
    payload = pickle.dumps(trials)
    header = json.loads(head)
    header.update(trials=len(trials), payload_sha256=__import__("hashlib").sha256(payload).hexdigest())
    path.write_bytes(json.dumps(header).encode() + b"\n" + payload)
    plain = optuna.load_study(study_name=NAME, storage=open_storage(_url(tmp_path)))
    with caplog.at_level(logging.INFO, logger="kdsearch.storage"):
        opened = load_study(_url(tmp_path), NAME, tmp_path)
    assert _seen(opened) == _seen(plain) and len(_seen(opened)) == 7
    assert "gap" in caplog.text


def test_a_journal_study_gets_no_database_snapshot(tmp_path: Path) -> None:
    url = f"journal:{tmp_path / 'j.log'}"
    study = optuna.create_study(study_name=NAME, storage=open_storage(url))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    opened = load_study(url, NAME, tmp_path)
    assert len(opened.trials) == 3 and not rdb_snapshot.is_database_study(opened)
    assert not _snapshot(tmp_path).exists()


def test_the_saver_saves_every_step_and_on_force(tmp_path: Path, small_step: None) -> None:
    study = _make(tmp_path, n_complete=3)
    study = optuna.load_study(study_name=NAME, storage=open_storage(_url(tmp_path)))
    study.get_trials(deepcopy=False)
    saver = rdb_snapshot.SnapshotSaver(study, _snapshot(tmp_path))
    assert saver.tick() is None and not _snapshot(tmp_path).exists()  # 3 < the step
    assert saver.tick(force=True) == 3
    _make(tmp_path, n_complete=4)
    study.get_trials(deepcopy=False)
    assert saver.tick() is None  # 4 new < 5
    _make(tmp_path, n_complete=1)
    study.get_trials(deepcopy=False)
    assert saver.tick() == 8 and saver.tick(force=True) is None  # nothing new since
