"""alice_benchmark report: nnU-Net summaries, mean and sd, paired confidence intervals and the budget check."""
from __future__ import annotations

import json
import os

import pytest

from nnunet_alice.harness import report as bench_report
from nnunet_alice.harness.cli import read_summary
from nnunet_alice.harness.config import get_budget


def test_read_summary_rejects_other_json(tmp_path):
    p = tmp_path / "s.json"
    p.write_text(json.dumps({"foreground_mean": {"Dice": 0.7}, "mean": {"1": {"Dice": 0.6}, "2": {"Dice": 0.8}}}))
    assert read_summary(str(p)) == (0.7, {"1": 0.6, "2": 0.8})
    p.write_text("{}")
    with pytest.raises(ValueError):
        read_summary(str(p))


def test_report_aggregates_mean_and_sd():
    rows = [{"method": "scratch", "labels": 1, "seed": s, "status": "ok", "dice": d} for s, d in ((0, 0.4), (1, 0.6))]
    rows.append({"method": "scratch", "labels": 1, "seed": 2, "status": "failed", "dice": float("nan")})
    agg = bench_report.aggregate(rows)["scratch"][1]
    assert agg["n"] == 2 and agg["failed"] == 1
    assert agg["mean"] == pytest.approx(0.5) and agg["sd"] == pytest.approx(0.1414, abs=1e-3)


def test_confidence_interval_on_a_fixed_table():
    # t(0.975, df) from the standard table: 12.706 (df 1), 4.303 (df 2), 2.776 (df 4)
    assert bench_report.t_quantile(1) == pytest.approx(12.706, abs=1e-3)
    assert bench_report.t_quantile(2) == pytest.approx(4.303, abs=1e-3)
    assert bench_report.t_quantile(4) == pytest.approx(2.776, abs=1e-3)
    mean, half, n = bench_report.paired_ci([1.0, 2.0, 6.0])  # mean 3, sd sqrt(7)
    assert (mean, n) == (3.0, 3) and half == pytest.approx(4.303 * 7 ** 0.5 / 3 ** 0.5, rel=1e-3)
    assert bench_report.paired_ci([2.5])[1] != bench_report.paired_ci([2.5])[1]  # nan: no interval from one seed
    table = [(0, 0.70, 0.71), (1, 0.60, 0.62), (2, 0.65, 0.71)]  # (seed, scratch, alice) at 1 label
    rows = [{"method": m, "labels": 1, "seed": s, "status": "ok", "dice": d}
            for s, a, c in table for m, d in (("scratch", a), ("alice", c))]
    rows.append({"method": "alice", "labels": 1, "seed": 3, "status": "ok", "dice": 0.9})  # no scratch partner
    diffs = bench_report.paired_differences(rows)
    assert diffs["alice"][1] == pytest.approx([1.0, 2.0, 6.0])
    assert "+3.0 [-3.6, +9.6] (n=3)" in bench_report.markdown_table(rows)


def test_budget_check_warns_when_labels_do_not_matter():
    def rows_for(low, high):
        return [{"method": "scratch", "labels": n, "seed": s, "status": "ok", "dice": d}
                for s in (0, 1, 2) for n, d in ((1, low), (8, high))]

    flat = bench_report.warnings(rows_for(0.738, 0.742))
    assert len(flat) == 1 and "measures convergence speed" in flat[0] and "73.8" in flat[0] and "74.2" in flat[0]
    assert "measures convergence speed" in bench_report.markdown_table(rows_for(0.738, 0.742))
    assert bench_report.warnings(rows_for(0.70, 0.75)) == []
    (reversed_,) = bench_report.warnings(rows_for(0.536, 0.441))  # fewer labels score higher: no "within 2 Dice"
    assert "within" not in reversed_ and "fewer labels score higher" in reversed_ and "53.6" in reversed_
    assert bench_report.warnings(rows_for(0.70, 0.75)[:3]) == []  # one label count: nothing to compare


