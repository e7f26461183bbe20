"""``benchmarks/gpu_evidence.sh``: the prepared GPU run, dry-run on the CPU at a tiny size.

The dry run goes through every stage of the GPU run (demo data, plan, ``alice_pretrain --estimate``, the three
arms side by side, the merged table) with SimpleITK hidden behind a placeholder, as on the GPU machine.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_evidence.sh"


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(1500)  # about 3 min of CPU work; the script's own deadline in dry runs is 1200 s
@pytest.mark.skipif(importlib.util.find_spec("nilearn") is None, reason="nilearn is not installed")
def test_dry_run_completes_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, GPU_EVIDENCE_DRY="1", GPU_EVIDENCE_NO_SITK="1", GPU_EVIDENCE_WORK=str(tmp_path / "work"),
               OUT=str(out), PYTHON=sys.executable,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env.pop(k, None)
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=1800)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    for name in ("results.md", "results.csv", "evidence.json", "logs.tar.gz", "evidence_log.txt"):
        assert (out / name).is_file(), (name, log[-3000:])
    assert "SimpleITK: placeholder" in log  # the GPU machine's condition: images read with nibabel
    for field in ("step time", "volumes/s", "peak memory", "requested run"):  # the estimate chose the steps
        assert field in log
    evidence = json.loads((out / "evidence.json").read_text())
    assert evidence["dry_run"] is True and evidence["step_s"] > 0
    assert 1 <= evidence["pretrain_steps"] <= 2 and evidence["estimate"]["objective"] == "alice"
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    # the pretrained arms fine-tune under nnU-Net's schedule by default (GPU_EVIDENCE_RECIPE=nnunet)
    assert {r["method"] for r in rows} == {"scratch", "alice_nnunet", "mae_nnunet"}
    assert {r["recipe"] for r in rows} == {"nnunet"}
    assert all(r["status"] == "ok" and 0.0 <= float(r["dice"]) <= 1.0 for r in rows), rows
    assert "| scratch" in (out / "results.md").read_text()
