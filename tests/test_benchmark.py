"""alice_benchmark: run matrix, CSV rows, resume, failure reporting, bad input and the protocol check (fake
command runner, tests/bench_fakes.py) + one real tiny cell."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from nnunet_alice.errors import AliceError
from nnunet_alice.harness.config import (BUDGETS, Arm, get_budget, labelled_subset,
                                         parse_method, resolve_label_counts)
from nnunet_alice.harness.cli import Benchmark
from bench_fakes import fake_env  # noqa: F401 (a fixture)
from bench_fakes import DS, FakeRunner, arg, bench, cell_method, make_fake_raw, read_csv, tool_of


def test_run_matrix_complete_and_one_csv_row_per_cell(fake_env):
    runner = FakeRunner()
    b = bench(runner)
    rows = b.run()
    keys = {(r["method"], r["labels"], r["seed"]) for r in rows}
    assert keys == {(m, n, s) for m in ("scratch", "alice", "mae") for n in (1, 2, 5) for s in (0, 1)}
    assert all(r["status"] == "ok" for r in rows)
    table = read_csv(os.path.join(b.out, "results.csv"))
    assert len(table) == 18 and len({(r["method"], r["labels"], r["seed"]) for r in table}) == 18
    assert {r["dice"] for r in table if r["method"] == "scratch"} == {"0.5000"}
    assert all(r["per_class_dice"] for r in table)
    assert os.path.isfile(os.path.join(b.out, "results_dice.png"))
    md = Path(b.out, "results.md").read_text()
    assert "| alice | 60.0 ± 0.0 (n=2)" in md and "+10.0" in md
    # each cell's learning curve: EMA pseudo-Dice 0.45 at the end, +0.05 over the last fifth -> still learning
    assert {(r["ema_dice_end"], r["ema_dice_gain"]) for r in table} == {("0.4500", "0.0500")}
    assert "still learning" in md and "+5.0 Dice" in md

    # one pretraining per pretrained arm and seed, with the arm's flags, each in its own results root, each
    # starting from its seed's initial weights
    pre = [(argv, env) for argv, env in runner.calls if argv[0] == "alice_pretrain"]
    assert len(pre) == 4
    mae = [argv for argv, _ in pre if "mae" in argv]
    assert len(mae) == 2 and all(["--objective", "mae"] == [a for a in argv if a in ("--objective", "mae")]
                                 for argv in mae)
    assert len({env["nnUNet_results"] for _, env in pre}) == 4
    assert {(arg(argv, "--seed"), arg(argv, "--init-weights")) for argv, _ in pre} == {
        (str(s), b.init_file(s)) for s in (0, 1)}
    inits = [argv for argv, _ in runner.calls if tool_of(argv) == "init"]
    assert sorted(arg(argv, "--seed") for argv in inits) == ["0", "1"]
    # paired design: every method trains (labels, seed) on the same fold with the same seed, budget and initial
    # weights; scratch with nnU-Net's recipe, the pretrained arms with the pretrained recipe and their own seed's
    # checkpoint
    trains = [(argv, env) for argv, env in runner.calls if argv[0] == "nnUNetv2_train"]
    assert len(trains) == 18
    by_fold = {}
    for argv, env in trains:
        seed = int(env["nnUNet_alice_bench_seed"])
        by_fold.setdefault(argv[3], set()).add((seed, env["nnUNet_alice_bench_epochs"], argv[argv.index("-p") + 1],
                                                env["nnUNet_alice_bench_init"]))
        method, cell = Path(env["nnUNet_results"]).parts[-2:]  # runs/<method>/n<labels>_s<seed>: one per cell
        assert cell.endswith(f"_s{seed}")
        assert env["nnUNet_alice_bench_init"] == b.init_file(seed)
        expected = "none" if method == "scratch" else b.checkpoint(method, seed)
        assert env["nnUNet_alice_pretrained"] == expected
        assert env["nnUNet_alice_bench_recipe"] == ("nnunet" if method == "scratch" else "pretrained")
        assert env["nnUNet_alice_load"] == "encoder"
    assert len(by_fold) == 6 and all(len(v) == 1 for v in by_fold.values())
    # splits: one per (labels, seed), labelled subsets of the right size, nested within a seed, test cases never in
    splits = json.loads(Path(b.pre_root, DS, "splits_final.json").read_text())
    folds = json.loads(Path(b.out, "folds.json").read_text())
    for key, i in folds.items():
        n, seed = map(int, key[1:].split("_s"))
        assert len(splits[i]["train"]) == n and not set(splits[i]["train"]) & {"t00", "t01"}
        assert splits[i]["val"]
    assert set(splits[folds["n1_s0"]]["train"]) <= set(splits[folds["n2_s0"]]["train"])
    assert splits[folds["n2_s0"]]["train"] != splits[folds["n2_s1"]]["train"]


def test_resume_skips_finished_cells(fake_env):
    first = FakeRunner()
    b = bench(first, methods=("scratch", "alice"), labels=("1", "all"))
    b.run()
    assert first.tools().count("nnUNetv2_train") == 8

    again = FakeRunner()
    rows = bench(again, methods=("scratch", "alice"), labels=("1", "all")).run()
    assert again.calls == [] and len(rows) == 8 and all(r.get("skipped") for r in rows)
    # a cell finished before the harness read learning curves gets them from its fold folder, without a command
    metrics = Path(b.cell_dir("scratch", 1, 0), "metrics.json")
    metrics.write_text(json.dumps({k: v for k, v in json.loads(metrics.read_text()).items()
                                   if not k.startswith("ema_")}))
    rows = bench(again, methods=("scratch", "alice"), labels=("1", "all")).run()
    assert again.calls == [] and json.loads(metrics.read_text())["ema_dice_gain"] == pytest.approx(0.05)

    # a cell whose metrics vanished reruns only that cell; its trained checkpoint is reused
    os.remove(os.path.join(b.cell_dir("alice", 5, 1), "metrics.json"))
    third = FakeRunner()
    rows = bench(third, methods=("scratch", "alice"), labels=("1", "all")).run()
    assert third.tools() == ["nnUNetv2_predict", "nnUNetv2_evaluate_folder"]
    assert len(read_csv(os.path.join(b.out, "results.csv"))) == 8
    # more seeds later: the old folds keep their numbers, only the new cells run
    fourth = FakeRunner()
    bench(fourth, methods=("scratch", "alice"), labels=("1", "all"), seeds=(0, 1, 2)).run()
    assert fourth.tools().count("nnUNetv2_train") == 4
    # a run of a subset keeps the other cells of the folder in the tables
    bench(FakeRunner(), methods=("scratch",), labels=("1",), seeds=(0,)).run()
    assert len(read_csv(os.path.join(b.out, "results.csv"))) == 12
    folds = json.loads(Path(b.out, "folds.json").read_text())
    assert folds == {"n1_s0": 0, "n1_s1": 1, "n5_s0": 2, "n5_s1": 3, "n1_s2": 4, "n5_s2": 5}
    # other result-defining settings in the same folder: refused instead of mixing results
    other = Benchmark("993", get_budget("tiny", epochs=3), methods=["scratch"], runner=FakeRunner(),
                      echo=lambda s: None)
    with pytest.raises(AliceError, match="epochs: 1 -> 3"):
        other.run()


def test_failing_cell_is_reported_without_losing_the_others(fake_env):
    def fail(argv, env):
        return argv[0] == "nnUNetv2_train" and cell_method(env) == "alice" \
            and env["nnUNet_alice_bench_seed"] == "1" \
            and argv[3] == "1"

    runner = FakeRunner(fail)
    b = bench(runner, methods=("scratch", "alice"), labels=("1", "all"))
    rows = b.run()
    failed = [r for r in rows if r["status"] == "failed"]
    assert [(r["method"], r["labels"], r["seed"]) for r in failed] == [("alice", 1, 1)]
    assert "simulated crash" in failed[0]["error"]
    table = read_csv(os.path.join(b.out, "results.csv"))
    assert len(table) == 8
    bad = [r for r in table if r["status"] == "failed"]
    assert len(bad) == 1 and "simulated crash" in bad[0]["error"] and bad[0]["dice"] == ""
    assert sum(r["status"] == "ok" for r in table) == 7
    assert "1 failed" in Path(b.out, "results.md").read_text()
    # the rerun retries only the failed cell
    retry = FakeRunner()
    rows = bench(retry, methods=("scratch", "alice"), labels=("1", "all")).run()
    assert retry.tools() == ["nnUNetv2_train", "nnUNetv2_predict", "nnUNetv2_evaluate_folder"]
    assert all(r["status"] == "ok" for r in rows)


def test_failed_pretraining_fails_only_that_arm(fake_env):
    runner = FakeRunner(lambda argv, env: argv[0] == "alice_pretrain" and "mae" in argv)
    rows = bench(runner).run()
    for r in rows:
        assert r["status"] == ("failed" if r["method"] == "mae" else "ok")
        if r["method"] == "mae":
            assert r["error"].startswith("pretraining failed")
    assert not any(argv[0] == "nnUNetv2_train" and cell_method(env) == "mae" for argv, env in runner.calls)


def test_holdout_when_there_are_no_test_labels(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    make_fake_raw(raw, n_train=6, with_test=False)
    monkeypatch.setenv("nnUNet_raw", str(raw))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    runner = FakeRunner()
    b = bench(runner, methods=("scratch",), labels=("all",), seeds=(0,), holdout=2)
    rows = b.run()
    assert [r["labels"] for r in rows] == [4]
    assert sorted(os.listdir(b.test_labels)) == ["c04.nii.gz", "c05.nii.gz"]
    splits = json.loads(Path(b.pre_root, DS, "splits_final.json").read_text())
    assert not {"c04", "c05"} & set(splits[0]["train"] + splits[0]["val"])
    predict = next(argv for argv, _ in runner.calls if argv[0] == "nnUNetv2_predict")
    assert arg(predict, "-i") == b.test_images and sorted(os.listdir(b.test_images)) == ["c04_0000.nii.gz",
                                                                                        "c05_0000.nii.gz"]


def test_every_command_is_printed_with_its_environment(fake_env):
    lines = []
    b = Benchmark("993", get_budget("tiny", labels=["1"], seeds=[0]), methods=["scratch"], runner=FakeRunner(),
                  echo=lines.append)
    b.run()
    cmds = [ln for ln in lines if ln.startswith("$ env ")]
    assert len(cmds) == 7  # fingerprint, plan, preprocess, initial weights, train, predict, evaluate
    assert "nnunet_alice.harness.steps init" in cmds[3] and "--seed 0" in cmds[3]
    train = next(ln for ln in cmds if "nnUNetv2_train" in ln)
    for part in ("nnUNet_alice_pretrained=none", "nnUNet_alice_bench_seed=0", "nnUNet_alice_bench_epochs=1",
                 "nnUNet_n_proc_DA=0",
                 "nnUNet_alice_bench_recipe=nnunet", f"nnUNet_alice_bench_init={b.init_file(0)}",
                 "OMP_WAIT_POLICY=PASSIVE",
                 f"nnUNet_preprocessed={b.pre_root}", f"nnUNet_extTrainer={b.out}/trainers",
                 "-tr nnUNetTrainerAlice_bench"):
        assert part in train
    # planning must not see nnUNet_n_proc_DA (nnU-Net's planner crashes on 0)
    plan = next(ln for ln in cmds if "nnUNetv2_plan_experiment" in ln)
    assert "nnUNet_n_proc_DA=" not in plan


def test_missing_dataset_and_bad_input():
    with pytest.raises(AliceError, match="unknown --budget"):
        get_budget("huge")
    with pytest.raises(AliceError, match="unknown method"):
        parse_method("alice_typo")
    assert parse_method("lr3=--lr 3e-4 --no-casa") == ("lr3", Arm(pretrain=["--lr", "3e-4", "--no-casa"]))
    with pytest.raises(AliceError, match="'all'"):
        resolve_label_counts(["one"], 4)
    assert resolve_label_counts(["all", "1", "16", "2"], 8) == [1, 2, 8]
    assert labelled_subset(list("abcdef"), 3, 7) == labelled_subset(list("fedcba"), 3, 7)
    assert set(BUDGETS) == {"tiny", "small", "medium", "long", "gpu15", "large"}


def test_missing_dataset_without_demo(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    b = Benchmark("994", get_budget("tiny"), output=str(tmp_path / "out"), runner=FakeRunner(), echo=lambda s: None)
    with pytest.raises(AliceError, match="--demo"):
        b.run()


def test_a_failed_setup_step_is_one_line_naming_the_step_and_its_log(fake_env, monkeypatch, capsys):
    """nnU-Net's tools not on PATH: no traceback, exit 2, one line with the step, its log and the cause."""
    from nnunet_alice.harness.cli import main

    monkeypatch.setenv("PATH", str(fake_env / "no_tools_here"))
    out = fake_env / "bench"
    with pytest.raises(SystemExit) as stop:
        main(["-d", "993", "--budget", "tiny", "-o", str(out)])
    assert stop.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "Traceback" not in err[0]
    assert "fingerprint exited with 127" in err[0] and os.path.join(str(out), "logs", "fingerprint.log") in err[0]
    assert "nnUNetv2_extract_fingerprint" in err[0]
    assert not os.path.exists(os.path.join(str(out), "state", "preprocessed.done"))