def test_learning_tail_reads_the_trainers_curve(tmp_path):
    import numpy as np

    from nnunet_alice.harness.trainers import write_learning_curve

    ema = np.linspace(0.10, 0.55, 10).astype(np.float32)  # nnU-Net logs numpy scalars
    path = write_learning_curve(str(tmp_path), {"ema_fg_dice": list(ema), "train_losses": [np.float32(1.0)] * 10})
    assert json.loads(open(path).read())["train_losses"] == [1.0] * 10
    tail = bench_report.learning_tail(path)
    assert tail["ema_dice_end"] == pytest.approx(0.55) and tail["ema_dice_gain"] == pytest.approx(0.10, abs=1e-6)
    assert tail["ema_dice_third"] == pytest.approx(0.20)  # epoch 3 of 10: the value when the first third ended
    assert bench_report.learning_tail(str(tmp_path / "missing.json")) == {}
    (tmp_path / "one.json").write_text(json.dumps({"ema_fg_dice": [0.3]}))
    assert bench_report.learning_tail(str(tmp_path / "one.json")) == {"ema_dice_end": 0.3}  # no rise to measure


def test_budget_check_warns_when_cells_were_still_learning():
    def rows_with(gains):
        return [{"method": "alice", "labels": 1, "seed": s, "status": "ok", "dice": 0.5, "ema_dice_gain": g}
                for s, g in enumerate(gains)]

    (still,) = bench_report.warnings(rows_with([0.03, 0.04, 0.01]))
    assert "still learning" in still and "+3.0" in still and "3 cells" in still
    assert bench_report.warnings(rows_with([0.005, 0.01, 0.03])) == []  # median 1 Dice: converged enough
    failed = rows_with([0.05]) + [{"method": "alice", "labels": 1, "seed": 9, "status": "failed", "dice": float("nan"),
                                   "ema_dice_gain": 0.5}]
    assert "+5.0" in bench_report.warnings(failed)[0]  # failed cells do not count


def test_report_names_the_seeds_its_rows_hold(tmp_path):
    """A folder filled by several runs (``--seeds 1``, then ``--seeds 2``) reports over all its finished seeds,
    not over the last command's."""
    rows = [{"method": "scratch", "labels": 1, "seed": s, "status": "ok", "dice": 0.5 + s / 10} for s in (0, 1, 2)]
    rows.append({"method": "scratch", "labels": 1, "seed": 5, "status": "failed", "dice": float("nan")})
    assert bench_report.seeds_of(rows) == [0, 1, 2]
    bench_report.write_markdown(str(tmp_path / "results.md"), rows, get_budget("tiny", seeds=[2]), "DS")
    text = (tmp_path / "results.md").read_text()
    assert "over seeds [0, 1, 2]" in text and "over seeds [2]" not in text


def test_report_pairs_every_arm_with_each_versus_arm(tmp_path, monkeypatch):
    """``--versus mae``: a second table of paired differences, every arm minus MAE on the seeds both finished;
    ``--report`` writes it from the cells on disk."""
    from nnunet_alice.harness.cli import main

    table = {0: (0.60, 0.70, 0.64), 1: (0.50, 0.52, 0.51), 2: (0.66, 0.65, 0.61)}  # seed: scratch, alice, mae
    rows = [{"method": m, "labels": 1, "seed": s, "fold": s, "status": "ok", "dice": d}
            for s, dice in table.items() for m, d in zip(("scratch", "alice", "mae"), dice)]
    rows.append({"method": "alice", "labels": 1, "seed": 3, "fold": 3, "status": "ok", "dice": 0.9})  # no MAE pair
    text = bench_report.markdown_table(rows, versus=["mae"])
    assert text.count("Paired difference to ") == 2 and "Paired difference to mae " in text
    versus_mae = text.split("Paired difference to mae ")[1].split("\n\n")[1]
    alice_line, = (line for line in versus_mae.splitlines() if line.startswith("| alice |"))
    mean, half, n = bench_report.paired_ci([6.0, 1.0, 4.0])
    assert n == 3 and f"{mean:+.1f} [{mean - half:+.1f}, {mean + half:+.1f}] (n=3)" in alice_line
    scratch_line, = (line for line in versus_mae.splitlines() if line.startswith("| scratch |"))
    assert f"{(-4 - 1 + 5) / 3:+.1f} [" in scratch_line
    assert "Paired difference to mae" not in bench_report.markdown_table(rows)
    assert "no finished cells of mae_nnunet" in bench_report.markdown_table(rows, versus=["mae_nnunet"])

    out = tmp_path / "bench"
    for r in rows:
        cell = out / "cells" / r["method"] / f"n1_s{r['seed']}"
        cell.mkdir(parents=True)
        (cell / "metrics.json").write_text(json.dumps(r))
    raw = tmp_path / "raw" / "Dataset993_Report"
    raw.mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "labels": {"background": 0, "a": 1},
                                                  "numTraining": 0, "file_ending": ".nii.gz"}))
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, str(tmp_path / ("raw" if k == "nnUNet_raw" else k)))
    from nnunet_alice.harness.cli import Benchmark

    bench = Benchmark("993", get_budget("tiny"), str(out), ["scratch", "alice"])
    for m, ema in (("scratch", [.1, .2, .3, .3, .3, .3]), ("alice", [.1, .5, .6, .6, .6, .6])):  # older cells
        folder = bench.fold_dir(m, 1, 0, 0)
        os.makedirs(folder)
        with open(os.path.join(folder, "learning_curve.json"), "w") as f:
            json.dump({"ema_fg_dice": ema}, f)
    assert main(["-d", "993", "--budget", "tiny", "--report", "--versus", "mae", "-o", str(out)]) == 0
    text = (out / "results.md").read_text()
    assert "Paired difference to mae " in text
    speed = text.split("Paired difference in speed")[1]
    assert "| alice | +30.0 (n=1) |" in speed  # one pair: epoch 2 of 6 ended the first third


