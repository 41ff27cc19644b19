"""Export one COMPLETE trial's student to a folder, verified, whole or not at all."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optuna.artifacts import FileSystemArtifactStore, download_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial

from kdsearch import trial_record as tr
from kdsearch.checkpoint import MODEL_FILE, load_student_file, sha256_file
from kdsearch.errors import CheckpointError, ConfigError, ExportError
from kdsearch.export.card import export_card
from kdsearch.export.formats import (
    FORMATS,
    MODEL_FILES,
    verification_record,
    verify_safetensors,
    write_onnx,
    write_torchscript,
)
from kdsearch.export.pick import select_trial
from kdsearch.export.quantize import INT8_FILE, QUANTIZE_CHOICES, QuantizeSettings, quantize_int8, study_data
from kdsearch.modelcard import check_out_dir, staged_out_dir, write_card
from kdsearch.storage import load_study

__all__ = ["ExportResult", "export_trial"]


@dataclass
class ExportResult:
    """What :func:`export_trial` wrote: ``files`` maps each file name to its sha256."""

    trial_number: int
    out_dir: Path
    fmt: str
    files: dict[str, str]
    max_abs_diff: float | None
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def quantization(self) -> dict[str, Any] | None:
        """The card's ``quantization`` section (``--quantize``), or None."""
        q = self.card.get("quantization")
        return q if isinstance(q, dict) else None


def _download_checkpoint(trial: FrozenTrial, artifact_dir: Path | None, dest: Path) -> None:
    aid = trial.user_attrs.get(tr.ARTIFACT_ID)
    if not aid:
        raise ExportError(f"trial {trial.number}: no stored checkpoint (user attr {tr.ARTIFACT_ID!r} is missing)")
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


def export_trial(
    storage_url: str,
    study_name: str,
    trial_number: int | None,
    pick: str | None,
    out_dir: str | Path,
    fmt: str = "safetensors",
    artifact_dir: str | Path | None = None,
    quantize: str | None = None,
    quantize_settings: QuantizeSettings | None = None,
    data_root: str | None = None,
    run_dir: str | Path | None = None,
) -> ExportResult:
    """Export one COMPLETE trial's student to ``out_dir``.

    Reads the study storage only: downloads the trial's checkpoint artifact, refuses it when its
    sha256 differs from the trial's ``weights_sha256``, rebuilds the student, writes ``fmt``
    (:mod:`kdsearch.export.formats`, verified) plus the model card into a staging folder, and
    renames it into place (:mod:`kdsearch.modelcard`). Every export folder also holds
    ``model.safetensors``, so ``kdsearch finetune`` and :func:`kdsearch.load_student` work on it.

    Exactly one of ``trial_number`` and ``pick`` (a rule, see :mod:`kdsearch.report.pareto`).
    ``quantize="int8"`` (ONNX only) also writes ``model.int8.onnx`` and the card's
    ``quantization`` section: calibration on the study's training split, fp32 and int8 accuracy,
    latency and top-1 agreement (:mod:`kdsearch.export.quantize`, ``quantize_settings``;
    ``data_root`` overrides the stored ``data.root``).
    ``artifact_dir`` is the study's FileSystemArtifactStore folder (``<run_dir>/<study>/artifacts``);
    ``run_dir`` lets a database study start from its trial snapshot (:func:`kdsearch.storage.load_study`).
    Raises :class:`ConfigError` for a bad trial/rule/format/output and :class:`ExportError` for a
    checkpoint that is missing, altered (sha256 mismatch) or an export that does not verify.
    """
    if fmt not in FORMATS:
        raise ConfigError("--format", f"must be one of {list(FORMATS)}", fmt)
    if quantize is not None:
        if quantize not in QUANTIZE_CHOICES:
            raise ConfigError("--quantize", f"must be one of {list(QUANTIZE_CHOICES)}", quantize)
        if fmt != "onnx":
            raise ConfigError("--quantize", "needs --format onnx (ONNX Runtime quantizes the ONNX model)", fmt,
                              "add --format onnx")
    settings = quantize_settings or QuantizeSettings()
    out = Path(out_dir)
    check_out_dir(out)
    study = load_study(storage_url, study_name, run_dir)  # run_dir: a database study's trial snapshot
    trial = select_trial(study, trial_number, pick)
    expected = trial.user_attrs.get(tr.WEIGHTS_SHA256)
    if not expected:
        raise ExportError(f"trial {trial.number}: no {tr.WEIGHTS_SHA256!r} user attr; cannot check the checkpoint")
    # The data first: a moved data folder fails before anything is exported.
    data = study_data(study, trial, data_root) if quantize == "int8" else None
    with staged_out_dir(out) as stage:
        ckpt = stage / MODEL_FILE
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
        files = {MODEL_FILE: actual}
        diff_st = verify_safetensors(model, spec, stage)
        diff = diff_st
        if fmt == "torchscript":
            diff = write_torchscript(model, spec, stage / MODEL_FILES["torchscript"])
        elif fmt == "onnx":
            diff = write_onnx(model, spec, stage / MODEL_FILES["onnx"])
        if fmt != "safetensors":
            files[MODEL_FILES[fmt]] = sha256_file(stage / MODEL_FILES[fmt])
        card = export_card(study, trial, spec, fmt)
        card["verification"] = verification_record(fmt, diff, diff_st)
        if data is not None:
            card["quantization"] = quantize_int8(
                stage / MODEL_FILES["onnx"], stage / INT8_FILE, spec, data, settings,
                {k: trial.user_attrs.get(k) for k in ("val_accuracy", "test_accuracy")},
            )
            files[INT8_FILE] = sha256_file(stage / INT8_FILE)
        all_files = write_card(stage, card, files)
    return ExportResult(trial.number, out, fmt, all_files, diff, card)