def test_a_folder_of_the_previous_protocol_is_not_resumed(fake_env):
    b = bench(FakeRunner(), methods=("scratch",), labels=("1",), seeds=(0,))
    state = Path(b.out, "state", "budget.json")
    state.parent.mkdir(parents=True)
    current = {k: getattr(b.budget, k) for k in ("pretrain_steps", "epochs", "iterations", "val_iterations", "device",
                                                  "gpu_memory_target", "patch_size", "features", "step_size",
                                                  "pretrain_batch", "pretrain_args")}
    state.write_text(json.dumps(current))  # written before init matching existed
    with pytest.raises(AliceError, match="protocol: None -> 2"):
        b.run()


@pytest.mark.slow
def test_real_tiny_cell_end_to_end(tmp_path, monkeypatch):
    """One real cell: plan, preprocess, train 1 epoch x 2 iterations, predict, evaluate with nnU-Net."""
    from nnunet_alice.demo.synthetic import make_synthetic_dataset

    raw = tmp_path / "raw"
    make_synthetic_dataset(str(raw), dataset_id=996, num_train=2, num_test=1, shape=(32, 32, 32))
    monkeypatch.setenv("nnUNet_raw", str(raw))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.delenv("nnUNet_n_proc_DA", raising=False)
    b = Benchmark("996", get_budget("tiny", labels=["all"], seeds=[0]), methods=["scratch"], echo=lambda s: None)
    rows = b.run()
    assert len(rows) == 1
    r = rows[0]
    assert r["status"] == "ok", r.get("error")
    assert 0.0 <= r["dice"] <= 1.0 and set(r["per_class"]) == {"1", "2"}
    assert r["train_s"] > 0 and r["predict_s"] > 0
    table = read_csv(os.path.join(b.out, "results.csv"))
    assert [(t["method"], t["labels"], t["status"]) for t in table] == [("scratch", "2", "ok")]
    assert len(os.listdir(os.path.join(b.cell_dir("scratch", 2, 0), "pred"))) >= 1
    assert 0.0 <= r["ema_dice_end"] <= 1.0  # the trainer wrote its learning curve (1 epoch: no gain to measure)


def test_subprocess_runner_logs_output_and_exit_code(tmp_path):
    from nnunet_alice.harness.runner import subprocess_runner

    log = tmp_path / "logs" / "x.log"
    rc, tail = subprocess_runner([sys.executable, "-c", "import sys; print('hello'); sys.exit(3)"], dict(os.environ),
                                 str(log))
    assert rc == 3 and tail == "hello" and log.read_text() == "hello\n"
    rc, tail = subprocess_runner(["no-such-command-alice"], dict(os.environ), str(log))
    assert rc == 127 and "no-such-command-alice" in tail
