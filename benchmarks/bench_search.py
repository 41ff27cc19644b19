"""Replay search strategies against the recorded table of real KD trials, in simulated time.

The table (``benchmarks/search_table/table.jsonl``, see its README) holds, per configuration of
VGG depth x width x resolution x temperature x alpha, the validation accuracy at every 1/27 of
the KD box, the final val/test accuracy and the fixed costs. A strategy proposes
configurations; evaluating one up to fraction f of the box costs f boxes (a screened-out one
costs :data:`SCREEN_COST_BOX`). Strategies:

* ``random``, ``tpe``, ``nsga2``: Optuna samplers, every trial gets the full box;
* ``random+es`` (MOASHA's rule: random proposals, asynchronous successive halving ranked by
  non-dominated sorting) and ``tpe+es``: the same samplers, with kdsearch's early stopping;
* ``tpe+es+screen``: also ends a trial whose fixed costs break the study's constraint before
  any training (only with ``--max-params``);
* ``tpe+es+zc``: also ranks each proposal, before any training, on a zero-cost score (the
  table's ``zc_sample_relation``: how well the untrained student's sample-relation matrix matches
  the teacher's, DisWOT-style) and its MACs, against every proposal scored before it, with the
  rung pruner's own rule (non-dominated sorting, top 1/eta continue); one outside stops at the
  cost of computing the score (the table's ``zc_s``, as a share of its box);
* ``tpe-impute+es``, ``tpe-bohb+es``, ``tpe-rank+es``: TPE that reads the PRUNED trials
  (:class:`kdsearch.search.samplers.RungTPESampler`), with the same early stopping;
* ``neps-moasha``: the peer, NePS's multi-objective ASHA (``neural-pipeline-search``), driven
  through its own ask-and-tell API in a separate interpreter (``--neps-python``);
* ``synetune-moasha``: syne-tune 0.16.0's ``MOASHA`` through its scheduler API, in its own venv
  (``--synetune-python``, default ``.venv-synetune``); ``synetune-moasha-fixed``: the same with
  its non-dominated priority's order read as ranks (:func:`synetune_main` says why);
  ``synetune-ehvi``: its model-based multi-objective searcher (``baselines.EHVI``, full boxes;
  needs torch and botorch in that venv).

The early-stopping decisions are made by :class:`kdsearch.search.pruning.RungPruner` over an
:class:`~kdsearch.search.pruning.OptunaRungStore`, i.e. the code a live study runs, called as
``distill()`` calls its ``on_eval`` hook: once per evaluation at every 1/27 of the box.

Objectives: maximise the final validation accuracy (all of val), minimise MACs. Hypervolume is
taken over the feasible COMPLETE trials on (1 - val accuracy, normalised log10 MACs), where
log10 MACs is min-max scaled to [0, 1] over the table; the reference point is (0.9, 1.1), i.e.
chance accuracy (10 classes) and 10% beyond the largest model. It is reported as a share of the
table's own Pareto front's hypervolume (1.0 = the best any strategy could find).

The table stands for a continuous space. Depth and resolution are categorical; width,
temperature and alpha are proposed as floats over the table's range (log for width and T, as the
study files search them), and a proposal maps to the nearest row that has not been evaluated
yet (:func:`nearest_new_row`): in a continuous space a new proposal is a new student. The
sampler is told that row's outcome. (With five small categorical axes and exact duplicates, TPE
in an early-stopped study soon proposes its few COMPLETE rows over and over.) NePS gets the
same space and the same mapping.

    python benchmarks/bench_search.py --table benchmarks/search_table/table.jsonl --seeds 20 \\
        --budget 30 --neps-python /tmp/nepsvenv/bin/python --synetune-python .venv-synetune/bin/python
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

AXES = ("depth", "width", "resolution", "temperature", "alpha")
N_EVALS = 27  # evaluations per box in the table (every 1/27)
SCREEN_COST_BOX = 0.005  # fixed-cost measurement before training, as a share of the box (3 s of 10 min)
REFERENCE = (0.9, 1.1)  # (1 - accuracy: chance on 10 classes, normalised log10 MACs: 10% beyond the max)
RUNG_TPE = ("tpe-impute", "tpe-bohb", "tpe-rank")  # kdsearch.search.samplers.RungTPESampler's modes
ES_STRATEGIES = ("random+es", "tpe+es", *(f"{t}+es" for t in RUNG_TPE), "tpe+es+screen", "tpe+es+zc")
ALL_STRATEGIES = ("random", "tpe", "nsga2", "random+es", "tpe+es", *(f"{t}+es" for t in RUNG_TPE), "tpe+es+screen",
                  "tpe+es+zc", "neps-moasha", "synetune-moasha", "synetune-moasha-fixed", "synetune-ehvi")
PEERS = ("neps-moasha", "synetune-moasha", "synetune-moasha-fixed", "synetune-ehvi")  # each in its own venv

Key = tuple[Any, ...]


# ----------------------------------------------------------------------------------------------
# The table


@dataclass
class Row:
    key: Key
    curve: list[float]  # val accuracy (fixed val subset) after k/27 of the box, k = 1..27
    val_accuracy: float  # final, all of val
    test_accuracy: float
    params: int
    macs: int
    latency_ms_b1: float | None
    zc: float | None = None  # zc_sample_relation of the untrained student (hard table only)
    zc_box: float = 0.0  # the cost of computing it, as a share of the box


@dataclass
class Table:
    rows: dict[Key, Row]
    choices: dict[str, list[Any]]
    log_macs_lo: float
    log_macs_hi: float

    def point(self, row: Row) -> tuple[float, float]:
        """(1 - final val accuracy, normalised log10 MACs): the two minimised HV axes."""
        span = self.log_macs_hi - self.log_macs_lo
        return 1.0 - row.val_accuracy, (math.log10(row.macs) - self.log_macs_lo) / span


def _curve_on_grid(curve: list[list[float]]) -> list[float]:
    """The accuracy seen at the first evaluation at or past k/27 of the box, k = 1..27."""
    out = []
    for k in range(1, N_EVALS + 1):
        target = k / N_EVALS - 1e-6
        acc = next((a for f, a in curve if f >= target), curve[-1][1])
        out.append(float(acc))
    return out


def load_table(path: Path) -> Table:
    """The table's rows over :data:`AXES`. Rows without one of the axes (another family's) are
    left out, and the grid need not be complete (a proposal maps to the nearest row either way);
    both are said on stderr."""
    rows: dict[Key, Row] = {}
    skipped = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if any(r.get(a) is None for a in AXES):
            skipped += 1
            continue
        key = tuple(r[a] for a in AXES)
        zc = r.get("zc_sample_relation")
        rows[key] = Row(key, _curve_on_grid(r["curve"]), r["val_accuracy"], r["test_accuracy"], r["params"],
                        r["macs"], r.get("latency_ms_b1"),
                        zc=None if zc is None or not math.isfinite(zc) else float(zc),
                        zc_box=float(r.get("zc_s") or 0.0) / float(r.get("box_s") or 1.0))
    choices = {a: sorted({k[i] for k in rows}) for i, a in enumerate(AXES)}
    n_grid = math.prod(len(v) for v in choices.values())
    if n_grid != len(rows) or skipped:
        print(f"{path}: {len(rows)} rows over {AXES} (the axes span {n_grid} configurations); "
              f"{skipped} rows without one of the axes left out", file=sys.stderr)
    logs = [math.log10(r.macs) for r in rows.values()]
    return Table(rows, choices, min(logs), max(logs))


# ----------------------------------------------------------------------------------------------
# Hypervolume over a run


def hv_of(points: list[tuple[float, float]]) -> float:
    from kdsearch.pareto import hypervolume  # noqa: PLC0415 - the one HV implementation

    return hypervolume(np.array(points), REFERENCE) if points else 0.0


@dataclass
class Trace:
    """One strategy's run on one seed: what was paid, when, and what completed."""

    strategy: str
    seed: int
    budget: float
    completions: list[tuple[float, Key]] = field(default_factory=list)  # (cost so far, key), feasible only
    started: list[float] = field(default_factory=list)  # cost so far when each new candidate started training
    screened: int = 0
    spent: float = 0.0
    note: str = ""


