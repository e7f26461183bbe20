"""The fake world of the alice_benchmark tests: a raw dataset of empty files and a command runner that writes
what each tool would write, so the harness runs its whole matrix in seconds."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from nnunet_alice.harness.config import get_budget
from nnunet_alice.harness.cli import Benchmark

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


def arg(argv, flag):
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
            out = Path(arg(argv, "-o"))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"mean_dice": 0.3, "seed": int(arg(argv, "--seed"))}) if tool == "probe"
                           else f"init {arg(argv, '--seed')}")
        elif tool == "nnUNetv2_plan_experiment":
            pre.mkdir(parents=True, exist_ok=True)
            arch = {"n_stages": 4, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 3, "features_per_stage": [32, 64, 128, 256]}
            plans = {"plans_name": arg(argv, "-overwrite_plans_name"), "configurations": {"3d_fullres": {
                "patch_size": [64, 64, 64], "batch_size": 2, "data_identifier": "x",
                "architecture": {"arch_kwargs": arch}}}}
            (pre / f"{arg(argv, '-overwrite_plans_name')}.json").write_text(json.dumps(plans))
        elif tool == "alice_pretrain":
            assert Path(arg(argv, "--init-weights")).is_file()
            folder = Path(env["nnUNet_results"]) / DS / f"AlicePretrain__{arg(argv, '-p')}__3d_fullres"
            folder.mkdir(parents=True)
            (folder / "checkpoint_final.pth").write_text(" ".join(argv))
        elif tool == "nnUNetv2_train":
            splits = json.loads((pre / "splits_final.json").read_text())
            assert int(argv[3]) < len(splits)
            folder = Path(env["nnUNet_results"]) / DS / f"{arg(argv, '-tr')}__{arg(argv, '-p')}__3d_fullres"
            (folder / f"fold_{argv[3]}").mkdir(parents=True)
            (folder / f"fold_{argv[3]}" / "checkpoint_final.pth").write_text("")
            curve = {"ema_fg_dice": [0.1, 0.2, 0.3, 0.4, 0.45]}  # what the bench trainer writes at the end
            (folder / f"fold_{argv[3]}" / "learning_curve.json").write_text(json.dumps(curve))
        elif tool == "nnUNetv2_predict":
            os.makedirs(arg(argv, "-o"))
        elif tool == "nnUNetv2_evaluate_folder":
            dice = 0.5 if env["nnUNet_alice_pretrained"] == "none" else 0.6
            per_class = {"1": {"Dice": dice - 0.1}, "2": {"Dice": dice + 0.1}}
            Path(arg(argv, "-o")).write_text(json.dumps({"foreground_mean": {"Dice": dice}, "mean": per_class}))
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


