"""Rehearse a study: every trial replays a recorded KD trial instead of training one.

A study file with a ``rehearsal`` section (``rehearsal: {table: PATH, speed: 100}``) runs the whole
live stack -- ``kdsearch optimize`` / ``kdsearch worker``, the supervisor and its limits, the
sampler, screening, the rung pruner, constraints, storage and recovery -- and replaces only what
needs a real student and a GPU:

* **Preparation**: the worker loads no data set and prepares no teacher (the table's students
  were distilled already); it loads the table instead (:func:`load_table`, once per process).
* **Proposal -> row**: each proposal maps to the nearest recorded row (:meth:`RecordedTable.nearest`)
  on depth, width, resolution, temperature and alpha; the distance of each axis is its gap as a
  share of the table's range (in log space for width and temperature, as the study files search
  them). The row's id and distance are stored on the trial (user attr ``rehearsal``).
* **Fixed costs** (params, MACs, size, batch-1 CPU latency) come from the row
  (:func:`recorded_fixed_costs`); screening decides on them as on measured ones.
* **The box** is replayed by :func:`replay_box` through the ``on_eval`` contract of
  :func:`kdsearch.distill.distill` (:mod:`kdsearch.distill.hooks`): an evaluation at every
  ``distill.eval_every_fraction`` of the box and at every rung (``eval_at``), each with the row's
  validation accuracy at that fraction (linear between the table's 27 points), the training clock
  paused while the hook runs, and a stop asked by the hook ending the box at once -- exactly what
  the rung pruner sees in a real trial. ``speed`` box seconds pass per wall second; ``train_s``
  and ``kd_time_s`` are box seconds, as if the box had trained.
* **Final figures**: the row's val and test accuracy on all of val and test.
* **Store**: no checkpoint (there is no model); the trial says so (``artifact_id`` is absent and
  ``rehearsal.checkpoint`` gives the reason).

What a rehearsal answers: how many trials the budget buys with these workers and this box, how
many the pruner stops at each rung and how long its decisions take at this study size, how the
constraints screen, how storage grows, and that recovery holds -- before a GPU-hour is spent.
What it does not: the accuracies are the table's (CIFAR-10, VGG students, a 10 s CPU box), not
this study's data set.

The config rules (``kdsearch.config``): student.family vgg, no plateau stop, no fine-tune, and
objectives and constraints among the figures a row records
(:data:`kdsearch.config.sections.REHEARSAL_METRICS`).
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kdsearch import trial_record as tr
from kdsearch.distill import DistillResult
from kdsearch.distill.hooks import EvalHook, never_stop
from kdsearch.errors import ConfigError
from kdsearch.measure import Measurements

if TYPE_CHECKING:
    import optuna

    from kdsearch.config import RehearsalConfig, StudyConfig
    from kdsearch.search.pruning import RungPruner
    from kdsearch.search.space import Proposal
    from kdsearch.search.worker_setup import ProgressFn

__all__ = [
    "TABLE_AXES",
    "TABLE_NUM_CLASSES",
    "RecordedTrial",
    "RecordedTable",
    "Replay",
    "Rehearsal",
    "load_table",
    "check_table",
    "recorded_fixed_costs",
    "replay_box",
    "replay_fractions",
    "rehearsal_wall_s",
]

TABLE_AXES = ("depth", "width", "resolution", "temperature", "alpha")
"""The axes a proposal is matched on, in the order of :attr:`RecordedTrial.key`."""
_LOG_AXES = frozenset({"width", "temperature"})
TABLE_NUM_CLASSES = 10
"""The recorded students are CIFAR-10 classifiers."""
RECORDED_NOTE = "recorded in the rehearsal table (not measured in this run)"


@dataclass(frozen=True)
class RecordedTrial:
    """One row of the table: a configuration, its validation curve, final accuracies, fixed costs."""

    id: str
    key: tuple[float, ...]  # TABLE_AXES
    curve: tuple[tuple[float, float], ...]  # (fraction of the box, val accuracy on the val subset)
    val_accuracy: float  # after the full box, all of val
    test_accuracy: float  # after the full box, all of test (reporting only)
    params: int
    macs: int
    model_size_mb: float
    latency_ms_b1: float | None  # batch-1 CPU latency (noisy: recorded on a loaded machine)
    steps: int
    epochs: float

    def accuracy_at(self, fraction: float) -> float:
        """Validation accuracy after ``fraction`` of the box: linear between recorded points; the
        first point's before it, the last one's after it."""
        fs = [f for f, _ in self.curve]
        accs = [a for _, a in self.curve]
        return float(np.interp(fraction, fs, accs))


@dataclass(frozen=True)
class RecordedTable:
    """Every row of one table file, and the per-axis scale :meth:`nearest` measures gaps on."""

    path: str
    rows: tuple[RecordedTrial, ...]

    @functools.cached_property
    def _coords(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raw = np.array([[self._axis_value(a, r.key[i]) for i, a in enumerate(TABLE_AXES)] for r in self.rows])
        lo, hi = raw.min(axis=0), raw.max(axis=0)
        return raw, lo, np.where(hi > lo, hi - lo, 1.0)

    @staticmethod
    def _axis_value(axis: str, value: float) -> float:
        return math.log(value) if axis in _LOG_AXES else float(value)

    def nearest(self, depth: float, width: float, resolution: float, temperature: float, alpha: float
                ) -> tuple[RecordedTrial, float]:
        """The row nearest to a proposal and its distance (0: the proposal is that row); ties go
        to the row listed first. Each axis's gap counts as a share of the table's range."""
        raw, lo, span = self._coords
        wanted = [depth, width, resolution, temperature, alpha]
        point = np.array([self._axis_value(a, float(v)) for a, v in zip(TABLE_AXES, wanted, strict=True)])
        dist = np.sqrt((((raw - point) / span) ** 2).sum(axis=1))
        i = int(np.argmin(dist))  # the first of equals
        return self.rows[i], float(dist[i])


def _row(raw: dict[str, Any], where: str) -> RecordedTrial:
    try:
        curve = tuple((float(f), float(a)) for f, a in raw["curve"])
        if not curve or any(b[0] <= a[0] for a, b in zip(curve, curve[1:], strict=False)):
            raise ValueError("curve must be [fraction, accuracy] pairs at increasing fractions")
        latency = raw.get("latency_ms_b1")
        return RecordedTrial(
            id=str(raw.get("id", where)),
            key=tuple(float(raw[a]) for a in TABLE_AXES),
            curve=curve,
            val_accuracy=float(raw["val_accuracy"]),
            test_accuracy=float(raw["test_accuracy"]),
            params=int(raw["params"]),
            macs=int(raw["macs"]),
            model_size_mb=float(raw["model_size_mb"]),
            latency_ms_b1=None if latency is None else float(latency),
            steps=int(raw.get("steps", 0)),
            epochs=float(raw.get("epochs", 0.0)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError("rehearsal.table", f"row {where} is not a recorded trial ({type(exc).__name__}: {exc})",
                          None, "see benchmarks/search_table/README.md for the row format") from None


@functools.lru_cache(maxsize=4)
def load_table(path: str) -> RecordedTable:
    """Read a JSON-lines table (``benchmarks/search_table/README.md``); a file that cannot be read
    or a row without the recorded fields is a one-line :class:`ConfigError` on ``rehearsal.table``."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError("rehearsal.table", f"cannot read the table ({exc.strerror or type(exc).__name__})", path,
                          "e.g. benchmarks/search_table/table.jsonl") from None
    rows: list[RecordedTrial] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except ValueError:
            raise ConfigError("rehearsal.table", f"line {n} is not JSON", path) from None
        rows.append(_row(raw, f"{Path(path).name}:{n}"))
    if not rows:
        raise ConfigError("rehearsal.table", "holds no recorded trial", path)
    return RecordedTable(str(path), tuple(rows))


