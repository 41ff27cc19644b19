"""Student checkpoints: safetensors weights with the StudentSpec in the file's metadata.

One format serves the per-trial Optuna artifact and the exported ``model.safetensors``, so a
student can always be rebuilt from the file alone. An export folder (``kdsearch export``,
``kdsearch finetune``) holds that file as :data:`MODEL_FILE` next to :data:`CARD_FILE`, whose
``files`` table records the weights' sha256: :func:`load_student` checks it.

Floor: this module sits with ``kdsearch.models`` (it rebuilds students through the registry); it
never imports the package root, storage, search or the commands.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from kdsearch.errors import CheckpointError
from kdsearch.models import StudentSpec, build_student  # importing kdsearch.models registers every family

__all__ = [
    "MODEL_FILE",
    "CARD_FILE",
    "save_student",
    "load_student_file",
    "load_student",
    "load_student_with_card",
    "sha256_file",
    "atomic_write_bytes",
    "atomic_write_text",
]

SPEC_KEY = "kdsearch_spec"
MODEL_FILE = "model.safetensors"  # the weights inside an export folder
CARD_FILE = "card.json"  # the model card; its "files" table holds every model file's sha256


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_replace(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync, then rename over it."""
    _atomic_replace(Path(path), lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_student(model: nn.Module, spec: StudentSpec, path: str | Path, metadata: dict[str, str] | None = None) -> str:
    """Save ``model``'s state_dict (fp32, contiguous, CPU) atomically; return the file's sha256."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {SPEC_KEY: spec.to_json(), "format": "kdsearch-student-v1"}
    meta.update(metadata or {})
    _atomic_replace(Path(path), lambda tmp: save_file(state, tmp, metadata=meta))
    return sha256_file(path)


def load_student_file(path: str | Path, expected_sha256: str | None = None) -> tuple[nn.Module, StudentSpec]:
    """Rebuild the student from a checkpoint. Refuses a hash mismatch or keys that do not fit."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint: file not found (got {str(p)!r})")
    if expected_sha256 is not None:
        actual = sha256_file(p)
        if actual != expected_sha256:
            raise CheckpointError(
                f"checkpoint {str(p)!r}: sha256 {actual[:12]}... does not match the recorded "
                f"{expected_sha256[:12]}...; the file was changed or corrupted after the trial stored it"
            )
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as fh:
            meta = fh.metadata() or {}
        state = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {str(p)!r}: not a readable safetensors file ({exc})") from None
    if SPEC_KEY not in meta:
        raise CheckpointError(f"checkpoint {str(p)!r}: no {SPEC_KEY!r} metadata; not a kdsearch student")
    spec = StudentSpec.from_json(meta[SPEC_KEY])
    model = build_student(spec)
    missing, unexpected = _diff_keys(model, state)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {str(p)!r}: keys do not fit {spec.label} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.load_state_dict(state)
    model.eval()
    return model, spec


def _diff_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    return missing + [f"{k} (shape)" for k in bad_shape], unexpected


def load_student_with_card(path: str | Path) -> tuple[nn.Module, StudentSpec, dict[str, Any]]:
    """Like :func:`load_student`, also returning the spec and the folder's card (``{}`` if none)."""
    p = Path(path)
    card: dict[str, Any] = {}
    if p.is_dir():
        ckpt = p / MODEL_FILE
        if not ckpt.is_file():
            raise CheckpointError(
                f"load_student: no {MODEL_FILE} in folder {str(p)!r}; pass a kdsearch export folder or a .safetensors file"
            )
        card_path = p / CARD_FILE
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
    expected = (card.get("files") or {}).get(MODEL_FILE) if card else None
    model, spec = load_student_file(ckpt, expected_sha256=expected)
    return model.eval(), spec, card


def load_student(path: str | Path) -> nn.Module:
    """Rebuild a student from an export folder (``model.safetensors``, hash checked against
    ``card.json`` when present) or a ``.safetensors`` checkpoint file; returns it in eval mode."""
    model, _spec, _card = load_student_with_card(path)
    return model