def hv_curve(trace: Trace, table: Table, grid: np.ndarray, hv_max: float) -> np.ndarray:
    """HV share reached by each budget in ``grid`` (boxes)."""
    out = np.zeros(grid.size)
    pts: list[tuple[float, float]] = []
    times, values = [0.0], [0.0]
    for cost, key in sorted(trace.completions):
        pts.append(table.point(table.rows[key]))
        times.append(cost)
        values.append(hv_of(pts) / hv_max)
    for i, b in enumerate(grid):
        j = int(np.searchsorted(times, b, side="right")) - 1
        out[i] = values[j]
    return out


def time_to(trace: Trace, table: Table, target: float, hv_max: float) -> float:
    """Boxes spent when the HV share first reached ``target`` (inf if never)."""
    pts: list[tuple[float, float]] = []
    for cost, key in sorted(trace.completions):
        pts.append(table.point(table.rows[key]))
        if hv_of(pts) / hv_max >= target - 1e-12:
            return cost
    return math.inf


# ----------------------------------------------------------------------------------------------
# Optuna strategies (full box, and with kdsearch's early stopping)


LOG_AXES = ("width", "temperature")  # searched on a log scale, as the study files do
FLOAT_AXES = ("width", "temperature", "alpha")


def propose(trial: Any, table: Table) -> dict[str, Any]:
    """What an Optuna trial proposes: depth and resolution categorical; width, temperature and
    alpha floats over the table's range (log for width and T), as the study files search them."""
    out: dict[str, Any] = {}
    for a in AXES:
        ch = table.choices[a]
        if a in FLOAT_AXES:
            out[a] = trial.suggest_float(a, ch[0], ch[-1], log=a in LOG_AXES)
        else:
            out[a] = trial.suggest_categorical(a, ch)
    return out


