"""Compare samplers by the hypervolume of what they found after N trials ("search beats grids").

Usage (the studies come from ``studies/paper/search-vs-grid.yaml``, see its header)::

    python studies/paper/compare_samplers.py --run-dir /tmp/paper-runs --n 6 \\
        --tpe search-tpe --random search-random --grid table2-capacity-resolution

prints one Markdown table: for each sampler after N trials (and random after 2N), the number of
COMPLETE trials, the best validation accuracy, the size of the Pareto front and its hypervolume.

How the hypervolume is computed (a small, stated computation, no private Optuna API):

* The trials counted "after N" are the first N trials of the study by trial number (FAIL
  trials count against the budget but add no point). Infeasible trials (``feasible`` user attr
  False) add no point either.
* Each objective is turned into a quantity to *minimise* on a scale where distances mean
  something: ``val_accuracy``/``test_accuracy`` (maximised) -> the error ``1 - accuracy``;
  ``macs``/``params`` (minimised, spanning orders of magnitude) -> ``log10(value)``; any other
  objective -> its value (negated when maximised).
* The reference point is fixed and stated, the same for every sampler: by default error 0.9
  (chance on 10 classes) and log10 MACs 9.0 (1 GMAC per image, above every student in the
  space); ``--ref`` overrides it. Points that do not dominate it add nothing.
* For two objectives the hypervolume is the exact area dominated by the points and bounded by
  the reference point (a sweep over the points sorted by the first objective). Optuna's public
  ``optuna.visualization.plot_hypervolume_history`` gives the same number on the raw objective
  scale (``tests/test_paper_studies.py`` checks that); it cannot apply the transforms above.

A seeded random sampler's first N trials are exactly the trials a random run of N would make,
so one random run of 2N trials gives both "random after N" and "random after 2N".
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

__all__ = [
    "DEFAULT_REFERENCE",
    "hypervolume_2d",
    "minimisation_point",
    "study_points",
    "pareto_points",
    "summarise",
]

# Reference point on the transformed (minimised) scale, per objective name.
DEFAULT_REFERENCE: dict[str, float] = {
    "val_accuracy": 0.9,  # error 0.9 = chance on 10 classes
    "test_accuracy": 0.9,
    "macs": 9.0,  # log10 MACs: 1 GMAC per image
    "params": 7.0,  # log10 params: 10 M
}
_ACCURACY = {"val_accuracy", "test_accuracy", "pre_ft_accuracy", "post_ft_accuracy"}
_LOG_SCALE = {"macs", "params"}


def minimisation_point(values: Sequence[float], names: Sequence[str], directions: Sequence[StudyDirection],
                       transform: bool = True) -> tuple[float, ...]:
    """One trial's objective values on the minimised scale described in the module docstring.

    With ``transform=False`` only the sign changes (maximised objectives are negated).
    """
    out = []
    for v, name, d in zip(values, names, directions, strict=True):
        v = float(v)
        if transform and name in _ACCURACY:
            out.append(1.0 - v)
        elif transform and name in _LOG_SCALE:
            out.append(math.log10(max(v, 1.0)))
        else:
            out.append(-v if d == StudyDirection.MAXIMIZE else v)
    return tuple(out)


def pareto_points(points: Sequence[tuple[float, ...]]) -> list[tuple[float, ...]]:
    """The non-dominated points (all objectives minimised), sorted, without duplicates."""
    uniq = sorted(set(points))
    front = []
    for p in uniq:
        dominated = any(all(q_i <= p_i for q_i, p_i in zip(q, p, strict=True)) and q != p for q in uniq)
        if not dominated:
            front.append(p)
    return front


def hypervolume_2d(points: Sequence[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Exact area dominated by ``points`` (both objectives minimised) and bounded by ``reference``."""
    inside = [p for p in points if p[0] < reference[0] and p[1] < reference[1]]
    area = 0.0
    best_y = reference[1]
    for x, y in sorted(inside):  # by the first objective, then the second
        if y < best_y:
            area += (reference[0] - x) * (best_y - y)
            best_y = y
    return area


def _trials(study: optuna.Study, n: int | None) -> list[FrozenTrial]:
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    return trials if n is None else trials[:n]


