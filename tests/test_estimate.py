"""``alice_pretrain --estimate``: prints step time, volumes/s, peak memory and the projected cost of the requested
run, and writes nothing (no output folder, checkpoint or log)."""
from __future__ import annotations

import os
import re

import pytest

from nnunet_alice.pretrain.estimate import format_duration

TINY = ["-c", "3d_fullres", "-device", "cpu", "--patch-size", "16", "16", "16", "--batch-size", "1",
        "--num-workers", "0", "--head-hidden-dim", "32", "--head-bottleneck-dim", "16", "--head-out-dim", "32"]


def _files(root):
    return sorted(os.path.relpath(os.path.join(r, f), root) for r, _, fs in os.walk(root) for f in fs)


def _parse(stdout):
    line = [ln for ln in stdout.splitlines() if ln.startswith("estimate: ")]
    assert len(line) == 1, stdout
    return dict(kv.split("=", 1) for kv in line[0][len("estimate: "):].split())


@pytest.mark.parametrize("objective,length,total", [("alice", ["--steps", "500"], 500),
                                                    ("mae", ["--epochs", "3", "--iterations-per-epoch", "7"], 21)])
def test_estimate_prints_its_fields_and_writes_nothing(synth_dataset, objective, length, total):
    ds = synth_dataset
    ds.results.mkdir(exist_ok=True)
    before = _files(ds.results)
    proc = ds.run(["alice_pretrain", "-d", ds.dataset_id, *TINY, "--objective", objective, *length, "--estimate", "2"])
    out = proc.stdout
    for field in ("step time", "volumes/s", "peak memory", "requested run", "nothing written"):
        assert field in out, out
    assert "peak RSS" in out and "GPU-hours" not in out  # CPU: resident memory, no GPU cost
    assert re.search(r"timed steps\s+2 after 1 warm-up", out)
    values = _parse(out)
    assert values["objective"] == objective and values["device"] == "cpu"
    assert int(values["total_steps"]) == total and int(values["steps_timed"]) == 2
    step_s, vol_s = float(values["step_s"]), float(values["vol_s"])
    assert step_s > 0 and vol_s == pytest.approx(1 / step_s, rel=1e-3)  # batch 1
    assert float(values["wall_s"]) == pytest.approx(total * step_s, rel=1e-3)
    assert float(values["peak_mem_gib"]) > 0.05
    # nothing written: no AlicePretrain folder, no file anywhere under nnUNet_results
    assert not (ds.results / ds.dataset_name / "AlicePretrain__nnUNetPlans__3d_fullres").exists()
    assert _files(ds.results) == before


def test_estimate_bad_count_is_one_line(synth_dataset):
    ds = synth_dataset
    proc = ds.run(["alice_pretrain", "-d", ds.dataset_id, *TINY, "--steps", "5", "--estimate", "0"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and proc.stderr.strip().count("\n") == 0
    assert "--estimate" in proc.stderr


def test_format_duration():
    assert format_duration(41.23) == "41.2 s"
    assert format_duration(725) == "12 min 5 s"
    assert format_duration(6275) == "1 h 45 min"
