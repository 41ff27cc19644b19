"""Export folders and their model card: the one place both ``kdsearch export`` and ``kdsearch
finetune`` write a student folder.

A folder is written whole or not at all: :func:`staged_out_dir` hands out a hidden staging folder
beside the output (same file system), and renames it into place only when everything in it is
written; a previous kdsearch export there is replaced as a whole, and a folder with anyone else's
files is never touched (:func:`check_out_dir`).

The card is ``card.json`` (the machine-readable record; its ``files`` table holds the sha256 of
every model file, which :func:`kdsearch.checkpoint.load_student` checks) and ``README.md`` (the
same for humans, with the sha256 of every file in the folder). :func:`render_readme` knows the
two kinds of card: :data:`~kdsearch.constants.EXPORT_CARD_KIND` (a trial's student) and :data:`~kdsearch.constants.FINETUNE_CARD_KIND` (a student
fine-tuned: its head trained on new data after distillation, features frozen).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kdsearch.checkpoint import CARD_FILE, atomic_write_text, sha256_file
from kdsearch.constants import FINETUNE_CARD_KIND
from kdsearch.errors import ConfigError
from kdsearch.metrics import format_metric

__all__ = [
    "README_FILE",
    "check_out_dir",
    "staging_dir",
    "publish_dir",
    "staged_out_dir",
    "write_card",
    "render_readme",
]

README_FILE = "README.md"


# ----------------------------------------------------------------------------------------------
# Staging and publishing


def check_out_dir(out: Path, flag: str = "--out") -> None:
    """Refuse an output that exists and is not a previous kdsearch export (never clobber data)."""
    if out.exists():
        if not out.is_dir():
            raise ConfigError(flag, "must be a folder, and a file with that name exists", str(out))
        if any(out.iterdir()) and not (out / CARD_FILE).is_file():
            raise ConfigError(
                flag, "is a non-empty folder that is not a kdsearch export; it is not overwritten", str(out),
                "choose a new folder",
            )


def staging_dir(out: Path, flag: str = "--out") -> Path:
    """A fresh hidden folder beside ``out`` (same file system, so the final rename is atomic).

    A parent that cannot be created or written (``/proc/...``, a read-only mount, a file in the
    way) is a one-line ConfigError naming ``flag``.
    """
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise ConfigError(
            flag, f"cannot create the folder there ({exc.strerror or type(exc).__name__})", str(out),
            "choose a writable folder",
        ) from None


def publish_dir(staging: Path, out: Path, flag: str = "--out") -> None:
    """Move the finished ``staging`` folder to ``out``, replacing a previous export there.

    The old folder is renamed aside first and removed only after the new one is in place.
    """
    check_out_dir(out, flag)
    if out.exists():
        aside = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out, aside)
        try:
            os.rename(staging, out)
        except BaseException:
            os.rename(aside, out)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(staging, out)


@contextmanager
def staged_out_dir(out: Path, flag: str = "--out") -> Iterator[Path]:
    """Yield a staging folder for ``out``; publish it when the block ends, delete it if it raises."""
    check_out_dir(out, flag)
    stage = staging_dir(out, flag)
    try:
        yield stage
        publish_dir(stage, out, flag)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------
# The card


def write_card(folder: Path, card: dict[str, Any], files: dict[str, str]) -> dict[str, str]:
    """Write ``card.json`` (``card`` plus ``files``: model file name -> sha256) and ``README.md``
    into ``folder``; return the sha256 of every file, the card and README included."""
    card["files"] = dict(files)
    atomic_write_text(folder / CARD_FILE, json.dumps(card, indent=1, default=str) + "\n")
    all_files = dict(files)
    all_files[CARD_FILE] = sha256_file(folder / CARD_FILE)
    atomic_write_text(folder / README_FILE, render_readme(card, all_files))
    all_files[README_FILE] = sha256_file(folder / README_FILE)
    return all_files


def render_readme(card: dict[str, Any], files: dict[str, str]) -> str:
    """The README.md of a card of either kind; ``files`` maps file names to sha256."""
    if card.get("kind") == FINETUNE_CARD_KIND:
        return "\n".join(_finetune_lines(card) + _files_lines(files))
    lines = _export_lines(card)  # title, blank line, then the body
    return "\n".join(
        lines[:2] + _int8_warning_lines(card) + lines[2:] + _quantization_lines(card) + _files_lines(files)
        + _verification_lines(card)
    )


def _input_shape(card: dict[str, Any]) -> tuple[int, int]:
    """(channels, side px) from the card's ``input.shape`` (``["batch", C, R, R]``)."""
    shape = (card.get("input") or {}).get("shape") or ["batch", 3, 0, 0]
    return int(shape[1]), int(shape[2])


