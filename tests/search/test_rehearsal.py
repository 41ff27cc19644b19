"""The rehearsal seam (kdsearch.search.rehearsal): proposals map to recorded rows, the box is
played back through distill()'s on_eval contract, the section is validated like any other, and
the soak's journal write-fault tokens fail exactly one write each."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from optuna.storages import JournalStorage

from kdsearch.config import config_from_dict, config_to_dict
from kdsearch.errors import ConfigError
from kdsearch.search.preflight import preflight
from kdsearch.search.pruning import ListRungStore, PruningConfig, RungPruner
from kdsearch.search.rehearsal import (
    load_table,
    recorded_fixed_costs,
    rehearsal_wall_s,
    replay_box,
    replay_fractions,
)
from kdsearch.storage import FAULT_DIR_ENV, open_storage

ROOT = Path(__file__).resolve().parents[2]
TABLE = ROOT / "benchmarks" / "search_table" / "table.jsonl"


def _raw(**over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "study": {"name": "reh", "trial_time": "30s", "grace": "2s", "pruning": {"enabled": True}},
        "student": {"family": "vgg", "resolution": [16, 32], "vgg": {"depth": [2, 3, 4, 5, 8]}},
        "objectives": {"val_accuracy": "maximize", "macs": "minimize"},
        "measure": {"max_time": "1s"},
        "rehearsal": {"table": str(TABLE), "speed": 50},
    }
    for key, value in over.items():
        raw[key] = value
    return raw


class FakeClock:
    """time.perf_counter / time.sleep stand-ins: sleeping advances the clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def test_a_proposal_maps_to_the_nearest_row() -> None:
    table = load_table(str(TABLE))
    first = table.rows[0]
    row, dist = table.nearest(*first.key)
    assert row is first and dist == 0.0
    # width 0.07 is nearer 1/16 than 1/8 on the log axis; alpha 0.55 nearer 0.5 than 0.9
    row, dist = table.nearest(5, 0.07, 32, 6.0, 0.55)
    assert row.key == (5, 0.0625, 32, 6.0, 0.5) and dist > 0


def test_the_box_is_played_through_on_eval_at_the_grid_and_the_rungs() -> None:
    row = load_table(str(TABLE)).rows[17]
    seen: list[tuple[float, float, float]] = []
    fake = FakeClock()
    rungs = PruningConfig(eta=3).rungs
    rep = replay_box(row, box_s=30.0, speed=10.0, eval_every_fraction=0.25, eval_at=rungs,
                     on_eval=lambda t, f, a: seen.append((t, f, a)) is not None, clock=fake.clock, sleep=fake.sleep)
    fractions = [f for _, f, _ in seen]
    assert fractions == pytest.approx([1 / 27, 1 / 9, 0.25, 1 / 3, 0.5, 0.75, 1.0])
    assert fractions == pytest.approx(replay_fractions(0.25, rungs))
    for t, f, a in seen[:-1]:
        assert t == pytest.approx(30.0 * f)
        assert a == pytest.approx(row.accuracy_at(f))
    assert seen[-1][2] == row.val_accuracy  # the final evaluation is on all of val
    assert sum(fake.slept) == pytest.approx(3.0)  # 30 s of box at speed 10
    r = rep.result
    assert r.final_val_accuracy == row.val_accuracy and not r.stopped_early
    assert r.kd_time_s == pytest.approx(30.0) and r.evaluations == 7
    assert [f for f, _ in rep.hook_s] == pytest.approx(fractions)


def test_a_stop_at_a_rung_ends_the_box_at_once() -> None:
    row = load_table(str(TABLE)).rows[0]
    fake = FakeClock()
    rep = replay_box(row, box_s=60.0, speed=20.0, eval_every_fraction=0.5, eval_at=(1 / 9,),
                     on_eval=lambda t, f, a: True, clock=fake.clock, sleep=fake.sleep)
    assert rep.result.stopped_early and rep.result.final_val_accuracy is None
    assert rep.result.kd_time_s == pytest.approx(60.0 / 9)
    assert sum(fake.slept) == pytest.approx(60.0 / 9 / 20.0)


def test_the_rung_pruner_stops_a_weak_row_replayed_after_strong_ones() -> None:
    """The same RungPruner a live trial gets, fed by the replay: the row with the lowest accuracy
    at 1/9 of the box loses at the first rung to the three best (nothing is pruned below 4)."""
    table = load_table(str(TABLE))
    store = ListRungStore()
    config = PruningConfig(eta=3, min_competitors=4)
    strong = sorted(table.rows, key=lambda r: -r.accuracy_at(1 / 9))[:3]
    weak = min(table.rows, key=lambda r: r.accuracy_at(1 / 9))
    fake = FakeClock()
    outcomes = []
    for key, row in enumerate([*strong, weak]):
        pruner = RungPruner(key=key, store=store, config=config)
        rep = replay_box(row, box_s=10.0, speed=1000.0, eval_every_fraction=0.5, eval_at=config.rungs,
                         on_eval=pruner, clock=fake.clock, sleep=fake.sleep)
        outcomes.append(rep.result.stopped_early)
    assert outcomes == [False, False, False, True]