def nearest_new_row(table: Table, proposal: dict[str, Any], paid: set[Key]) -> Key | None:
    """The row nearest to ``proposal`` that nobody has paid for (None when every row is paid).

    Distance: on a float axis the gap as a share of the axis range (in log space on a log axis);
    on a categorical axis 0 or 1. A proposal in a continuous space is a new student, so it maps
    to a row not yet evaluated; the sampler is told that row's outcome under its own proposal.
    """
    best, best_d = None, math.inf
    for key in table.rows:
        if key in paid:
            continue
        d = 0.0
        for i, a in enumerate(AXES):
            ch = table.choices[a]
            v, c = proposal[a], key[i]
            if a in FLOAT_AXES:
                f = math.log if a in LOG_AXES else float
                span = f(ch[-1]) - f(ch[0]) or 1.0
                d += abs(f(v) - f(c)) / span
            else:
                d += 0.0 if v == c else 1.0
        if d < best_d - 1e-12:
            best, best_d = key, d
    return best


def run_optuna(strategy: str, table: Table, seed: int, budget: float, max_params: float | None,
               tpe: str = "kdsearch", eta: int = 3, min_fraction: float = 1 / 27, startup: int = 5,
               min_observations: int = 5, min_competitors: int | None = None) -> Trace:
    import optuna  # noqa: PLC0415

    from kdsearch.config import PruningConfig  # noqa: PLC0415
    from kdsearch.search.pruning import OptunaRungStore, RungEntry, RungPruner, decide_at_rung  # noqa: PLC0415
    from kdsearch.search.screening import screen_fixed_costs  # noqa: PLC0415

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    base = strategy.split("+")[0]
    es = "+es" in strategy
    screen = strategy.endswith("+screen")
    zc_screen = strategy.endswith("+zc")
    zc_seen: list[RungEntry] = []  # every proposal's (zero-cost score, MACs) so far
    if base == "random":
        sampler: optuna.samplers.BaseSampler = optuna.samplers.RandomSampler(seed=seed)
    elif base == "tpe":
        # 10 random start-up trials, then TPE. "kdsearch": the settings a study's sampler has
        # (kdsearch.search.study.make_sampler: multivariate, constant liar); "plain": Optuna's
        # defaults (independent per parameter), as recorded first.
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True,
                                             constant_liar=True) \
            if tpe == "kdsearch" else optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    elif base.startswith("tpe-"):  # kdsearch's TPE reading the PRUNED trials (kdsearch.search.samplers)
        from kdsearch.search.samplers import RungTPESampler  # noqa: PLC0415

        sampler = RungTPESampler(mode=base.removeprefix("tpe-"), min_observations=min_observations, seed=seed,
                                 n_startup_trials=startup, multivariate=True, constant_liar=True)
    elif base == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=10)  # 3-4 generations in budget
    else:
        raise ValueError(strategy)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    study.set_metric_names(["val_accuracy", "macs"])
    pcfg = PruningConfig(eta=eta, min_fraction=min_fraction, min_competitors=min_competitors)
    trace = Trace(strategy, seed, budget)
    seen: dict[Key, int] = {}  # key -> the trial number that paid for it
    cost = 0.0
    while cost < budget:
        trial = study.ask()
        key = nearest_new_row(table, propose(trial, table), set(seen))
        if key is None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            trace.note = f"every row evaluated after {cost:.1f} boxes"
            break
        trial.set_user_attr("row", list(key))
        row = table.rows[key]
        violation = None if max_params is None else float(row.params) - float(max_params)
        if violation is not None:
            trial.set_constraint("params", violation)
        stopped_before_box = False
        if screen and max_params is not None:
            verdict = screen_fixed_costs({"params": float(row.params), "macs": float(row.macs)},
                                         {"params": max_params}, ("params", "macs"))
            if not verdict.feasible_so_far:
                cost += SCREEN_COST_BOX
                stopped_before_box = True
        if zc_screen and not stopped_before_box:
            if row.zc is None:
                raise SystemExit(f"{strategy}: the table has no zc_sample_relation (record it with --grid hard)")
            mine = RungEntry(trial.number, (row.zc, float(row.macs)))
            decision = decide_at_rung(mine, zc_seen, ("maximize", "minimize"), pcfg, 0, scales=("linear", "log"))
            zc_seen.append(mine)
            cost += row.zc_box
            stopped_before_box = decision.prune
        if stopped_before_box:
            trace.screened += 1
            seen[key] = trial.number
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        trace.started.append(cost)
        if es:
            pruner = RungPruner(key=trial.number, store=OptunaRungStore(trial, ["val_accuracy", "macs"]),
                                config=pcfg, fixed_values=(float(row.macs),), directions=("maximize", "minimize"),
                                scales=("linear", "log"))
            stopped_at = None
            for k in range(1, N_EVALS + 1):
                f = k / N_EVALS
                if pruner(f, f, row.curve[k - 1]):
                    stopped_at = f
                    break
            if stopped_at is not None:
                cost += stopped_at
                seen[key] = trial.number
                trial.set_user_attr("pruning", pruner.summary())
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                continue
        cost += 1.0
        values = [row.val_accuracy, float(row.macs)]
        seen[key] = trial.number
        study.tell(trial, values)
        if violation is None or violation <= 0:
            trace.completions.append((cost, key))
    trace.spent = cost
    return trace