_LOAD_IT = [
    "## Load it",
    "",
    "```python\nimport kdsearch\nmodel = kdsearch.load_student(\"DIR\")  # torch.nn.Module in eval mode\n```",
    "",
]


def _files_lines(files: dict[str, str]) -> list[str]:
    return ["## Files", "", "| file | sha256 |", "|---|---|", *[f"| {k} | `{v}` |" for k, v in files.items()], ""]


def _load_snippet(fmt: str, chans: int, side: int) -> str:
    if fmt == "torchscript":
        return (
            "```python\nimport torch\nmodel = torch.jit.load(\"DIR/model.pt\")  # eval mode\n"
            f"logits = model(torch.randn(1, {chans}, {side}, {side}))\n```\n"
        )
    if fmt == "onnx":
        return (
            "```python\nimport numpy as np, onnxruntime as ort\n"
            "sess = ort.InferenceSession(\"DIR/model.onnx\", providers=[\"CPUExecutionProvider\"])\n"
            f"logits = sess.run(None, {{\"input\": np.zeros((4, {chans}, {side}, {side}), np.float32)}})[0]"
            "  # any batch size\n```\n"
        )
    return ""


def _metric_text(name: str, entry: dict[str, Any]) -> str:
    if entry.get("value") is None:
        return f"— ({entry.get('missing_reason', 'missing')})"
    return format_metric(name, entry["value"], unit=False)  # the unit has its own column


def _method_text(entry: dict[str, Any]) -> str:
    m = entry.get("method")
    if isinstance(m, dict):
        return str(m.get("method", "")) + (f" ({m.get('device')})" if m.get("device") else "")
    return str(m or "")


def _export_lines(card: dict[str, Any]) -> list[str]:
    chans, side = _input_shape(card)
    norm = card["input"].get("normalization")
    objectives = card.get("objectives") or {}
    dist = card.get("distillation") or {}
    return [
        f"# kdsearch student `{card['student']}`",
        "",
        f"Study `{card['study']}`, trial {card['trial_number']}, exported as **{card['format']}** by kdsearch "
        f"{card['kdsearch_version']}. Distilled from teacher **{card.get('teacher')}** on **{card.get('dataset')}**.",
        "",
        *_LOAD_IT,
        _load_snippet(card["format"], chans, side),
        f"Input: float32 `[batch, {chans}, {side}, {side}]`; {card['input']['preprocessing']}."
        + (
            f" mean = {norm['mean']}, std = {norm['std']}."
            if norm
            else " mean/std: the data set's statistics used during the search (not stored on the trial)."
        ),
        "",
        "## Student",
        "",
        "| field | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in card["spec"].items() if v is not None],
        "",
        "## Metrics",
        "",
        "| metric | value | unit | method |",
        "|---|---|---|---|",
        *[
            f"| {m}{' (objective: ' + objectives[m] + ')' if m in objectives else ''} "
            f"| {_metric_text(m, e)} | {e.get('unit') or ''} | {_method_text(e)} |"
            for m, e in card["metrics"].items()
        ],
        "",
        "Feasible under the study's constraints ("
        + (", ".join(f"{m} <= {format_metric(m, v)}" for m, v in (card.get("constraints") or {}).items()) or "none")
        + f"): {card['feasible']}.",
        "",
        "## Distillation",
        "",
        f"Teacher {card.get('teacher')} ({card.get('teacher_name')}); temperature "
        f"{dist.get('temperature')}, alpha {dist.get('alpha')}, lr {dist.get('lr')}; data set {card.get('dataset')}.",
        "",
        "## Environment",
        "",
        "```json",
        json.dumps(card.get("environment"), indent=1, sort_keys=True, default=str),
        "```",
        "",
    ]


