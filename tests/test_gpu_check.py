"""``make gpu-check GPU_CHECK_DRY=1`` runs every step of the GPU check on the CPU, so the script
cannot rot between GPU runs: each step ends ok, CUDA-only figures are missing with a reason, and
the summary holds every section."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_mode_runs_every_step(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry", "--out", str(out)],
        capture_output=True, text=True, timeout=360, cwd=ROOT,
    )
    summary = (out / "summary.md").read_text()
    assert proc.returncode == 0, proc.stdout + proc.stderr + summary
    for step in ("first-minute", "gpu-tests", "kd-step", "memory", "energy", "latency-cap", "study"):
        assert f"| {step} | ok |" in summary, summary
    assert "DRY" in summary
    # CUDA-only figures are missing with a reason, never 0.
    memory = json.loads((out / "memory.json").read_text())
    assert memory["rows"] and all(r["train_step_peak_mb"] is None and "CUDA" in r["missing_reason"] for r in memory["rows"])
    # The first minute: the four checks ran; on the CPU the CUDA-only ones are skipped with a reason.
    first = {c["name"]: c for c in json.loads((out / "first-minute.json").read_text())["checks"]}
    assert set(first) == {"device banner", "precision", "probe vs box", "zeus energy window"}
    assert first["precision"]["ok"] is True and "fp32" in first["precision"]["detail"]
    assert first["probe vs box"]["ok"] is None and first["probe vs box"]["probe_peak_memory_mb"] is None
    assert first["zeus energy window"]["ok"] is None and first["zeus energy window"]["result"]["joules"] is None
    assert first["device banner"]["ok"] in (True, None) and first["device banner"]["detail"]
    energy = json.loads((out / "energy.json").read_text())
    assert energy["method"] == "unavailable" and energy["kd_energy_j"] is None and energy["reason"]
    cap = json.loads((out / "latency-cap.json").read_text())
    assert cap["cap_held"] and cap["phase_s"] <= cap["budget_s"] + cap["tolerance_s"]
    trials = json.loads((out / "study" / "trials.json").read_text())
    assert any(t["state"] == "COMPLETE" for t in trials), trials
    assert (out / "study" / "report.html").stat().st_size > 10_000
    assert (out / "gpu-tests.xml").is_file()
    env = json.loads((out / "environment.json").read_text())
    assert env["torch"] and env["date"]