def test_report_pairs_the_speed_of_each_start_with_scratch():
    """The speed table: paired differences of the EMA pseudo-Dice after the first third of the epochs, only on the
    pairs that have it, and no table when no row has it."""
    table = {0: (0.30, 0.40), 1: (0.35, 0.33), 2: (0.20, 0.29)}  # seed: early EMA of scratch, alice
    rows = [{"method": m, "labels": 1, "seed": s, "status": "ok", "dice": 0.5, "ema_dice_third": e}
            for s, early in table.items() for m, e in zip(("scratch", "alice"), early)]
    rows.append({"method": "alice", "labels": 1, "seed": 3, "status": "ok", "dice": 0.5})  # an older cell: no curve
    rows.append({"method": "scratch", "labels": 1, "seed": 3, "status": "ok", "dice": 0.5})
    assert bench_report.paired_differences(rows, key="ema_dice_third")["alice"][1] == pytest.approx([10.0, -2.0, 9.0])
    text = bench_report.markdown_table(rows)
    speed = text.split("Paired difference in speed")[1].split("\n\n")[1]
    alice_line, = (line for line in speed.splitlines() if line.startswith("| alice |"))
    mean, half, n = bench_report.paired_ci([10.0, -2.0, 9.0])
    assert f"{mean:+.1f} [{mean - half:+.1f}, {mean + half:+.1f}] (n=3)" in alice_line
    assert "+0.0 [+0.0, +0.0] (n=4)" in text.split("Paired difference in speed")[0]  # Dice: all four pairs
    assert "in speed" not in bench_report.markdown_table([{k: v for k, v in r.items() if k != "ema_dice_third"}
                                                           for r in rows])


def test_plot_shows_the_paired_differences_the_tables_report(tmp_path):
    pytest.importorskip("matplotlib")
    table = [(0, 0.70, 0.71), (1, 0.60, 0.62), (2, 0.65, 0.71)]  # (seed, scratch, alice) at 1 label
    rows = [{"method": m, "labels": 1, "seed": s, "status": "ok", "dice": d}
            for s, a, c in table for m, d in (("scratch", a), ("alice", c))]
    rows += [{"method": "scratch", "labels": 8, "seed": 0, "status": "ok", "dice": 0.8},
             {"method": "alice", "labels": 8, "seed": 0, "status": "ok", "dice": 0.75}]
    ((n1, mean, half, k), (n8, mean8, half8, k8)) = bench_report.paired_series(rows)["alice"]
    assert (n1, k, n8, k8) == (1, 3, 8, 1)
    assert mean == pytest.approx(3.0) and half == pytest.approx(4.303 * 7 ** 0.5 / 3 ** 0.5, rel=1e-3)
    assert mean8 == pytest.approx(-5.0) and half8 != half8  # one seed: no interval
    assert "scratch" not in bench_report.paired_series(rows)
    import matplotlib.image

    for name, rs in (("paired.png", rows), ("scratch_only.png", [r for r in rows if r["method"] == "scratch"])):
        path = str(tmp_path / name)
        assert bench_report.write_plot(path, rs, "t")
        assert not os.path.exists(path + ".tmp.png")
        width = matplotlib.image.imread(path).shape[1]
        assert width == (1320 if name == "paired.png" else 720)  # two panels only when there is a paired arm
