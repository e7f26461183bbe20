"""alice_benchmark: run matrix, init-matched arms, CSV rows, resume, failure reporting, confidence intervals and
the budget check (fake command runner) + one real tiny cell."""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import pytest

from nnunet_alice.errors import AliceError
from nnunet_alice.harness import report as bench_report
from nnunet_alice.harness.config import (BUDGETS, METHODS, Arm, get_budget, labelled_subset,
                                         parse_method, resolve_label_counts)
from nnunet_alice.harness.cli import Benchmark, read_summary

DS = "Dataset993_BenchFake"
ENDING = ".nii.gz"


def make_fake_raw(root: Path, n_train=5, n_test=2, with_test=True) -> Path:
    """A raw dataset of empty files: the fake runner never reads images."""
    ds = root / DS
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (ds / sub).mkdir(parents=True)
    for i in range(n_train):
        (ds / "imagesTr" / f"c{i:02d}_0000{ENDING}").write_text("")
        (ds / "labelsTr" / f"c{i:02d}{ENDING}").write_text("")
    for i in range(n_test if with_test else 0):
        (ds / "imagesTs" / f"t{i:02d}_0000{ENDING}").write_text("")
        (ds / "labelsTs" / f"t{i:02d}{ENDING}").write_text("")
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "file_ending": ENDING,
                                                 "labels": {"background": 0, "a": 1, "b": 2},
                                                 "numTraining": n_train}))
    return ds


def _arg(argv, flag):
    return argv[argv.index(flag) + 1]


def tool_of(argv):
    """The console script, or the step of ``python -m nnunet_alice.harness.steps STEP``."""
    return argv[3] if argv[1:3] == ["-m", "nnunet_alice.harness.steps"] else argv[0]


class FakeRunner:
    """Stands in for the subprocesses: writes the files each tool would write; ``fail(argv, env)`` -> exit 1."""

    def __init__(self, fail=None):
        self.calls = []
        self.fail = fail or (lambda argv, env: False)

    def tools(self):
        return [tool_of(argv) for argv, _ in self.calls]

    def __call__(self, argv, env, log):
        self.calls.append((list(argv), dict(env)))
        os.makedirs(os.path.dirname(log), exist_ok=True)
        if self.fail(argv, env):
            Path(log).write_text("Traceback (most recent call last):\nRuntimeError: simulated crash\n")
            return 1, "Traceback (most recent call last):\nRuntimeError: simulated crash"
        tool, pre = tool_of(argv), Path(env["nnUNet_preprocessed"]) / DS
        if tool in ("init", "probe"):
            out = Path(_arg(argv, "-o"))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"mean_dice": 0.3, "seed": int(_arg(argv, "--seed"))}) if tool == "probe"
                           else f"init {_arg(argv, '--seed')}")
        elif tool == "nnUNetv2_plan_experiment":
            pre.mkdir(parents=True, exist_ok=True)
            arch = {"n_stages": 4, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 3, "features_per_stage": [32, 64, 128, 256]}
            plans = {"plans_name": _arg(argv, "-overwrite_plans_name"), "configurations": {"3d_fullres": {
                "patch_size": [64, 64, 64], "batch_size": 2, "data_identifier": "x",
                "architecture": {"arch_kwargs": arch}}}}
            (pre / f"{_arg(argv, '-overwrite_plans_name')}.json").write_text(json.dumps(plans))
        elif tool == "alice_pretrain":
            assert Path(_arg(argv, "--init-weights")).is_file()
            folder = Path(env["nnUNet_results"]) / DS / f"AlicePretrain__{_arg(argv, '-p')}__3d_fullres"
            folder.mkdir(parents=True)
            (folder / "checkpoint_final.pth").write_text(" ".join(argv))
        elif tool == "nnUNetv2_train":
            splits = json.loads((pre / "splits_final.json").read_text())
            assert int(argv[3]) < len(splits)
            folder = Path(env["nnUNet_results"]) / DS / f"{_arg(argv, '-tr')}__{_arg(argv, '-p')}__3d_fullres"
            (folder / f"fold_{argv[3]}").mkdir(parents=True)
            (folder / f"fold_{argv[3]}" / "checkpoint_final.pth").write_text("")
        elif tool == "nnUNetv2_predict":
            os.makedirs(_arg(argv, "-o"))
        elif tool == "nnUNetv2_evaluate_folder":
            dice = 0.5 if env["nnUNet_alice_pretrained"] == "none" else 0.6
            per_class = {"1": {"Dice": dice - 0.1}, "2": {"Dice": dice + 0.1}}
            Path(_arg(argv, "-o")).write_text(json.dumps({"foreground_mean": {"Dice": dice}, "mean": per_class}))
        return 0, "ok"