def _int8_warning_lines(card: dict[str, Any]) -> list[str]:
    q = card.get("quantization")
    if not isinstance(q, dict) or not q.get("warning"):
        return []
    return [f"> **Warning (int8):** {q['warning']}.", ""]


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def _quantization_lines(card: dict[str, Any]) -> list[str]:
    """The int8 section of an export card (``kdsearch export --quantize int8``)."""
    q = card.get("quantization")
    if not isinstance(q, dict):
        return []
    acc, lat, cal, agree = q["accuracy"], q["latency_ms"], q["calibration"], q["top1_agreement"]
    m = q["latency_method"]
    rows = [
        f"| val accuracy | {_pct(acc['fp32']['val'])} | {_pct(acc['int8']['val'])} "
        f"| {0.0 - 100 * acc['drop']['val']:+.2f} points |",
        f"| test accuracy | {_pct(acc['fp32']['test'])} | {_pct(acc['int8']['test'])} "
        f"| {0.0 - 100 * acc['drop']['test']:+.2f} points |",
        *[
            f"| CPU latency, batch {b[1:]} (ms) | {lat['fp32'][b]:.4g} | {lat['int8'][b]:.4g} "
            f"| {lat['speedup'][b]:.2f}x speed-up |"
            for b in lat["fp32"]
        ],
        f"| file size (MB) | {q['size_mb']['fp32']:.4g} | {q['size_mb']['int8']:.4g} "
        f"| {q['size_mb']['fp32'] / q['size_mb']['int8']:.2f}x smaller |",
    ]
    return [
        "## int8 (ONNX Runtime static quantization)",
        "",
        f"`{q['file']}`: {q['tool']} (onnxruntime {q['onnxruntime_version']}), {q['format']} format, "
        f"activations {q['activations']}, weights {q['weights']}, reduce_range {q['reduce_range']} "
        f"({q['types_chosen_for']}). Calibration: {cal['method']} over {cal['images']} images of the "
        f"{cal['split']} split ({cal['sampling']}).",
        "",
        "| | fp32 (`model.onnx`) | int8 | change |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Accuracy through {acc['runtime']}, on the study's val ({q['data']['n_val']}) and test "
        f"({q['data']['n_test']}) images. Top-1 agreement of int8 with fp32 predictions (the round-trip "
        f"check; bit-level equality does not apply): val {_pct(agree['val'])}, test {_pct(agree['test'])}. "
        f"Latency: {m['method']}, {m['execution_provider']}, {m['intra_op_threads']} intra-op / "
        f"{m['inter_op_threads']} inter-op threads, graph optimisation {m['graph_optimization_level']}.",
        "",
        f"Val-accuracy drop limit {100 * q['max_val_drop']:.2f} points: "
        + ("within it." if q.get("within_limit") else "**exceeded** (see the warning at the top)."),
        "",
        "```python\nimport onnxruntime as ort\n"
        f"sess = ort.InferenceSession(\"DIR/{q['file']}\", providers=[\"CPUExecutionProvider\"])"
        "  # same input and output as model.onnx\n```",
        "",
    ]


def _verification_lines(card: dict[str, Any]) -> list[str]:
    v = card.get("verification")
    if not v:
        return []
    return [
        f"Verified after writing: max |output - PyTorch| = {v['max_abs_diff']:.3g} on a seeded "
        f"batch of {v['batch']} (tolerance {v['tolerance']:g}).",
        "",
    ]


def _finetune_lines(card: dict[str, Any]) -> list[str]:
    r, d, t = card["results"], card["data"], card["training"]
    src = card["source"]
    chans, side = _input_shape(card)
    return [
        f"# kdsearch student `{card['student']}`, fine-tuned (head trained after distillation, features frozen)",
        "",
        f"Fine-tuned by kdsearch {card['kdsearch_version']} from checkpoint sha256 `{src['sha256']}`"
        + (f" (study `{src.get('study')}`, trial {src.get('trial_number')})" if src.get("study") else "")
        + ".",
        "",
        *_LOAD_IT,
        "## Result (held-out images, never trained on)",
        "",
        "| | accuracy |",
        "|---|---|",
        f"| before | {format_metric('pre_ft_accuracy', r['pre_accuracy'])} |",
        f"| after | {format_metric('post_ft_accuracy', r['post_accuracy'])} |",
        f"| gain | {100 * r['gain']:+.2f} points |",
        "",
        f"Data: {d['source']}; {d['n_pool']} images, {d['n_holdout']} held out "
        f"({100 * d['holdout_fraction']:.0f}% of every class, seed {d['seed']}; indices sha256 "
        f"`{d['holdout_indices_sha256']}`), {d['n_train']} trained on.",
        "",
        f"Training: {t['trainable']} trained, everything else frozen; {t['optimizer']}; {t['epochs']} epochs, "
        f"lr {t['lr']}, batch {t['batch_size']}, {t['steps']} steps.",
        "",
        f"Input: `[batch, {chans}, {side}, {side}]`, normalised with "
        f"mean {d['normalization']['mean']}, std {d['normalization']['std']} ({d['normalization']['source']}).",
        "",
    ]