def study_points(study: optuna.Study, n: int | None = None, transform: bool = True) -> list[tuple[float, ...]]:
    """Points (minimised scale) of the feasible COMPLETE trials among the first ``n`` trials."""
    names = study.metric_names or [f"objective_{i}" for i in range(len(study.directions))]
    pts = []
    for t in _trials(study, n):
        if t.state != TrialState.COMPLETE or t.values is None:
            continue
        if t.user_attrs.get("feasible") is False:
            continue
        pts.append(minimisation_point(t.values, names, study.directions, transform))
    return pts


def summarise(study: optuna.Study, n: int | None, reference: tuple[float, float]) -> dict[str, object]:
    """Counts, best accuracy, Pareto front size and hypervolume of the first ``n`` trials."""
    if len(study.directions) != 2:
        raise SystemExit(f"{study.study_name}: the hypervolume here is for 2 objectives, got {len(study.directions)}")
    trials = _trials(study, n)
    pts = study_points(study, n)
    names = list(study.metric_names or [])
    acc = [t.user_attrs.get("val_accuracy") for t in trials if t.state == TrialState.COMPLETE]
    acc = [a for a in acc if isinstance(a, (int, float))]
    return {
        "study": study.study_name,
        "trials": len(trials),
        "complete": sum(t.state == TrialState.COMPLETE for t in trials),
        "best_val_accuracy": max(acc) if acc else None,
        "front": len(pareto_points(pts)),
        "hypervolume": hypervolume_2d(pts, reference),  # type: ignore[arg-type]
        "names": names,
    }


def _load(run_dir: Path, name: str) -> optuna.Study:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = run_dir / name / "journal.log"
    if not path.is_file():
        raise SystemExit(f"--run-dir: no study {name!r} (missing {path})")
    storage = JournalStorage(JournalFileBackend(str(path)))
    return optuna.load_study(study_name=name, storage=storage)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--n", type=int, required=True, help="trials per sampler (random is also shown at 2N)")
    ap.add_argument("--tpe", required=True, help="study name of the TPE run (>= N trials)")
    ap.add_argument("--random", required=True, help="study name of the random run (>= 2N trials)")
    ap.add_argument("--grid", help="optional: a grid study of the same setting, shown with all its trials")
    ap.add_argument("--ref", type=float, nargs=2, metavar=("REF1", "REF2"),
                    help="reference point on the minimised scale (default: per-objective, see docstring)")
    args = ap.parse_args(argv)

    tpe, rnd = _load(args.run_dir, args.tpe), _load(args.run_dir, args.random)
    names = list(tpe.metric_names or [])
    if list(rnd.metric_names or []) != names:
        raise SystemExit(f"--random: objectives {rnd.metric_names} differ from the TPE study's {names}")
    if args.ref:
        ref = (args.ref[0], args.ref[1])
    else:
        try:
            ref = (DEFAULT_REFERENCE[names[0]], DEFAULT_REFERENCE[names[1]])
        except (KeyError, IndexError):
            raise SystemExit(f"--ref: no default reference point for objectives {names}; pass --ref") from None
    rows = [("tpe", args.n, summarise(tpe, args.n, ref)),
            ("random", args.n, summarise(rnd, args.n, ref)),
            ("random", 2 * args.n, summarise(rnd, 2 * args.n, ref))]
    if args.grid:
        grid = _load(args.run_dir, args.grid)
        if list(grid.metric_names or []) != names:
            raise SystemExit(f"--grid: objectives {grid.metric_names} differ from {names}")
        rows.append(("grid", len(grid.trials), summarise(grid, None, ref)))
    scale = ["error (1 - acc)" if n in _ACCURACY else ("log10 " + n if n in _LOG_SCALE else n) for n in names]
    print(f"Hypervolume of ({scale[0]}, {scale[1]}), both minimised, reference point {ref}")
    print()
    print("| sampler | after N trials | study | COMPLETE | best val_accuracy | Pareto points | hypervolume |")
    print("|---|---|---|---|---|---|---|")
    for sampler, n, s in rows:
        best = s["best_val_accuracy"]
        best_s = f"{100 * best:.2f}%" if isinstance(best, float) else "—"
        print(f"| {sampler} | {n} | {s['study']} | {s['complete']}/{s['trials']} | {best_s} | {s['front']} | "
              f"{s['hypervolume']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
