"""Ship a trial's student: safetensors + model card, TorchScript, or ONNX; and ``load_student``.

:func:`export_trial` reads the study storage only. It downloads the trial's checkpoint artifact,
refuses it when its sha256 differs from the trial's ``weights_sha256``, rebuilds the student
(:func:`kdsearch.checkpoint.load_student_file`), writes the requested format into a staging
folder beside ``out_dir``, **verifies** it (reloads it and compares its outputs with the PyTorch
model on a fixed seeded batch: max |diff| <= :data:`TOLERANCE`, else :class:`ExportError`), and
only then renames the folder into place: a failed export never leaves a half-written folder.

Every export folder holds ``model.safetensors`` (the checkpoint itself, so ``kdsearch finetune``
and :func:`load_student` work on any export), ``card.json`` and ``README.md`` (the model card:
spec, every metric with unit and method, teacher, dataset, environment, KD temperature/alpha,
the sha256 of every file, the verification result and how to load it), plus ``model.pt``
(TorchScript, traced at the spec resolution) or ``model.onnx`` (dynamic batch dimension,
opset :data:`ONNX_OPSET`, input ``input`` / output ``logits``) for those formats.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from kdsearch._version import __version__
from kdsearch.checkpoint import atomic_write_text, load_student_file, sha256_file
from kdsearch.metrics import metric_unit
from kdsearch.errors import CheckpointError, ConfigError, ExportError
from kdsearch.models.spec import StudentSpec

__all__ = [
    "ExportResult",
    "FORMATS",
    "TOLERANCE",
    "ONNX_OPSET",
    "export_trial",
    "load_student",
    "load_student_with_card",
    "select_trial",
    "publish_dir",
    "staging_dir",
]

FORMATS = ("safetensors", "torchscript", "onnx")
TOLERANCE = 1e-4  # max |output difference| allowed between an export and the PyTorch model
ONNX_OPSET = 18
VERIFY_SEED = 0
VERIFY_BATCH = 3  # > 1 and != the tracing batch, so the ONNX dynamic batch dimension is exercised
MODEL_FILES = {"safetensors": "model.safetensors", "torchscript": "model.pt", "onnx": "model.onnx"}


@dataclass
class ExportResult:
    """What :func:`export_trial` wrote: ``files`` maps each file name to its sha256."""

    trial_number: int
    out_dir: Path
    fmt: str
    files: dict[str, str]
    max_abs_diff: float | None
    card: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Staging and publishing (shared with kdsearch.finetune)


def _check_out_dir(out: Path, flag: str = "--out") -> None:
    """Refuse an output that exists and is not a previous kdsearch export (never clobber data)."""
    if out.exists():
        if not out.is_dir():
            raise ConfigError(flag, "must be a folder, and a file with that name exists", str(out))
        if any(out.iterdir()) and not (out / "card.json").is_file():
            raise ConfigError(
                flag, "is a non-empty folder that is not a kdsearch export; it is not overwritten", str(out),
                "choose a new folder",
            )


def staging_dir(out: Path) -> Path:
    """A fresh hidden folder beside ``out`` (same file system, so the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def publish_dir(staging: Path, out: Path) -> None:
    """Move the finished ``staging`` folder to ``out``, replacing a previous export there.

    The old folder is renamed aside first and removed only after the new one is in place.
    """
    _check_out_dir(out)
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


# ----------------------------------------------------------------------------------------------
# Choosing the trial


def _ranges(numbers: list[int]) -> str:
    """``[0, 1, 2, 4, 7, 8]`` -> ``"0-2, 4, 7-8"``."""
    if not numbers:
        return "none"
    out: list[str] = []
    start = prev = numbers[0]
    for n in numbers[1:] + [None]:  # type: ignore[list-item]
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(out)


def select_trial(study: optuna.Study, trial_number: int | None, pick: str | None) -> FrozenTrial:
    """The COMPLETE trial named by ``trial_number`` or selected by the ``pick`` rule."""
    if (trial_number is None) == (pick is None):
        raise ConfigError("--trial/--pick", "give exactly one of --trial K or --pick RULE", None)
    if pick is not None:
        from kdsearch.report.pareto import pick_trial

        return pick_trial(study, pick)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    complete = sorted(n for n, t in trials.items() if t.state == TrialState.COMPLETE)
    t = trials.get(int(trial_number))  # type: ignore[arg-type]
    if t is None or t.state != TrialState.COMPLETE:
        what = "does not exist" if t is None else f"is {t.state.name}"
        raise ConfigError(
            "--trial",
            f"must be a COMPLETE trial of study {study.study_name!r}; trial {trial_number} {what}",
            trial_number,
            f"COMPLETE trials: {_ranges(complete)}",
        )
    return t


def _download_checkpoint(trial: FrozenTrial, artifact_dir: Path | None, dest: Path) -> None:
    from optuna.artifacts import FileSystemArtifactStore, download_artifact
    from optuna.artifacts.exceptions import ArtifactNotFound

    aid = trial.user_attrs.get("artifact_id")
    if not aid:
        raise ExportError(f"trial {trial.number}: no stored checkpoint (user attr 'artifact_id' is missing)")
    if artifact_dir is None or not Path(artifact_dir).is_dir():
        raise ExportError(
            f"artifact_dir: the study's artifact folder is missing (got {str(artifact_dir)!r}); "
            "pass the run folder the study was run in (--run-dir)"
        )
    try:
        download_artifact(
            artifact_store=FileSystemArtifactStore(str(artifact_dir)), file_path=str(dest), artifact_id=str(aid)
        )
    except (ArtifactNotFound, FileNotFoundError):
        raise ExportError(
            f"trial {trial.number}: checkpoint artifact {aid!r} is not in {str(artifact_dir)!r}; "
            "was the run folder moved or cleaned?"
        ) from None


# ----------------------------------------------------------------------------------------------
# Verification


def _verify_batch(spec: StudentSpec, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(VERIFY_SEED)
    return torch.randn(n, spec.in_chans, spec.resolution, spec.resolution, generator=g)


@torch.no_grad()
def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).float()


def _check_diff(fmt: str, diff: float) -> float:
    if not diff <= TOLERANCE:  # also catches NaN
        raise ExportError(
            f"--format {fmt}: the exported model's outputs differ from PyTorch by {diff:.3g} "
            f"(max allowed {TOLERANCE:g}); the export was not written"
        )
    return diff


def _write_torchscript(model: nn.Module, spec: StudentSpec, path: Path) -> float:
    example = _verify_batch(spec, 2)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # trace deprecation and tracer notes; verified below
        traced = torch.jit.trace(model, example)
        traced.save(str(path))
        loaded = torch.jit.load(str(path), map_location="cpu").eval()
        x = _verify_batch(spec, VERIFY_BATCH)
        diff = float((loaded(x).float() - _reference(model, x)).abs().max())
    return _check_diff("torchscript", diff)


def _write_onnx(model: nn.Module, spec: StudentSpec, path: Path) -> float:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError(
            "--format onnx: needs onnx, onnxscript and onnxruntime; pip install 'kdsearch[export]'"
        ) from None
    example = _verify_batch(spec, 2)
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=({0: batch},),
                opset_version=ONNX_OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    except ImportError as exc:
        raise ExportError(f"--format onnx: {exc.name or exc} is not installed; pip install 'kdsearch[export]'") from None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shape = sess.get_inputs()[0].shape
    if isinstance(shape[0], int):
        raise ExportError(f"--format onnx: the batch dimension came out fixed ({shape}); expected a dynamic one")
    x = _verify_batch(spec, VERIFY_BATCH)
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    diff = float((torch.from_numpy(out).float() - _reference(model, x)).abs().max())
    return _check_diff("onnx", diff)


def _verify_safetensors(model: nn.Module, spec: StudentSpec, folder: Path) -> float:
    reloaded = load_student(folder)
    x = _verify_batch(spec, VERIFY_BATCH)
    diff = float((_reference(reloaded, x) - _reference(model, x)).abs().max())
    return _check_diff("safetensors", diff)


# ----------------------------------------------------------------------------------------------
# Model card


def _metrics_card(study: optuna.Study, trial: FrozenTrial) -> dict[str, dict[str, Any]]:
    from kdsearch.report.pareto import metric_columns, metric_value

    names = list(study.metric_names or [])
    missing = trial.user_attrs.get("missing_metrics") or {}
    methods = trial.user_attrs.get("methods") or {}
    out: dict[str, dict[str, Any]] = {}
    for m in metric_columns(study, [trial]):
        value = metric_value(trial, m, names)
        entry: dict[str, Any] = {"value": value, "unit": metric_unit(m)}
        if m in methods:
            entry["method"] = methods[m]
        if value is None:
            entry["missing_reason"] = str(missing.get(m, "not recorded"))
        out[m] = entry
    return out


def _normalisation(study: optuna.Study, trial: FrozenTrial) -> dict[str, Any] | None:
    for attrs in (trial.user_attrs, study.user_attrs):
        norm = attrs.get("normalization")
        if isinstance(norm, dict) and "mean" in norm and "std" in norm:
            return {"mean": list(norm["mean"]), "std": list(norm["std"])}
    return None


def _card(study: optuna.Study, trial: FrozenTrial, spec: StudentSpec, fmt: str) -> dict[str, Any]:
    from kdsearch.report.pareto import feasible

    ua = trial.user_attrs
    cfg = study.user_attrs.get("config") if isinstance(study.user_attrs.get("config"), dict) else {}
    objectives = dict(zip(study.metric_names or [], [d.name.lower() for d in study.directions], strict=False))
    return {
        "kind": "kdsearch-student-export",
        "kdsearch_version": __version__,
        "format": fmt,
        "study": study.study_name,
        "trial_number": trial.number,
        "student": spec.label,
        "spec": spec.to_dict(),
        "input": {
            "shape": ["batch", spec.in_chans, spec.resolution, spec.resolution],
            "resolution_px": spec.resolution,
            "preprocessing": "RGB uint8 -> resize to resolution_px (bilinear, antialias) -> /255 -> (x - mean) / std",
            "normalization": _normalisation(study, trial),
        },
        "objectives": objectives,
        "constraints": cfg.get("constraints") if isinstance(cfg, dict) else None,
        "feasible": feasible(trial),
        "metrics": _metrics_card(study, trial),
        "teacher": ua.get("teacher"),
        "teacher_name": ua.get("teacher_name"),
        "dataset": ua.get("dataset") or (cfg.get("data", {}) or {}).get("dataset"),
        "distillation": {k: ua.get(k) for k in ("temperature", "alpha", "lr")},
        "params": dict(trial.params),
        "environment": {
            "study": study.user_attrs.get("environment"),
            "trial_device": ua.get("device") or (ua.get("worker") or {}).get("device"),
            "env_diff": ua.get("env_diff"),
        },
        "source": {"artifact_id": ua.get("artifact_id"), "weights_sha256": ua.get("weights_sha256")},
    }


def _fmt_value(entry: dict[str, Any]) -> str:
    v, unit = entry.get("value"), entry.get("unit") or ""
    if v is None:
        return f"— ({entry.get('missing_reason', 'missing')})"
    if unit == "fraction":
        return f"{100 * v:.2f}%"
    return f"{v:.6g}"


def _method(entry: dict[str, Any]) -> str:
    m = entry.get("method")
    if isinstance(m, dict):
        return str(m.get("method", "")) + (f" ({m.get('device')})" if m.get("device") else "")
    return str(m or "")


def _load_snippet(fmt: str, spec: StudentSpec) -> str:
    r = spec.resolution
    if fmt == "torchscript":
        return (
            "```python\nimport torch\nmodel = torch.jit.load(\"DIR/model.pt\")  # eval mode\n"
            f"logits = model(torch.randn(1, {spec.in_chans}, {r}, {r}))\n```\n"
        )
    if fmt == "onnx":
        return (
            "```python\nimport numpy as np, onnxruntime as ort\n"
            "sess = ort.InferenceSession(\"DIR/model.onnx\", providers=[\"CPUExecutionProvider\"])\n"
            f"logits = sess.run(None, {{\"input\": np.zeros((4, {spec.in_chans}, {r}, {r}), np.float32)}})[0]"
            "  # any batch size\n```\n"
        )
    return ""


def _readme(card: dict[str, Any], files: dict[str, str]) -> str:
    spec = StudentSpec.from_dict(card["spec"])
    lines = [
        f"# kdsearch student `{card['student']}`",
        "",
        f"Study `{card['study']}`, trial {card['trial_number']}, exported as **{card['format']}** by kdsearch "
        f"{card['kdsearch_version']}. Distilled from teacher **{card.get('teacher')}** on **{card.get('dataset')}**.",
        "",
        "## Load it",
        "",
        "```python\nimport kdsearch\nmodel = kdsearch.load_student(\"DIR\")  # torch.nn.Module in eval mode\n```",
        "",
        _load_snippet(card["format"], spec),
        f"Input: float32 `[batch, {spec.in_chans}, {spec.resolution}, {spec.resolution}]`; "
        f"{card['input']['preprocessing']}."
        + (
            f" mean = {card['input']['normalization']['mean']}, std = {card['input']['normalization']['std']}."
            if card["input"].get("normalization")
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
            f"| {m}{' (objective: ' + card['objectives'][m] + ')' if m in card['objectives'] else ''} "
            f"| {_fmt_value(e)} | {e.get('unit') or ''} | {_method(e)} |"
            for m, e in card["metrics"].items()
        ],
        "",
        "Feasible under the study's constraints ("
        + (", ".join(f"{m} <= {v:g}" for m, v in (card.get("constraints") or {}).items()) or "none")
        + f"): {card['feasible']}.",
        "",
        "## Distillation",
        "",
        f"Teacher {card.get('teacher')} ({card.get('teacher_name')}); temperature "
        f"{card['distillation'].get('temperature')}, alpha {card['distillation'].get('alpha')}, "
        f"lr {card['distillation'].get('lr')}; data set {card.get('dataset')}.",
        "",
        "## Environment",
        "",
        "```json",
        json.dumps(card["environment"], indent=1, sort_keys=True, default=str),
        "```",
        "",
        "## Files",
        "",
        "| file | sha256 |",
        "|---|---|",
        *[f"| {name} | `{sha}` |" for name, sha in files.items()],
        "",
        f"Verified after writing: max |output - PyTorch| = {card['verification']['max_abs_diff']:.3g} on a seeded "
        f"batch of {card['verification']['batch']} (tolerance {card['verification']['tolerance']:g}).",
        "",
    ]
    return "\n".join(lines)


def _write_card(folder: Path, card: dict[str, Any], files: dict[str, str]) -> dict[str, str]:
    """Write card.json (listing the model files' sha256) and README.md; return every file's sha256."""
    card["files"] = dict(files)
    atomic_write_text(folder / "card.json", json.dumps(card, indent=1, sort_keys=False, default=str) + "\n")
    all_files = dict(files)
    all_files["card.json"] = sha256_file(folder / "card.json")
    atomic_write_text(folder / "README.md", _readme(card, all_files))
    all_files["README.md"] = sha256_file(folder / "README.md")
    return all_files


# ----------------------------------------------------------------------------------------------
# Public API


def export_trial(
    storage_url: str,
    study_name: str,
    trial_number: int | None,
    pick: str | None,
    out_dir: str | Path,
    fmt: str = "safetensors",
    artifact_dir: str | Path | None = None,
) -> ExportResult:
    """Export one COMPLETE trial's student to ``out_dir`` (see the module docstring).

    Exactly one of ``trial_number`` and ``pick`` (a rule, see :mod:`kdsearch.report.pareto`).
    ``artifact_dir`` is the study's FileSystemArtifactStore folder (``<run_dir>/<study>/artifacts``).
    Raises :class:`ConfigError` for a bad trial/rule/format/output and :class:`ExportError` for a
    checkpoint that is missing, altered (sha256 mismatch) or an export that does not verify.
    """
    from kdsearch.storage import load_study

    if fmt not in FORMATS:
        raise ConfigError("--format", f"must be one of {list(FORMATS)}", fmt)
    out = Path(out_dir)
    _check_out_dir(out)
    study = load_study(storage_url, study_name)
    trial = select_trial(study, trial_number, pick)
    expected = trial.user_attrs.get("weights_sha256")
    if not expected:
        raise ExportError(f"trial {trial.number}: no 'weights_sha256' user attr; cannot check the checkpoint")
    stage = staging_dir(out)
    try:
        ckpt = stage / MODEL_FILES["safetensors"]
        _download_checkpoint(trial, Path(artifact_dir) if artifact_dir is not None else None, ckpt)
        actual = sha256_file(ckpt)
        if actual != expected:
            raise ExportError(
                f"trial {trial.number}: checkpoint sha256 {actual[:16]}... does not match the stored "
                f"weights_sha256 {expected[:16]}...; the artifact was altered or corrupted, refusing to export it"
            )
        try:
            model, spec = load_student_file(ckpt, expected_sha256=expected)
        except CheckpointError as exc:
            raise ExportError(f"trial {trial.number}: {exc}") from None
        model = model.float().eval()
        files = {MODEL_FILES["safetensors"]: actual}
        diff_st = _verify_safetensors(model, spec, stage)
        diff = diff_st
        if fmt == "torchscript":
            diff = _write_torchscript(model, spec, stage / MODEL_FILES["torchscript"])
            files[MODEL_FILES["torchscript"]] = sha256_file(stage / MODEL_FILES["torchscript"])
        elif fmt == "onnx":
            diff = _write_onnx(model, spec, stage / MODEL_FILES["onnx"])
            files[MODEL_FILES["onnx"]] = sha256_file(stage / MODEL_FILES["onnx"])
        card = _card(study, trial, spec, fmt)
        card["verification"] = {
            "format": fmt,
            "max_abs_diff": diff,
            "safetensors_max_abs_diff": diff_st,
            "tolerance": TOLERANCE,
            "batch": VERIFY_BATCH,
            "seed": VERIFY_SEED,
            "input": "torch.randn(batch, C, R, R) from torch.Generator().manual_seed(seed)",
            "runtime": {"torchscript": "torch.jit.load", "onnx": "onnxruntime CPUExecutionProvider",
                        "safetensors": "kdsearch.load_student"}[fmt],
        }
        if fmt == "onnx":
            card["verification"]["opset"] = ONNX_OPSET
            card["verification"]["dynamic_axes"] = {"input": {"0": "batch"}, "logits": {"0": "batch"}}
        all_files = _write_card(stage, card, files)
        publish_dir(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return ExportResult(trial.number, out, fmt, all_files, diff, card)


def load_student_with_card(path: str | Path) -> tuple[nn.Module, StudentSpec, dict[str, Any]]:
    """Like :func:`load_student`, also returning the spec and the folder's card (``{}`` if none)."""
    p = Path(path)
    card: dict[str, Any] = {}
    if p.is_dir():
        ckpt = p / MODEL_FILES["safetensors"]
        if not ckpt.is_file():
            raise CheckpointError(
                f"load_student: no model.safetensors in folder {str(p)!r}; pass a kdsearch export folder or a .safetensors file"
            )
        card_path = p / "card.json"
        if card_path.is_file():
            try:
                card = json.loads(card_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"load_student: {str(card_path)!r} is not valid JSON ({exc})") from None
    elif p.is_file() and p.suffix == ".safetensors":
        ckpt = p
    elif p.exists():
        raise CheckpointError(f"load_student: expected a folder or a .safetensors file (got {str(p)!r})")
    else:
        raise CheckpointError(f"load_student: no such file or folder (got {str(p)!r})")
    expected = (card.get("files") or {}).get(MODEL_FILES["safetensors"]) if card else None
    model, spec = load_student_file(ckpt, expected_sha256=expected)
    return model.eval(), spec, card


def load_student(path: str | Path) -> nn.Module:
    """Rebuild a student from an export folder (``model.safetensors``, hash checked against
    ``card.json`` when present) or a ``.safetensors`` checkpoint file; returns it in eval mode."""
    model, _spec, _card_ = load_student_with_card(path)
    return model