def check_table(path: str) -> RecordedTable:
    """The preflight check of ``rehearsal.table`` (in the supervisor, before the study is touched)."""
    return load_table(str(path))


def recorded_fixed_costs(row: RecordedTrial, table: str) -> Measurements:
    """The row's fixed costs as the fixed-cost phase would have measured them: params, MACs, size
    and the batch-1 CPU latency (as ``latency_ms_b1`` and ``latency_ms_b1_cpu``); a latency the
    row lacks is missing with the reason."""
    how = {"method": "rehearsal", "table": table, "row": row.id, "measured_on": RECORDED_NOTE}
    m = Measurements()
    m.set("params", float(row.params), how)
    m.set("macs", float(row.macs), how)
    m.set("model_size_mb", row.model_size_mb, how)
    for name in ("latency_ms_b1", "latency_ms_b1_cpu"):
        if row.latency_ms_b1 is None:
            m.set_missing(name, f"row {row.id} of the rehearsal table has no latency", how)
        else:
            m.set(name, row.latency_ms_b1, {**how, "device": "cpu", "note": "recorded on a loaded machine"})
    m.set_missing("probe_peak_memory_mb", "a rehearsal trains no student (no memory probe)", {"method": "skipped"})
    return m


def rehearsal_wall_s(cfg: StudyConfig, seconds: float) -> float:
    """Wall seconds that ``seconds`` of box or budget take: ``seconds / rehearsal.speed`` in a
    rehearsal, else ``seconds``. The supervisor's hard limit (box + grace), the worker's "one more
    trial?" estimate and the deadline of ``study.budget`` use it, so a rehearsal at speed 100
    rehearses a 24 h budget in 14.4 minutes, with ``study.grace`` (wall time for set-up and storage,
    which a replay does not speed up) as it is."""
    return seconds / cfg.rehearsal.speed if cfg.rehearsal.enabled else seconds


