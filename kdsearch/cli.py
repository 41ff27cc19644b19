"""The ``kdsearch`` command line: the only place that prints for humans or calls sys.exit.

Every user mistake is a :class:`~kdsearch.errors.KDSearchError`: one line on stderr, exit code 2,
and a traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kdsearch._version import __version__
from kdsearch.errors import ConfigError, KDSearchError

__all__ = ["main", "build_parser"]

DEFAULT_RUN_DIR = "runs"


# ------------------------------------------------------------------------------------------------
# Argument helpers


def _add_storage_args(p: argparse.ArgumentParser, *, required_name: bool = True) -> None:
    p.add_argument("--study-name", required=required_name, help="the study to read")
    p.add_argument("--storage", help="storage URL (default: the journal file in --run-dir/<study>/)")
    p.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help=f"run folder (default: {DEFAULT_RUN_DIR})")


def _storage_url(args: argparse.Namespace) -> str:
    from kdsearch.storage import default_storage_url

    if args.storage:
        from kdsearch.config import validate_storage_url

        try:
            validate_storage_url(args.storage)
        except ConfigError as exc:
            raise ConfigError("--storage", exc.rule, args.storage) from None
        return str(args.storage)
    return default_storage_url(args.run_dir, args.study_name)


def _artifact_dir(args: argparse.Namespace, study: Any = None) -> Path:
    from kdsearch.storage import run_paths

    return run_paths(args.run_dir, args.study_name).artifacts


def _check_study_name(name: str) -> None:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", name or ""):
        raise ConfigError("--study-name", "must be 1-128 letters, digits, '_', '.' or '-'", name)


# ------------------------------------------------------------------------------------------------
# Commands


def cmd_optimize(args: argparse.Namespace, console: Console) -> int:
    from kdsearch.config import apply_overrides, load_config

    cfg = load_config(args.config)
    if args.study_name is not None:
        _check_study_name(args.study_name)
    sets = list(args.set or [])
    if args.cache_dir:
        sets.append(f"teacher.cache.dir={args.cache_dir}")
    cfg = apply_overrides(
        cfg,
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
    return _run_supervised(cfg, console, plain=args.plain, create=True)


def _run_supervised(cfg: Any, console: Console, *, plain: bool, create: bool) -> int:
    from kdsearch.config import format_duration
    from kdsearch.progress import SearchDisplay
    from kdsearch.search.supervisor import StopFlag, supervise

    stop = StopFlag()
    restore = stop.install_sigint()
    display = SearchDisplay(cfg, console, live=False if plain else None)

    def ready(outcome: Any, teachers: dict[str, Any]) -> None:
        verb = "resuming" if outcome.resumed else "created"
        display.note(
            f"{verb} study {cfg.study.name} ({outcome.trials_before} trials stored); objectives: "
            + ", ".join(f"{m} ({d})" for m, d in cfg.objectives.items())
        )
        if outcome.stale_recovered:
            display.note(f"recovered stale trials {outcome.stale_recovered} (FAIL stale, params re-queued)")
        for label, t in teachers.items():
            display.note(
                f"teacher {label}: val {100 * t['val_accuracy']:.2f}%, test {100 * t['test_accuracy']:.2f}% "
                f"at {t['input_size']}px ({t['mode']} logits)"
            )

    try:
        with display:
            outcome = supervise(cfg, stop=stop, progress=display.progress, on_ready=ready,
                                on_trial_end=display.trial_end, create=create)
    finally:
        restore()
    total = outcome.study.user_attrs.get("time_spent_s", 0.0)
    console.print(
        f"stopped: {outcome.stop_reason}. This run: {outcome.trials_complete} complete, {outcome.trials_failed} failed "
        f"in {format_duration(outcome.wall_s)}; study total {len(outcome.study.trials)} trials, "
        f"{format_duration(total)} over all runs.",
        highlight=False,
    )
    _print_trials(console, outcome.study, pareto=True)
    return 130 if outcome.stop_reason.startswith("interrupted") else 0


def _trial_rows(study: Any, pareto: bool) -> tuple[list[Any], set[int]]:
    import optuna

    from kdsearch.report.pareto import feasible, pareto_front

    trials = study.get_trials(deepcopy=False)
    front = {t.number for t in pareto_front(study, feasible_only=True)}
    if pareto:
        trials = [t for t in trials if t.number in front or (t.state == optuna.trial.TrialState.COMPLETE and not feasible(t))]
    return trials, front


def _print_trials(console: Console, study: Any, pareto: bool) -> None:
    from kdsearch.metrics import format_metric
    from kdsearch.report.pareto import feasible

    trials, front = _trial_rows(study, pareto)
    names = study.metric_names or [f"value{i}" for i in range(len(study.directions))]
    table = Table(title=f"{study.study_name}: {'Pareto front (feasible)' if pareto else 'all trials'}")
    extra = [] if "kd_time_s" in names else ["kd_time_s"]
    for col in ["#", "state", "student", "teacher", *names, *extra, "front"]:
        table.add_column(col, justify="right" if col not in ("state", "student", "teacher") else "left")
    for t in trials:
        ua = t.user_attrs
        vals = [format_metric(m, v) for m, v in zip(names, t.values, strict=True)] if t.values else ["—"] * len(names)
        state = t.state.name
        if state == "COMPLETE" and not feasible(t):
            state = "INFEASIBLE"
        elif state == "FAIL":
            state = f"FAIL ({ua.get('fail_reason', '?')})"
        mark = "*" if t.number in front else ""
        kd = [format_metric("kd_time_s", ua.get("kd_time_s"))] if extra else []
        table.add_row(str(t.number), state, str(ua.get("student", "")), str(ua.get("teacher", "")), *vals, *kd, mark)
    console.print(table)
    if pareto:
        console.print("* = on the feasible Pareto front; INFEASIBLE rows break a constraint and are not on it.")


def cmd_trials(args: argparse.Namespace, console: Console) -> int:
    from kdsearch.storage import load_study

    _check_study_name(args.study_name)
    study = load_study(_storage_url(args), args.study_name)
    if args.json:
        trials, front = _trial_rows(study, args.pareto)
        from kdsearch.report.pareto import feasible

        out = [
            {
                "number": t.number,
                "state": t.state.name,
                "params": t.params,
                "values": t.values,
                "user_attrs": t.user_attrs,
                "constraints": t.constraints,
                "feasible": feasible(t) if t.state.name == "COMPLETE" else None,
                "pareto": t.number in front,
            }
            for t in trials
        ]
        sys.stdout.write(json.dumps(out, indent=1, default=_json_default) + "\n")
        return 0
    _print_trials(console, study, args.pareto)
    return 0


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return str(obj)


def cmd_export(args: argparse.Namespace, console: Console) -> int:
    from kdsearch.export import export_trial

    _check_study_name(args.study_name)
    if (args.trial is None) == (args.pick is None):
        raise ConfigError("--trial/--pick", "give exactly one of --trial K or --pick RULE", None)
    result = export_trial(
        storage_url=_storage_url(args),
        study_name=args.study_name,
        trial_number=args.trial,
        pick=args.pick,
        out_dir=Path(args.out),
        fmt=args.format,
        artifact_dir=_artifact_dir(args),
    )
    console.print(f"exported trial {result.trial_number} as {args.format} to {result.out_dir}", highlight=False)
    for name, sha in result.files.items():
        console.print(f"  {name}  sha256 {sha}", highlight=False)
    if result.max_abs_diff is not None:
        console.print(f"  verified: max |diff| vs PyTorch = {result.max_abs_diff:.3g}", highlight=False)
    return 0


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    from kdsearch.report import build_report

    _check_study_name(args.study_name)
    out = Path(args.out or f"{args.run_dir}/{args.study_name}/report.html")
    path = build_report(
        storage_url=_storage_url(args), study_name=args.study_name, out_path=out,
        artifact_dir=_artifact_dir(args), png_dir=Path(args.png) if args.png else None,
    )
    console.print(f"wrote {path}", highlight=False)
    return 0


def cmd_dashboard(args: argparse.Namespace, console: Console) -> int:
    from kdsearch.dashboard import start_dashboard
    from kdsearch.storage import load_study

    _check_study_name(args.study_name)
    url = _storage_url(args)
    load_study(url, args.study_name)  # one-line error if it does not exist
    handle = start_dashboard(url, _artifact_dir(args), host=args.host, port=args.port)
    for warning in getattr(handle, "warnings", []):
        console.print(f"warning: {warning}", highlight=False)
    console.print(f"optuna-dashboard for {args.study_name}: {handle.url}  (Ctrl-C to stop)", highlight=False)
    try:
        handle.wait()
    except KeyboardInterrupt:
        pass
    finally:
        handle.stop()
    return 0


def cmd_finetune(args: argparse.Namespace, console: Console) -> int:
    from kdsearch.finetune import finetune_checkpoint

    res = finetune_checkpoint(
        checkpoint_dir=Path(args.checkpoint), data_spec=args.data, out_dir=Path(args.out),
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, holdout_fraction=args.holdout_fraction,
        unfreeze_last_block=args.unfreeze_last_block, seed=args.seed, device=args.device,
    )
    console.print(
        f"fine-tuned {args.checkpoint} for {args.epochs} epochs: held-out accuracy "
        f"{100 * res.pre_accuracy:.2f}% -> {100 * res.post_accuracy:.2f}%; wrote {res.out_dir}",
        highlight=False,
    )
    return 0


def cmd_table(args: argparse.Namespace, console: Console) -> int:
    from kdsearch.report.table import pivot_table, render_csv, render_markdown
    from kdsearch.storage import load_study

    _check_study_name(args.study_name)
    study = load_study(_storage_url(args), args.study_name)
    table = pivot_table(study, rows=args.rows, cols=args.cols, metric=args.metric, agg=args.agg)
    if args.format in ("markdown", "both"):
        sys.stdout.write(render_markdown(table) + "\n")
    if args.format == "both":
        sys.stdout.write("\n")
    if args.format in ("csv", "both"):
        sys.stdout.write(render_csv(table))
    return 0


def cmd_env(args: argparse.Namespace, console: Console) -> int:
    import torch

    from kdsearch.measure import collect_environment

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    env = collect_environment(device)
    if args.json:
        sys.stdout.write(json.dumps(env, indent=1, default=str) + "\n")
        return 0
    table = Table(title=f"kdsearch {__version__} environment", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in _flatten(env):
        table.add_row(key, str(value))
    console.print(table)
    return 0


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.extend(_flatten(v, key + "."))
        else:
            out.append((key, v))
    return out


# ------------------------------------------------------------------------------------------------
# Parser


class _Parser(argparse.ArgumentParser):
    """argparse that raises a one-line ConfigError (exit 2) instead of printing usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(self.prog, message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kdsearch", description="Search for the best small CNN student to distil from a large teacher.")
    p.add_argument("--version", action="version", version=f"kdsearch {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    o = sub.add_parser("optimize", help="run or resume a study")
    o.add_argument("--config", required=True, help="study file (YAML), e.g. studies/cifar10-deit.yaml")
    o.add_argument("--budget", help="wall-clock budget of this run: 90s, 30m, 24h")
    o.add_argument("--trial-time", help="KD time box per trial: 60s, 5m")
    o.add_argument("--storage", help="storage URL: journal:PATH, sqlite:///PATH, postgresql://...")
    o.add_argument("--study-name", help="override study.name")
    o.add_argument("--n-trials", type=_positive_int("--n-trials"), help="cap the trials of this run")
    o.add_argument("--run-dir", help="run folder (storage, artifacts, caches)")
    o.add_argument("--sampler", help="tpe, nsga2, nsga3, random, grid or gp")
    o.add_argument("--seed", type=_int("--seed"), help="sampler and training seed")
    o.add_argument("--workers", type=_positive_int("--workers"), help="worker processes (default: one per GPU, else 1)")
    o.add_argument("--cache-dir", help="shared teacher-cache folder")
    o.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override any study-file key (repeatable)")
    o.add_argument("--plain", action="store_true", help="plain log lines instead of the live display")
    o.set_defaults(func=cmd_optimize)

    t = sub.add_parser("trials", help="list a study's trials (or its Pareto front)")
    _add_storage_args(t)
    t.add_argument("--pareto", action="store_true", help="only the feasible Pareto front (infeasible marked)")
    t.add_argument("--json", action="store_true", help="print JSON: number, state, params, values, user_attrs")
    t.set_defaults(func=cmd_trials)

    e = sub.add_parser("export", help="export a trial's student (safetensors, torchscript, onnx)")
    _add_storage_args(e)
    e.add_argument("--trial", type=_int("--trial"), help="trial number")
    e.add_argument("--pick", help='selection rule, e.g. "max val_accuracy where latency_ms_b1 <= 2"')
    e.add_argument("--format", choices=["safetensors", "torchscript", "onnx"], default="safetensors")
    e.add_argument("--out", required=True, help="output folder")
    e.set_defaults(func=cmd_export)

    r = sub.add_parser("report", help="write a self-contained HTML report")
    _add_storage_args(r)
    r.add_argument("--out", help="HTML file (default: <run-dir>/<study>/report.html)")
    r.add_argument("--png", help="also write static PNG figures here (needs kaleido)")
    r.set_defaults(func=cmd_report)

    d = sub.add_parser("dashboard", help="start optuna-dashboard on the study")
    _add_storage_args(d)
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=_positive_int("--port"), default=8080)
    d.set_defaults(func=cmd_dashboard)

    f = sub.add_parser("finetune", help="facet 4: fine-tune an exported student's head on local data")
    f.add_argument("--checkpoint", required=True, help="an exported student folder")
    f.add_argument("--data", required=True, help="imagefolder:PATH, digits or synthetic")
    f.add_argument("--out", required=True, help="output folder for the fine-tuned student")
    f.add_argument("--epochs", type=_positive_int("--epochs"), default=15)
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--batch-size", type=_positive_int("--batch-size"), default=128)
    f.add_argument("--holdout-fraction", type=float, default=0.2)
    f.add_argument("--unfreeze-last-block", action="store_true")
    f.add_argument("--seed", type=_int("--seed"), default=0)
    f.add_argument("--device", default="cuda" if _cuda() else "cpu")
    f.set_defaults(func=cmd_finetune)

    tb = sub.add_parser("table", help="a paper-style pivot table from storage (Markdown and CSV)")
    _add_storage_args(tb)
    tb.add_argument("--rows", required=True, help="row key: a param or user attr (e.g. teacher, family, vgg_depth)")
    tb.add_argument("--cols", required=True, help="column key (e.g. resolution)")
    tb.add_argument("--metric", required=True, help="cell value (e.g. val_accuracy, kd_time_s, macs)")
    tb.add_argument("--agg", choices=["max", "min", "mean", "median"], default="max")
    tb.add_argument("--format", choices=["markdown", "csv", "both"], default="both")
    tb.set_defaults(func=cmd_table)

    v = sub.add_parser("env", help="versions, devices and NVML status for bug reports")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_env)

    w = sub.add_parser("worker", help="join an existing study from this host")
    _add_storage_args(w)
    w.add_argument("--budget", help="wall-clock budget of this worker")
    w.add_argument("--n-trials", type=_positive_int("--n-trials"))
    w.add_argument("--workers", type=_positive_int("--workers"), help="worker processes on this host")
    w.add_argument("--plain", action="store_true")
    w.set_defaults(func=cmd_worker)
    return p