# ----------------------------------------------------------------------------------------------
# The peer: NePS multi-objective ASHA, in its own interpreter


def neps_traces(table_path: Path, seeds: list[int], budget: float, max_params: float | None,
                python: str, peer: str = "neps", flag: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """Run :func:`neps_main` (``peer`` "neps") or :func:`synetune_main` ("synetune") in ``python``
    (the peer's own venv); returns (raw traces, note)."""
    if not python or not Path(python).exists():
        return [], f"not run: no {peer} interpreter at {python!r} (see the module docstring)"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{peer}.json"
        cmd = [python, __file__, f"--{peer}-worker", str(out), "--table", str(table_path), "--budget", str(budget),
               "--seed-list", ",".join(map(str, seeds))]
        if max_params is not None:
            cmd += ["--max-params", str(max_params)]
        if flag:
            cmd += [flag]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return [], f"{peer} run failed (exit {proc.returncode}): {' | '.join(tail)}"
        data = json.loads(out.read_text())
    return data["traces"], data["note"]


def neps_main(args: argparse.Namespace) -> int:
    """Inside the NePS venv: MO-ASHA (eta 3, fidelity 3..27 of 27 = rungs 1/9, 1/3, 1) per seed."""
    import random  # noqa: PLC0415

    import neps  # noqa: PLC0415
    import torch  # noqa: PLC0415

    table = load_table(args.table)
    c = table.choices
    space_cls = type("KDSpace", (neps.PipelineSpace,), {
        **{a: (neps.Float(c[a][0], c[a][-1], log=a in LOG_AXES) if a in FLOAT_AXES
               else neps.Categorical(choices=tuple(c[a]))) for a in AXES},
        "box": neps.Fidelity(neps.Integer(3, N_EVALS)),
    })
    traces = []
    for seed in (int(s) for s in args.seed_list.split(",")):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        opt = neps.AskAndTell(optimizer=neps.algorithms.moasha(space_cls(), eta=3))
        paid: dict[Key, int] = {}  # key -> highest fidelity already paid for (of 27)
        row_of: dict[str, Key] = {}  # NePS trial id -> the table row it was mapped to
        cost, started, completions, note = 0.0, [], [], ""
        while cost < args.budget:
            trial = opt.ask()
            cfg = trial.config
            prev = trial.metadata.previous_trial_id
            if prev is not None and prev in row_of:  # a promotion continues the same student
                key = row_of[prev]
            else:
                key = nearest_new_row(table, cfg, set(paid))
                if key is None:
                    note = f"every row evaluated after {cost:.1f} boxes"
                    break
            row_of[trial.id] = key
            fid = int(cfg["box"])
            row = table.rows[key]
            have = paid.get(key, 0)
            if have == 0:
                started.append(cost)
            if fid > have:
                cost += (fid - have) / N_EVALS  # continued from the checkpoint at `have` (ASHA promotion)
                paid[key] = fid
            acc = row.val_accuracy if fid == N_EVALS else row.curve[fid - 1]
            opt.tell(trial, {"objective_to_minimize": [1.0 - acc, table.point(row)[1]]})
            feasible = args.max_params is None or row.params <= args.max_params
            if fid == N_EVALS and have < N_EVALS and feasible:
                completions.append([cost, list(key)])
        traces.append({"seed": seed, "spent": cost, "started": started, "completions": completions, "note": note})
    note = f"neural-pipeline-search {_neps_version()}, neps.algorithms.moasha(eta=3, mo_selector='epsnet')"
    args.neps_worker.write_text(json.dumps({"traces": traces, "note": note}))
    return 0


def synetune_main(args: argparse.Namespace) -> int:
    """Inside the syne-tune venv: ``syne_tune.optimizer.schedulers.multiobjective.moasha.MOASHA``
    (non-dominated sorting priority, reduction factor 3, grace period 3 and max_t 27 of 27 = rungs
    1/9, 1/3, 1: ASHA's stopping variant, as kdsearch's), driven through its scheduler API
    (``suggest`` / ``on_trial_add`` / ``on_trial_result`` / ``on_trial_complete``), one trial at a
    time. Each trial reports after every 1/27 of the box (the table's curve; the full-box report
    is the final val accuracy) with the two minimised metrics of the hypervolume; a STOP before
    27 ends it (it paid the fraction reached)."""
    import random  # noqa: PLC0415

    from syne_tune.config_space import choice, loguniform, uniform  # noqa: PLC0415
    from syne_tune.optimizer.scheduler import SchedulerDecision  # noqa: PLC0415
    from syne_tune.optimizer.schedulers.multiobjective.moasha import MOASHA  # noqa: PLC0415
    from syne_tune.optimizer.schedulers.multiobjective.multiobjective_priority import (  # noqa: PLC0415
        NonDominatedPriority,
    )

    class RankPriority(NonDominatedPriority):
        """syne-tune 0.16.0's NonDominatedPriority returns the *order* of the items (indices, best
        first), but ``asha.Bracket.on_result`` reads it as each item's priority, so a new trial's
        "rank" is the index of whichever item sorts last. This returns each item's position in
        that order, which is what the bracket expects."""

        def priority_unsafe(self, objectives: np.ndarray) -> np.ndarray:
            order = super().priority_unsafe(objectives)
            ranks = np.empty(len(order))
            ranks[np.asarray(order, dtype=int)] = np.arange(len(order))
            return ranks

    table = load_table(args.table)
    c = table.choices
    space = {a: ((loguniform if a in LOG_AXES else uniform)(c[a][0], c[a][-1]) if a in FLOAT_AXES
                 else choice(list(c[a]))) for a in AXES}
    if args.synetune_ehvi:
        return _synetune_ehvi(args, table, space)
    traces = []
    for seed in (int(s) for s in args.seed_list.split(",")):
        random.seed(seed)
        np.random.seed(seed)  # syne-tune's domains sample from numpy's global generator
        sched = MOASHA(space, metrics=["error", "macs_scaled"], do_minimize=True, time_attr="epoch",
                       max_t=N_EVALS, grace_period=3, reduction_factor=3, random_seed=seed,
                       multiobjective_priority=RankPriority() if args.synetune_fixed else None)
        paid: set[Key] = set()
        cost, started, completions, note, n = 0.0, [], [], "", 0
        while cost < args.budget:
            proposed = _synetune_propose(sched, table, paid, n)
            if proposed is None:
                note = f"every row evaluated after {cost:.1f} boxes"
                break
            trial, key, row = proposed
            n += 1
            sched.on_trial_add(trial)
            started.append(cost)
            macs_scaled = table.point(row)[1]
            for k in range(1, N_EVALS + 1):
                acc = row.val_accuracy if k == N_EVALS else row.curve[k - 1]
                result = {"epoch": k, "error": 1.0 - acc, "macs_scaled": macs_scaled}
                if k == N_EVALS:
                    cost += 1.0 / N_EVALS
                    sched.on_trial_complete(trial, result)
                    if args.max_params is None or row.params <= args.max_params:
                        completions.append([cost, list(key)])
                    break
                cost += 1.0 / N_EVALS
                if sched.on_trial_result(trial, result) == SchedulerDecision.STOP:
                    sched.on_trial_remove(trial)
                    break
        traces.append({"seed": seed, "spent": cost, "started": started, "completions": completions, "note": note})
    from importlib.metadata import version  # noqa: PLC0415

    prio = "its NonDominatedPriority's order read as ranks (fixed)" if args.synetune_fixed else "NonDominatedPriority"
    note = (f"syne-tune {version('syne-tune')}, MOASHA({prio}, reduction_factor=3, grace_period=3, "
            "max_t=27), random proposals")
    args.synetune_worker.write_text(json.dumps({"traces": traces, "note": note}))
    return 0


def _synetune_propose(sched: Any, table: Table, paid: set[Key], trial_id: int) -> tuple[Any, Key, Any] | None:
    """syne-tune's next proposal as (its Trial, the nearest table row not yet paid for: key, row),
    the row marked paid; None when every row has been evaluated."""
    from datetime import datetime  # noqa: PLC0415

    from syne_tune.backend.trial_status import Trial  # noqa: PLC0415

    suggestion = sched.suggest()
    key = nearest_new_row(table, suggestion.config, paid)
    if key is None:
        return None
    paid.add(key)
    return Trial(trial_id=trial_id, config=suggestion.config, creation_time=datetime.now()), key, table.rows[key]


def _synetune_ehvi(args: argparse.Namespace, table: Table, space: dict[str, Any]) -> int:
    """syne-tune's multi-objective model-based searcher, ``baselines.EHVI`` (BoTorch's qLogEHVI
    over a GP per objective): single fidelity, so every trial gets the full box. Needs torch and
    botorch in the syne-tune venv."""
    import random  # noqa: PLC0415
    from importlib.metadata import version  # noqa: PLC0415

    import torch  # noqa: PLC0415
    from syne_tune.optimizer.baselines import EHVI  # noqa: PLC0415

    torch.set_num_threads(1)
    # syne-tune 0.16.0 builds its tensors in torch's default dtype (float32), and botorch 0.18's
    # compiled qLogEHVI kernel refuses float32 ("expected scalar type Double but found Float")
    torch.set_default_dtype(torch.float64)
    traces = []
    for seed in (int(s) for s in args.seed_list.split(",")):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        sched = EHVI(space, metrics=["error", "macs_scaled"], do_minimize=True, random_seed=seed)
        paid: set[Key] = set()
        cost, started, completions, note, n = 0.0, [], [], "", 0
        while cost < args.budget:
            proposed = _synetune_propose(sched, table, paid, n)
            if proposed is None:
                note = f"every row evaluated after {cost:.1f} boxes"
                break
            trial, key, row = proposed
            n += 1
            started.append(cost)
            cost += 1.0
            sched.on_trial_complete(trial, {"error": 1.0 - row.val_accuracy, "macs_scaled": table.point(row)[1]})
            if args.max_params is None or row.params <= args.max_params:
                completions.append([cost, list(key)])
        traces.append({"seed": seed, "spent": cost, "started": started, "completions": completions, "note": note})
    note = f"syne-tune {version('syne-tune')} baselines.EHVI (botorch {version('botorch')}), full box per trial"
    args.synetune_worker.write_text(json.dumps({"traces": traces, "note": note}))
    return 0


def _neps_version() -> str:
    from importlib.metadata import version  # noqa: PLC0415

    return version("neural-pipeline-search")


# ----------------------------------------------------------------------------------------------
# Schedule question: does WSD with rung cool-downs rank students better than cosine?


def schedule_ranking(cosine: Table, wsd_path: Path) -> dict[str, Any]:
    from scipy.stats import spearmanr  # noqa: PLC0415

    wsd_rows: dict[Key, Row] = {}
    for line in wsd_path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            key = tuple(r[a] for a in AXES)
            wsd_rows[key] = Row(key, _curve_on_grid(r["curve"]), r["val_accuracy"], r["test_accuracy"],
                                r["params"], r["macs"], r.get("latency_ms_b1"))
    keys = sorted(k for k in wsd_rows if k in cosine.rows)
    out: dict[str, Any] = {"n": len(keys)}
    for name, rows in (("cosine", cosine.rows), ("wsd-rung", wsd_rows)):
        final = np.array([rows[k].val_accuracy for k in keys])
        res = {"final_val_mean": float(final.mean())}
        for label, k_eval in (("1/9", 3), ("1/3", 9)):
            at = np.array([rows[k].curve[k_eval - 1] for k in keys])
            rho = spearmanr(at, final).statistic
            top = set(np.argsort(-final)[: math.ceil(len(keys) / 3)])
            kept = set(np.argsort(-at)[: math.ceil(len(keys) / 3)])
            res[f"spearman_{label}"] = float(rho)
            res[f"top_third_overlap_{label}"] = len(top & kept) / len(top)
        out[name] = res
    return out


# ----------------------------------------------------------------------------------------------


def _q(values: list[float]) -> tuple[float, float, float]:
    a = np.array(values, dtype=float)
    return float(np.median(a)), float(np.percentile(a, 25)), float(np.percentile(a, 75))


def _fmt_budget(b: float) -> str:
    return "never" if not math.isfinite(b) else f"{b:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", type=Path, default=Path(__file__).parent / "search_table" / "table.jsonl")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--seed-list", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, default=30.0, help="simulated budget, in KD boxes")
    ap.add_argument("--box-minutes", type=float, default=10.0, help="GPU minutes one box stands for (for GPU-hours)")
    ap.add_argument("--max-params", type=float, default=None, help="study constraint params <= this")
    ap.add_argument("--strategies", default=",".join(ALL_STRATEGIES))
    ap.add_argument("--neps-python", default="/tmp/nepsvenv/bin/python")
    ap.add_argument("--wsd-table", type=Path, default=None, help="WSD recording for the schedule question")
    ap.add_argument("--out-json", type=Path, default=None)
    ap.add_argument("--tpe", choices=("kdsearch", "plain"), default="kdsearch",
                    help="TPE settings: a kdsearch study's (multivariate) or Optuna's defaults")
    ap.add_argument("--eta", type=int, default=3, help="study.pruning.eta")
    ap.add_argument("--min-fraction", type=float, default=1 / 27,
                    help="study.pruning.min_fraction (a multiple of 1/27; the default is kdsearch's)")
    ap.add_argument("--startup", type=int, default=5,
                    help="study.n_startup_trials of TPE (the bundled pruned studies' 5)")
    ap.add_argument("--min-competitors", type=int, default=None,
                    help="study.pruning.min_competitors (default: kdsearch's, eta)")
    ap.add_argument("--min-observations", type=int, default=5,
                    help="tpe-impute/tpe-bohb: observations at a rung before it is used (RungTPESampler)")
    ap.add_argument("--target", type=float, default=None,
                    help="HV share to reach (default: this run's full-box TPE median final HV share)")
    ap.add_argument("--synetune-python", default=str(Path(__file__).resolve().parents[1] / ".venv-synetune/bin/python"))
    ap.add_argument("--neps-worker", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--synetune-worker", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--synetune-fixed", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--synetune-ehvi", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.neps_worker is not None:
        return neps_main(args)
    if args.synetune_worker is not None:
        return synetune_main(args)

    t0 = time.perf_counter()
    table = load_table(args.table)
    strategies = [s for s in args.strategies.split(",") if s]
    if args.max_params is None:
        strategies = [s for s in strategies if not s.endswith("+screen")]
    seeds = list(range(args.seeds))
    feasible_rows = [r for r in table.rows.values() if args.max_params is None or r.params <= args.max_params]
    hv_max = hv_of([table.point(r) for r in feasible_rows])
    grid = np.round(np.arange(0.5, args.budget + 1e-9, 0.5), 3)

    traces: dict[str, list[Trace]] = {}
    notes: dict[str, str] = {}
    for s in strategies:
        if s in PEERS:
            peer = s.split("-")[0]
            python = args.neps_python if peer == "neps" else args.synetune_python
            raw, notes[s] = neps_traces(args.table, seeds, args.budget, args.max_params, python, peer,
                                        flag={"synetune-moasha-fixed": "--synetune-fixed",
                                              "synetune-ehvi": "--synetune-ehvi"}.get(s))
            traces[s] = []
            for r in raw:
                tr = Trace(s, r["seed"], args.budget, [(c, tuple(k)) for c, k in r["completions"]], r["started"],
                           spent=r["spent"])
                traces[s].append(tr)
        else:
            traces[s] = [run_optuna(s, table, seed, args.budget, args.max_params, args.tpe, args.eta,
                                   args.min_fraction, args.startup, args.min_observations, args.min_competitors)
                         for seed in seeds]
        print(f"{s}: {len(traces[s])} seeds in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)

    curves = {s: np.stack([hv_curve(t, table, grid, hv_max) for t in ts]) for s, ts in traces.items() if ts}
    i_end = grid.size - 1
    target = float(np.median(curves["tpe"][:, i_end])) if "tpe" in curves else float("nan")
    if args.target is not None:  # a baseline held fixed while the early-stopping settings vary
        target = args.target
    summary: dict[str, Any] = {}
    for s, ts in traces.items():
        if not ts:
            summary[s] = {"note": notes.get(s, "")}
            continue
        final = curves[s][:, i_end].tolist()
        reach = [time_to(t, table, target, hv_max) for t in ts]
        cands = [sum(1 for c in t.started if c < args.budget) for t in ts]
        summary[s] = {
            "hv_final": _q(final),
            "hv_at": {f"{b:g}": _q(curves[s][:, int(np.searchsorted(grid, b))].tolist())
                      for b in (args.budget / 4, args.budget / 2, args.budget) if b >= grid[0]},
            "budget_to_tpe_final": float(np.percentile(reach, 50, method="nearest")) if reach else math.inf,
            "budget_to_tpe_final_iqr": (float(np.percentile(reach, 25, method="nearest")),
                                        float(np.percentile(reach, 75, method="nearest"))),
            "reached_share": float(np.mean([math.isfinite(x) for x in reach])),
            "budget_to_tpe_final_per_seed": [x if math.isfinite(x) else None for x in reach],  # paired comparisons
            "candidates": _q(cands),
            "screened": _q([t.screened for t in ts]),
            "note": notes.get(s, "") or next((t.note for t in ts if t.note), ""),
        }

    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
        "table": str(args.table), "rows": len(table.rows), "seeds": len(seeds), "budget_boxes": args.budget,
        "box_minutes": args.box_minutes, "max_params": args.max_params, "feasible_rows": len(feasible_rows),
        "reference_point": REFERENCE, "hv_max": hv_max, "target_hv_share_tpe_final": target,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    result: dict[str, Any] = {"meta": meta, "summary": summary,
                              "curves": {s: {"grid": grid.tolist(), "median": np.median(c, axis=0).tolist(),
                                             "q25": np.percentile(c, 25, axis=0).tolist(),
                                             "q75": np.percentile(c, 75, axis=0).tolist()}
                                         for s, c in curves.items()}}
    if args.wsd_table is not None:
        result["schedule"] = schedule_ranking(table, args.wsd_table)
    if args.out_json is not None:
        args.out_json.write_text(json.dumps(result, indent=1, default=float))

    gpu_h = args.budget * args.box_minutes / 60
    print(f"## {len(table.rows)} configs, {len(seeds)} seeds, budget {args.budget:g} boxes "
          f"(= {gpu_h:.1f} GPU-h at {args.box_minutes:g} min/box)"
          + (f", constraint params <= {args.max_params:g} ({len(feasible_rows)} feasible rows)" if args.max_params else ""))
    print(f"HV share of the table's Pareto front; target = full-box TPE's median final HV share {target:.4f}\n")
    quarter, half = f"{args.budget / 4:g}", f"{args.budget / 2:g}"
    print(f"| strategy | HV @ {quarter} boxes | HV @ {half} boxes | HV @ {args.budget:g} boxes (median, IQR) "
          "| boxes to reach TPE's final HV (median, IQR; share of seeds) | candidates trained | screened |")
    print("|---|---|---|---|---|---|---|")
    for s, d in summary.items():
        if "hv_final" not in d:
            print(f"| {s} | — | — | — | — | — | {d['note']} |")
            continue
        hv_q = d["hv_at"].get(quarter, (float("nan"),) * 3)
        hv_h = d["hv_at"].get(half, (float("nan"),) * 3)
        m, lo, hi = d["hv_final"]
        r_lo, r_hi = d["budget_to_tpe_final_iqr"]
        c_m, c_lo, c_hi = d["candidates"]
        print(f"| {s} | {hv_q[0]:.3f} ({hv_q[1]:.3f}–{hv_q[2]:.3f}) | {hv_h[0]:.3f} ({hv_h[1]:.3f}–{hv_h[2]:.3f}) | "
              f"{m:.3f} ({lo:.3f}–{hi:.3f}) | "
              f"{_fmt_budget(d['budget_to_tpe_final'])} ({_fmt_budget(r_lo)}–{_fmt_budget(r_hi)}; "
              f"{d['reached_share']:.0%}) | {c_m:.0f} ({c_lo:.0f}–{c_hi:.0f}) | {d['screened'][0]:.0f} |")
    if "tpe" in summary and "hv_final" in summary["tpe"]:
        base_c = summary["tpe"]["candidates"][0]
        print()
        for s, d in summary.items():
            if "hv_final" in d and s != "tpe":
                b = d["budget_to_tpe_final"]
                share = f"{b / args.budget:.0%} of the budget" if math.isfinite(b) else "not within the budget"
                print(f"- {s}: reaches full-box TPE's final HV (median) in {_fmt_budget(b)} boxes = {share}; "
                      f"{d['candidates'][0] / base_c:.2f}x TPE's candidates")
    for s, d in summary.items():
        if d.get("note"):
            print(f"\n{s}: {d['note']}")
    if "schedule" in result:
        sch = result["schedule"]
        print(f"\n### Schedule: rank correlation of rung accuracy with final val accuracy ({sch['n']} configs)\n")
        print("| schedule | final val mean | Spearman @1/9 | Spearman @1/3 | top-third overlap @1/9 | @1/3 |")
        print("|---|---|---|---|---|---|")
        for name in ("cosine", "wsd-rung"):
            r = sch[name]
            print(f"| {name} | {r['final_val_mean']:.4f} | {r['spearman_1/9']:.3f} | {r['spearman_1/3']:.3f} | "
                  f"{r['top_third_overlap_1/9']:.2f} | {r['top_third_overlap_1/3']:.2f} |")
    print(f"\n{meta['date']}, {meta['machine']}, {meta['wall_s']}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