def replay_fractions(eval_every_fraction: float, eval_at: Sequence[float] = ()) -> list[float]:
    """The fractions of the box :func:`kdsearch.distill.distill` evaluates at: every
    ``eval_every_fraction``, every ``eval_at`` inside the box, and the end (1.0)."""
    grid = {round(k * eval_every_fraction, 9) for k in range(1, math.ceil(1.0 / eval_every_fraction) + 1)}
    points = {f for f in grid if f < 1.0} | {float(f) for f in eval_at if 0.0 < f < 1.0} | {1.0}
    return sorted(points)


@dataclass
class Replay:
    """What :func:`replay_box` returns: the loop's result, as :func:`distill` would give it, and the
    wall time of each ``on_eval`` call (what a GPU waits for while the hook decides)."""

    result: DistillResult
    hook_s: list[tuple[float, float]]  # (fraction of the box, wall s of the on_eval call)
    wall_s: float


def replay_box(
    row: RecordedTrial,
    *,
    box_s: float,
    speed: float,
    eval_every_fraction: float,
    eval_at: Sequence[float] = (),
    on_eval: EvalHook | None = None,
    progress: Callable[[float, str], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
) -> Replay:
    """Play ``row``'s box back at ``speed`` box seconds per wall second through ``on_eval``.

    Between evaluations the replay sleeps the training time the box would have used (``box_s``
    over ``speed``), measured on a training clock that, as in :func:`distill`, stops while the hook
    runs. A stop asked at an evaluation inside the box ends the box at once (a pruning rule);
    a request at the final evaluation changes nothing. The final evaluation reports the row's
    accuracy on all of val (``final_val_accuracy``).
    """
    hook = on_eval or never_stop
    fractions = replay_fractions(eval_every_fraction, eval_at)
    wall0 = clock()
    trained_wall = 0.0  # wall s of "training" so far (hook time excluded)
    history: list[tuple[float, float]] = []
    hook_s: list[tuple[float, float]] = []
    stopped_at: float | None = None
    final_val: float | None = None
    for fraction in fractions:
        segment_end = fraction * box_s / speed  # on the training clock, which the hook does not advance
        if segment_end > trained_wall:
            sleep(segment_end - trained_wall)
            trained_wall = segment_end
        final = fraction >= 1.0
        acc = row.val_accuracy if final else row.accuracy_at(fraction)
        train_s = fraction * box_s
        history.append((train_s, acc))
        if progress is not None:
            progress(fraction, f"replaying {row.id}")
        t = clock()
        stop = bool(hook(train_s, fraction, acc))
        hook_s.append((fraction, clock() - t))
        if final:
            final_val = acc
            break
        if stop:
            stopped_at = fraction
            break
    reached = stopped_at if stopped_at is not None else 1.0
    result = DistillResult(
        kd_time_s=reached * box_s,
        steps=int(round(row.steps * reached)),
        epochs=row.epochs * reached,
        images_seen=0,  # not recorded in the table
        final_train_loss=math.nan,  # not recorded in the table
        val_history=history,
        stopped_early=stopped_at is not None,
        final_val_accuracy=final_val,
        stop_requested_s=None if stopped_at is None else stopped_at * box_s,
        evaluations=len(history),
    )
    return Replay(result=result, hook_s=hook_s, wall_s=clock() - wall0)


@dataclass(frozen=True)
class Rehearsal:
    """A worker's rehearsal: the table it replays and the replay speed (``rehearsal`` section)."""

    table: RecordedTable
    speed: float

    @classmethod
    def from_config(cls, cfg: RehearsalConfig) -> Rehearsal:
        assert cfg.table is not None
        return cls(load_table(cfg.table), cfg.speed)

    def match(self, proposal: Proposal) -> tuple[RecordedTrial, dict[str, Any]]:
        """The row a proposal replays, and the trial's ``rehearsal`` user attr (table, row, distance)."""
        arch = proposal.spec.arch
        row, dist = self.table.nearest(float(arch.depth), float(arch.width), float(proposal.spec.resolution),
                                       proposal.hyper.temperature, proposal.hyper.alpha)
        return row, {"table": self.table.path, "row": row.id, "distance": round(dist, 6), "speed": self.speed,
                     "checkpoint": "none: a rehearsed trial trains no student"}

    @staticmethod
    def final_accuracy(row: RecordedTrial, m: Measurements) -> None:
        """The row's accuracies after the full box (all of val; test for reporting only)."""
        how = {"method": "rehearsal", "row": row.id, "measured_on": RECORDED_NOTE}
        m.set("val_accuracy", row.val_accuracy, {**how, "split": "val"})
        m.set("test_accuracy", row.test_accuracy, {**how, "split": "test", "use": "reporting only"})


def rehearsed_row(rehearsal: Rehearsal | None, trial: optuna.Trial, proposal: Proposal) -> RecordedTrial | None:
    """In a rehearsal, the recorded row ``proposal`` replays (stored on the trial first, with
    what a trained trial's preparation stores); else None."""
    if rehearsal is None:
        return None
    row, how = rehearsal.match(proposal)
    spec, hyper = proposal.spec, proposal.hyper
    tr.write(trial, {
        tr.BOX_S: proposal.box_s, tr.SPEC: spec.to_dict(), tr.SIZE_BY: spec.size_by(), tr.STUDENT: spec.label, tr.TEMPERATURE: hyper.temperature,
        tr.ALPHA: hyper.alpha, tr.LR: hyper.lr, tr.REHEARSAL: how,
    })
    return row


def replay_trial_box(
    rehearsal: Rehearsal, cfg: StudyConfig, trial: optuna.Trial, proposal: Proposal, row: RecordedTrial, pruner: RungPruner | None,
    progress: ProgressFn,
) -> tuple[Measurements, DistillResult]:
    """:func:`kdsearch.search.objective.run_trial`'s box in a rehearsal: the row's box played through the same ``on_eval`` hook
    (the pruner) at the same evaluations, at ``rehearsal.speed``; the same records stored (the
    caller stores the pruning record), and the
    wall time of each ``on_eval`` call (the decision time at each rung) in ``rehearsal``."""
    box_s = proposal.box_s
    progress("distil", 0.0, proposal.spec.label)
    replay = replay_box(row, box_s=box_s, speed=rehearsal.speed, eval_every_fraction=cfg.distill.eval_every_fraction,
                        eval_at=pruner.config.rungs if pruner is not None else (), on_eval=pruner,
                        progress=lambda frac, msg: progress("distil", frac, msg))
    result = replay.result
    m = Measurements()
    m.set("kd_time_s", result.kd_time_s, {
        "method": "rehearsal: box seconds replayed", "box_s": box_s, "box_searched": cfg.study.box_searched,
        "stopped_early": result.stopped_early, "stop_requested_s": result.stop_requested_s,
        "evaluations": result.evaluations, "row": row.id,
    })
    history = result.history()
    history["final_train_loss"] = None  # not recorded in the table
    trial.set_user_attr(tr.KD_HISTORY, history)
    trial.set_user_attr(tr.REHEARSAL, {**rehearsal.match(proposal)[1],
                                       "on_eval_s": [[round(f, 5), round(t, 6)] for f, t in replay.hook_s]})
    return m, result