@pytest.fixture
def fake_env(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    make_fake_raw(raw)
    monkeypatch.setenv("nnUNet_raw", str(raw))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    for var in ("nnUNet_n_proc_DA", "nnUNet_def_n_proc", "OMP_WAIT_POLICY"):  # CI exports some of these
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def bench(runner, methods=("scratch", "alice", "mae"), labels=("1", "2", "all"), seeds=(0, 1), **kw):
    budget = get_budget("tiny", labels=list(labels), seeds=list(seeds))
    return Benchmark("993", budget, methods=list(methods), runner=runner, echo=lambda s: None, **kw)


def cell_method(env):
    """The arm of a fine-tuning command, from its results folder runs/<arm>/n<labels>_s<seed>."""
    return Path(env["nnUNet_results"]).parent.name


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


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

    # one pretraining per pretrained arm and seed, with the arm's flags, each in its own results root, each
    # starting from its seed's initial weights
    pre = [(argv, env) for argv, env in runner.calls if argv[0] == "alice_pretrain"]
    assert len(pre) == 4
    mae = [argv for argv, _ in pre if "mae" in argv]
    assert len(mae) == 2 and all(["--objective", "mae"] == [a for a in argv if a in ("--objective", "mae")]
                                 for argv in mae)
    assert len({env["nnUNet_results"] for _, env in pre}) == 4
    assert {(_arg(argv, "--seed"), _arg(argv, "--init-weights")) for argv, _ in pre} == {
        (str(s), b.init_file(s)) for s in (0, 1)}
    inits = [argv for argv, _ in runner.calls if tool_of(argv) == "init"]
    assert sorted(_arg(argv, "--seed") for argv in inits) == ["0", "1"]
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
    assert _arg(predict, "-i") == b.test_images and sorted(os.listdir(b.test_images)) == ["c04_0000.nii.gz",
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


def test_controls_share_initial_weights_and_pretraining(fake_env):
    """scratch_recipe and init0 (controls) and alice_all (load scope all) reuse what the other arms made."""
    runner = FakeRunner()
    b = bench(runner, methods=("scratch", "scratch_recipe", "init0", "alice", "alice_all"), labels=("1",),
              seeds=(0, 1, 2))
    rows = b.run()
    assert len(rows) == 15 and all(r["status"] == "ok" for r in rows)
    pre = [argv for argv, _ in runner.calls if argv[0] == "alice_pretrain"]
    assert sorted(_arg(argv, "--seed") for argv in pre) == ["0", "1", "2"]  # alice only; alice_all shares it
    trains = {(cell_method(env), int(env["nnUNet_alice_bench_seed"])): env
              for argv, env in runner.calls if argv[0] == "nnUNetv2_train"}
    for seed in (0, 1, 2):
        env = {m: trains[(m, seed)] for m in ("scratch", "scratch_recipe", "init0", "alice", "alice_all")}
        assert len({e["nnUNet_alice_bench_init"] for e in env.values()}) == 1
        assert env["scratch_recipe"]["nnUNet_alice_pretrained"] == "none"
        assert env["scratch_recipe"]["nnUNet_alice_bench_recipe"] == "pretrained"
        assert env["init0"]["nnUNet_alice_pretrained"] == b.init_file(seed)
        assert env["alice_all"]["nnUNet_alice_pretrained"] == env["alice"]["nnUNet_alice_pretrained"] == \
            b.checkpoint("alice", seed)
        assert (env["alice_all"]["nnUNet_alice_load"], env["alice"]["nnUNet_alice_load"]) == ("all", "encoder")
    assert {r["recipe"] for r in rows if r["method"] == "scratch"} == {"nnunet"}
    assert METHODS["alice_sawtooth"].schedule == "sawtooth" and METHODS["alice_sawtooth"].shares == "alice"


def test_pretrained_arm_under_nnunets_schedule_shares_the_checkpoint(fake_env):
    """alice_nnunet: the alice checkpoint fine-tuned with nnU-Net's own schedule; results.md says who used what."""
    runner = FakeRunner()
    b = bench(runner, methods=("scratch", "alice", "alice_nnunet"), labels=("1",), seeds=(0, 1))
    rows = b.run()
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    assert sorted(_arg(argv, "--seed") for argv, _ in runner.calls if argv[0] == "alice_pretrain") == ["0", "1"]
    trains = {(cell_method(env), int(env["nnUNet_alice_bench_seed"])): env
              for argv, env in runner.calls if argv[0] == "nnUNetv2_train"}
    for seed in (0, 1):
        ours, theirs = trains[("alice_nnunet", seed)], trains[("alice", seed)]
        assert ours["nnUNet_alice_pretrained"] == theirs["nnUNet_alice_pretrained"] == b.checkpoint("alice", seed)
        assert (ours["nnUNet_alice_bench_recipe"], theirs["nnUNet_alice_bench_recipe"]) == ("nnunet", "pretrained")
    sentence = bench_report.recipes_sentence(rows)
    parts = sentence.split(";")
    assert len(parts) == 2
    nnunet_part, = (p for p in parts if "nnU-Net's own schedule" in p)
    pretrained_part, = (p for p in parts if "pretrained weights" in p)
    assert "`scratch`" in nnunet_part and "`alice_nnunet`" in nnunet_part
    assert "`alice`" in pretrained_part
    assert "`alice_nnunet`" not in pretrained_part
    assert sentence in Path(b.out, "results.md").read_text()


def test_one_pretraining_per_arm_when_the_budget_says_so(fake_env):
    runner = FakeRunner()
    budget = get_budget("tiny", labels=["1"], seeds=[0, 1, 2], pretrain_per_seed=False)
    b = Benchmark("993", budget, methods=["scratch", "alice"], runner=runner, echo=lambda s: None)
    b.run()
    assert [_arg(argv, "--seed") for argv, _ in runner.calls if argv[0] == "alice_pretrain"] == ["0"]
    assert [_arg(argv, "--seed") for argv, _ in runner.calls if tool_of(argv) == "init"] == ["0"]
    inits = {env["nnUNet_alice_bench_init"] for argv, env in runner.calls if argv[0] == "nnUNetv2_train"}
    assert inits == {b.init_file(0)}
    assert "once per arm, from the initial weights of seed 0" in Path(b.out, "results.md").read_text()


def test_pretrain_per_seed_flag_overrides_the_budget(fake_env):
    """``--pretrain-per-seed`` turns the long budget's one shared pretraining into one per seed, each from the
    seed's own initial weights; scratch cells then start from their seed's weights too."""
    from nnunet_alice.harness.cli import build_parser

    args = build_parser().parse_args(["--budget", "long", "--pretrain-per-seed", "--seeds", "1", "2"])
    assert args.pretrain_per_seed is True and build_parser().parse_args([]).pretrain_per_seed is None
    assert build_parser().parse_args(["--no-pretrain-per-seed"]).pretrain_per_seed is False
    runner = FakeRunner()
    budget = get_budget("long", labels=["1"], seeds=args.seeds, pretrain_per_seed=args.pretrain_per_seed)
    b = Benchmark("993", budget, methods=["scratch", "alice_nnunet"], runner=runner, echo=lambda s: None)
    b.run()
    assert sorted(_arg(argv, "--seed") for argv, _ in runner.calls if argv[0] == "alice_pretrain") == ["1", "2"]
    inits = sorted(env["nnUNet_alice_bench_init"] for argv, env in runner.calls if argv[0] == "nnUNetv2_train")
    assert inits == sorted([b.init_file(1)] * 2 + [b.init_file(2)] * 2)
    assert get_budget("long", pretrain_per_seed=None).pretrain_per_seed is False


def test_long_budget_run_matrix(fake_env):
    """--budget long: scratch, alice_nnunet, mae_nnunet x labels 1 / all x seeds 0-2; one 3,000-step pretraining
    per objective (from seed 0's draw); 3,000 fine-tuning iterations per cell under nnU-Net's schedule."""
    runner = FakeRunner()
    b = Benchmark("993", get_budget("long"), runner=runner, echo=lambda s: None)
    rows = b.run()
    assert len(rows) == 18 and all(r["status"] == "ok" for r in rows)
    assert {(r["method"], r["seed"]) for r in rows} == {(m, s) for m in ("scratch", "alice_nnunet", "mae_nnunet")
                                                         for s in (0, 1, 2)}
    assert len({r["labels"] for r in rows}) == 2
    pre = [argv for argv, _ in runner.calls if argv[0] == "alice_pretrain"]
    assert sorted("--objective" in argv and _arg(argv, "--objective") == "mae" for argv in pre) == [False, True]
    assert {(_arg(argv, "--steps"), _arg(argv, "--seed")) for argv in pre} == {("3000", "0")}
    trains = [env for argv, env in runner.calls if argv[0] == "nnUNetv2_train"]
    assert len(trains) == 18
    assert {(int(e["nnUNet_alice_bench_epochs"]) * int(e["nnUNet_alice_bench_iterations"]),
             e["nnUNet_alice_bench_recipe"]) for e in trains} == {(3000, "nnunet")}


def test_probe_column(fake_env, monkeypatch):
    import nnunet_alice.harness.cli as benchmark

    monkeypatch.setattr(benchmark, "probe_available", lambda: True)
    runner = FakeRunner()
    b = bench(runner, methods=("scratch", "init0", "alice", "alice_all"), labels=("1",), seeds=(0,), probe=True)
    rows = b.run()
    probes = [argv for argv, _ in runner.calls if tool_of(argv) == "probe"]
    # one probe per starting checkpoint: alice and alice_all share one; scratch and init0 share the initial
    # weights (scratch loads them as its initialisation)
    assert sorted(_arg(argv, "--checkpoint") for argv in probes) == sorted([b.checkpoint("alice", 0), b.init_file(0)])
    assert {_arg(argv, "--features") for argv in probes} == {"encoder"}
    got = {r["method"]: r.get("probe_dice") for r in rows}
    assert got["scratch"] == got["alice"] == got["alice_all"] == got["init0"] == 0.3
    text = Path(b.out, "results.md").read_text()
    assert "Linear probe" in text and "encoder features" in text
    table = {r["method"]: r for r in read_csv(os.path.join(b.out, "results.csv"))}
    assert table["scratch"]["probe_dice"] == "0.3000" and table["alice"]["probe_features"] == "encoder"
    # a finished cell probed with the old (decoder) features is probed again on resume, the cell is not retrained
    metrics = Path(b.cell_dir("alice", 1, 0), "metrics.json")
    old = json.loads(metrics.read_text())
    metrics.write_text(json.dumps({**old, "probe_features": "decoder"}))
    for f in Path(b.out, "probe").rglob("*.json"):
        f.unlink()
    runner.calls.clear()
    b.run()
    assert [tool_of(argv) for argv, _ in runner.calls].count("probe") == 1  # alice's checkpoint, re-probed once
    assert not [argv for argv, _ in runner.calls if argv[0] == "nnUNetv2_train"]


def test_probe_step_calls_the_probe_interface(tmp_path, monkeypatch):
    import sys
    import types

    from nnunet_alice.harness import steps as bench_steps

    calls = []
    fake = types.ModuleType("nnunet_alice.probe.cli")
    fake.probe_checkpoint = lambda *a, **kw: calls.append((a, kw)) or {"mean_dice": 0.42, "dice": {"1": 0.4},
                                                                         "tensor": object()}
    monkeypatch.setitem(sys.modules, "nnunet_alice.probe.cli", fake)
    monkeypatch.setattr(bench_steps, "probe_available", lambda: True)
    out = tmp_path / "p" / "probe.json"
    assert bench_steps.main(["probe", "-d", "993", "-p", "P", "-c", "3d_fullres", "--checkpoint", "ck.pth",
                             "--labels", "2", "--seed", "1", "-o", str(out)]) == 0
    assert calls[0][0] == ("993", "3d_fullres", "P", "ck.pth", 2, 1) and calls[0][1]["features"] == "decoder"
    assert json.loads(out.read_text()) == {"mean_dice": 0.42, "dice": {"1": 0.4}}  # plain values only


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


def test_subprocess_runner_logs_output_and_exit_code(tmp_path):
    from nnunet_alice.harness.runner import subprocess_runner

    log = tmp_path / "logs" / "x.log"
    rc, tail = subprocess_runner([sys.executable, "-c", "import sys; print('hello'); sys.exit(3)"], dict(os.environ),
                                 str(log))
    assert rc == 3 and tail == "hello" and log.read_text() == "hello\n"
    rc, tail = subprocess_runner(["no-such-command-alice"], dict(os.environ), str(log))
    assert rc == 127 and "no-such-command-alice" in tail
