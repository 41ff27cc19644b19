"""``kdsearch optimize``: run or resume a study from its study file, then print its Pareto front."""

from __future__ import annotations

import argparse

from kdsearch.commands import COMMAND_HELP
from kdsearch.commands.arguments import integer, positive_int

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (a third of a --help)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["EXIT_ALL_FAILED", "add_parser", "run", "run_supervised"]

EXIT_ALL_FAILED = 3
"""Exit code of a run that ended with no COMPLETE and no PRUNED trial and at least one FAIL (the
search ran, but gave nothing to use: a script or a scheduler must not read it as a good run).
2 stays bad input (nothing ran) and 130 an interrupt (which wins over this code)."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    o = subparsers.add_parser("optimize", help=COMMAND_HELP["optimize"])
    o.add_argument("--config", required=True, help="study file (YAML) or a bundled study's name (kdsearch studies lists them), e.g. cifar10-deit")
    o.add_argument("--budget", help="wall-clock budget of this run: 90s, 30m, 24h")
    o.add_argument("--trial-time", help="KD time box per trial: 60s, 5m; a comma list is searched per trial: 2m,5m,10m")
    o.add_argument("--storage", help="storage URL: journal:PATH, sqlite:///PATH, postgresql://...")
    o.add_argument("--study-name", help="override study.name")
    o.add_argument("--n-trials", type=positive_int("--n-trials"), help="cap the trials of this run")
    o.add_argument("--run-dir", help="run folder (storage, artifacts, caches)")
    o.add_argument("--sampler", help="tpe, tpe-impute, tpe-bohb, nsga2, nsga3, random, grid or gp")
    o.add_argument("--seed", type=integer("--seed"), help="sampler and training seed")
    o.add_argument("--workers", type=positive_int("--workers"), help="worker processes (default: one per GPU, else 1)")
    o.add_argument("--cache-dir", help="shared teacher-cache folder")
    o.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override any study-file key (repeatable)")
    o.add_argument("--plain", action="store_true", help="plain log lines instead of the live display")
    o.set_defaults(run=run)
    return o


def run(args: argparse.Namespace) -> int:
    from kdsearch.config import load_config
    from kdsearch.storage import check_study_name

    if args.study_name is not None:
        check_study_name(args.study_name)
    sets = list(args.set or [])
    if args.cache_dir:
        sets.append(f"teacher.cache.dir={args.cache_dir}")
    cfg = load_config(
        args.config,
        sets,
        budget=args.budget,
        trial_time=args.trial_time,
        storage=args.storage,
        study_name=args.study_name,
        n_trials=args.n_trials,
        run_dir=args.run_dir,
        sampler=args.sampler,
        seed=args.seed,
        workers=args.workers,
    )
    return run_supervised(cfg, plain=args.plain, create=True)


def _fit_words(fit: Any) -> str:
    """``"; fitted: target val accuracy reached after 21.0 epochs (38 s)"`` from a teacher's
    fit info (:func:`kdsearch.distill.fit_teacher`), or ``""`` when it was not fitted."""
    if not isinstance(fit, dict) or "fit_time_s" not in fit:
        return ""
    why = {
        "target_accuracy": "target val accuracy reached",
        "max_epochs": "max_epochs done",
        "time_cap": "stopped by its time cap",
        "time": "time box",
    }.get(str(fit.get("stop_reason", "time")), str(fit.get("stop_reason")))
    cached = ", the stored fit reused" if fit.get("from_cache") else ""
    return f"; fitted: {why} after {float(fit.get('epochs', 0.0)):.1f} epochs ({float(fit['fit_time_s']):.0f} s{cached})"


def _cache_words(label: str, cache: Any) -> str:
    """``"teacher cache ViT: reused <key> (built by study a in 12 s), loaded in 0.4 s"`` or
    ``"... built <key> in 12 s"`` from :meth:`kdsearch.distill.TeacherCache.describe`."""
    if not isinstance(cache, dict) or not cache.get("key"):
        return ""
    key = str(cache["key"])[:16]
    size = f"{float(cache.get('nbytes') or 0) / 1e6:.1f} MB"
    if cache.get("built"):
        return f"teacher cache {label}: built {key} ({size}) in {float(cache.get('build_time_s') or 0):.1f} s"
    by = f" by study {cache['built_by']}" if cache.get("built_by") else ""
    return (f"teacher cache {label}: reused {key} ({size}, built{by} in {float(cache.get('build_time_s') or 0):.1f} s), "
            f"loaded in {float(cache.get('elapsed_s') or 0):.1f} s")


def run_supervised(cfg: Any, *, plain: bool, create: bool) -> int:
    """Run ``cfg``'s study under the supervisor with the live display; print the outcome and the
    front. Returns 130 when interrupted, :data:`EXIT_ALL_FAILED` when this run's trials all
    failed (none COMPLETE or PRUNED, at least one FAIL), else 0. ``create=False`` only joins an
    existing study."""
    import sys

    from kdsearch import trial_record as tr
    from kdsearch.commands.output import stdout_console
    from kdsearch.config import format_duration
    from kdsearch.progress import SearchDisplay
    from kdsearch.report.trials_table import PARETO_FOOTNOTE, leak_warnings, trials_table
    from kdsearch.search.supervisor import StopFlag, supervise

    console = stdout_console()
    stop = StopFlag()
    restore = stop.install_sigint()
    display = SearchDisplay(cfg, console, live=False if plain else None)

    def ready(outcome: Any, teachers: dict[str, Any]) -> None:
        verb = "resuming" if outcome.resumed else "created"
        display.note(
            f"{verb} study {cfg.study.name} ({outcome.trials_before} trials stored); objectives: "
            + ", ".join(f"{m} ({d})" for m, d in cfg.objectives.items())
        )
        if "kd_time_s" in cfg.objectives and not cfg.study.box_searched and not cfg.distill.early_stop.enabled:
            display.note(
                "note: kd_time_s is an objective, but every trial trains for the same box (one study.trial_time, "
                "distill.early_stop off), so it cannot separate students; list several boxes to search it, "
                "e.g. --trial-time 2m,5m,10m"
            )
        if outcome.stale_recovered:
            display.note(f"recovered stale trials {outcome.stale_recovered} (FAIL stale, params re-queued)")
        for label, t in teachers.items():
            display.note(
                f"teacher {label}: val {100 * t['val_accuracy']:.2f}%, test {100 * t['test_accuracy']:.2f}% "
                f"at {t['input_size']}px ({t['mode']} logits)"
                + (f", {t['interpolation']}, mean {t['mean']} std {t['std']} from {t['norm_source']}" if "mean" in t else "")
                + _fit_words(t.get("fit"))
            )
            cache_line = _cache_words(label, t.get("cache"))
            if cache_line:
                display.note(cache_line)
            leak = t.get("val_leak")
            if isinstance(leak, dict) and leak.get("suspected") and leak.get("message"):
                display.note(f"warning: {leak['message']}")

    try:
        with display:
            outcome = supervise(cfg, stop=stop, progress=display.progress, on_ready=ready,
                                on_trial_end=display.trial_end, create=create, on_note=display.note)
    finally:
        restore()
    total = outcome.study.user_attrs.get(tr.TIME_SPENT_S, 0.0)
    console.print(
        f"stopped: {outcome.stop_reason}. This run: {outcome.trials_complete} complete, "
        f"{outcome.trials_pruned} pruned, {outcome.trials_failed} failed "
        f"in {format_duration(outcome.wall_s)}; study total {len(outcome.study.trials)} trials, "
        f"{format_duration(total)} over all runs.",
        highlight=False,
    )
    if outcome.kept_logs:
        console.print(f"logs of workers with failed trials (kept): {', '.join(outcome.kept_logs)}",
                      highlight=False, markup=False)
    console.print(trials_table(outcome.study, pareto=True))
    console.print(PARETO_FOOTNOTE)
    for warning in leak_warnings(outcome.study):
        console.print(f"warning: {warning}", highlight=False, markup=False)
    if outcome.stop_reason.startswith("interrupted"):
        return 130
    if outcome.trials_failed > 0 and outcome.trials_complete == 0 and outcome.trials_pruned == 0:
        print(
            f"error: every trial of this run failed ({outcome.trials_failed}), none complete or pruned; "
            f"exit code {EXIT_ALL_FAILED}. `kdsearch trials --study-name {cfg.study.name}` shows why.",
            file=sys.stderr, flush=True,
        )
        return EXIT_ALL_FAILED
    return 0