def test_fixed_costs_come_from_the_row() -> None:
    row = load_table(str(TABLE)).rows[3]
    m = recorded_fixed_costs(row, str(TABLE))
    assert m.values["params"] == row.params and m.values["macs"] == row.macs
    assert m.values["latency_ms_b1"] == row.latency_ms_b1
    assert m.methods["macs"]["row"] == row.id


def test_the_section_validates_and_round_trips() -> None:
    cfg = config_from_dict(_raw())
    assert cfg.rehearsal.enabled and cfg.rehearsal.speed == 50
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert cfg.search_signature()["rehearsal_table"] == str(TABLE)
    plain = _raw()
    del plain["rehearsal"]
    assert "rehearsal_table" not in config_from_dict(plain).search_signature()
    assert rehearsal_wall_s(cfg, 30.0) == pytest.approx(0.6) and rehearsal_wall_s(config_from_dict(plain), 30.0) == 30.0


@pytest.mark.parametrize(("over", "fragment"), [
    ({"rehearsal": {"tabel": "x"}}, "rehearsal.tabel: unknown key 'tabel' in rehearsal; did you mean 'table'?"),
    ({"rehearsal": {"table": str(TABLE), "speed": 0}}, "rehearsal.speed: must be a number > 0"),
    ({"rehearsal": {"table": str(TABLE), "speed": "fast"}}, "rehearsal.speed: must be a number"),
    ({"rehearsal": {"table": " "}}, "rehearsal.table: must be the path of a recorded table"),
    ({"student": {"family": "mobilenetv3", "resolution": 32}}, "student.family: must be vgg in a rehearsal"),
    ({"constraints": {"peak_kd_memory_mb": 100}}, "constraints.peak_kd_memory_mb: is not recorded in a rehearsal table"),
    ({"distill": {"early_stop": {"enabled": True}}}, "distill.early_stop.enabled: must be false in a rehearsal"),
])
def test_a_bad_section_is_one_line(over: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(_raw(**over))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_preflight_needs_no_data_and_checks_the_table(tmp_path: Path) -> None:
    assert preflight(config_from_dict(_raw())) == 10
    missing = _raw(rehearsal={"table": str(tmp_path / "none.jsonl")})
    with pytest.raises(ConfigError, match=r"^rehearsal.table: cannot read the table"):
        preflight(config_from_dict(missing))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"depth": 2}) + "\n")
    with pytest.raises(ConfigError, match="is not a recorded trial"):
        preflight(config_from_dict(_raw(rehearsal={"table": str(bad)})))


def test_a_fault_token_fails_exactly_one_journal_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    faults = tmp_path / "faults"
    faults.mkdir()
    monkeypatch.setenv(FAULT_DIR_ENV, str(faults))
    storage = open_storage(f"journal:{tmp_path / 'journal.log'}")
    assert isinstance(storage, JournalStorage)
    sid = storage.create_new_study([])  # no token yet: written
    tid = storage.create_new_trial(sid)
    (faults / "journal-write-heartbeat-0").write_text("")
    storage.set_trial_user_attr(tid, "other", 1)  # a heartbeat-only token leaves other writes alone
    (faults / "journal-write-1").write_text("")
    # The token fails one try of the write; the journal's retry (storage_faults) then writes it.
    storage.set_trial_user_attr(tid, "x", 1)
    assert sorted(p.name for p in faults.iterdir()) == ["claimed-journal-write-1", "journal-write-heartbeat-0"]
    storage.set_trial_user_attr(tid, "x", 2)
    storage.set_trial_user_attr(tid, "heartbeat_at", 2.0)  # claims the heartbeat token, then written
    assert storage.get_trial(tid).user_attrs == {"other": 1, "x": 2, "heartbeat_at": 2.0}
    claimed = sorted(p.name for p in faults.iterdir())
    assert claimed == ["claimed-journal-write-1", "claimed-journal-write-heartbeat-0"]
    assert json.loads((faults / "claimed-journal-write-1").read_text())["writes"][0]["keys"] == ["x"]
    assert not math.isnan(storage.get_trial(tid).user_attrs["heartbeat_at"])