def cmd_worker(args: argparse.Namespace, console: Console) -> int:
    """Join an existing study (usually on RDB storage) from this host with the stored config."""
    from kdsearch.config import config_from_dict, parse_duration
    from kdsearch.storage import load_study

    _check_study_name(args.study_name)
    url = _storage_url(args)
    stored = load_study(url, args.study_name).user_attrs.get("config")
    if not stored:
        raise ConfigError("--study-name", "this study has no stored kdsearch config", args.study_name)
    stored["study"]["storage"] = url
    stored["study"]["run_dir"] = args.run_dir
    if args.budget:
        stored["study"]["budget"] = parse_duration(args.budget, "--budget")
    if args.n_trials:
        stored["study"]["n_trials"] = args.n_trials
    if args.workers:
        stored["study"]["workers"] = args.workers
    cfg = config_from_dict(stored)
    return _run_supervised(cfg, console, plain=args.plain, create=False)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def _int(flag: str) -> Callable[[str], int]:
    def conv(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(flag, "must be an integer", text) from None

    return conv


def _positive_int(flag: str) -> Callable[[str], int]:
    def conv(text: str) -> int:
        v = _int(flag)(text)
        if v < 1:
            raise ConfigError(flag, "must be >= 1", text)
        return v

    return conv


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console(stderr=False, highlight=False, soft_wrap=True)
    if not console.is_terminal:
        # Logs and pipes: wide enough that result tables are not folded into narrow columns.
        console = Console(stderr=False, highlight=False, soft_wrap=True, width=160)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args, console) or 0)
    except KDSearchError as exc:
        if debug:
            err.print_exception()
        err.print(f"error: {exc}", markup=False, highlight=False)
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
