"""``alice_doctor``: the pre-flight report of a checkpoint against a target plan, and its summary in the trainer."""
from __future__ import annotations

import copy
import os

import pytest

from alice_sandbox import TINY_PLANS
from alice_trainer_utils import make_trainer, trainer_box, write_malicious_checkpoint  # noqa: F401 (fixture)
from nnunet_alice.checkpoint import load_checkpoint
from nnunet_alice.doctor import ERROR, NOTE, OK, WARNING, diagnose, stage_of
from nnunet_alice import doctor as doctor_cli

pytestmark = pytest.mark.slow
TOPICS = ["input channels", "tensors", "spacing", "normalization", "intensity statistics", "patch size",
          "pretraining"]


def run_doctor(args, capsys):
    with pytest.raises(SystemExit) as ei:
        doctor_cli.main(args)
    out = capsys.readouterr()
    return ei.value.code, out.out, out.err


@pytest.fixture
def env(trainer_box, monkeypatch):
    box, ckpt = trainer_box
    box.apply(monkeypatch)
    return box, ckpt


def by_topic(report):
    return {f.topic: f for f in report.findings}


def test_matching_plan_will_load(env, capsys):
    box, ckpt = env
    code, out, _ = run_doctor([ckpt, "-d", str(box.dataset_id), "-c", "3d_fullres", "-p", TINY_PLANS], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("alice_doctor: WILL LOAD: ") and "tensor coverage 100.0% (182/182)" in lines[0]
    for topic in TOPICS:
        assert any(f"] {topic}: " in ln for ln in lines[1:]), topic
    assert "[OK     ] input channels: one to one: 'CT'->'CT'" in out


def test_other_network_will_not_load_and_names_the_stages(env, capsys):
    box, ckpt = env
    code, out, _ = run_doctor([ckpt, "-d", box.dataset_name, "-c", "3d_fullres", "-p", "nnUNetPlans"], capsys)
    assert code == 1
    assert out.startswith("alice_doctor: WILL NOT LOAD") and "tensor coverage 0.0% (0/182)" in out
    assert "arch_kwargs.features_per_stage: checkpoint [4, 8, 16, 32] vs plan [32, 64, 128, 256]" in out
    for stage in ("encoder stage 0", "encoder stage 3", "decoder stage 2"):
        assert f"[ERROR  ] shapes {stage}: " in out
    assert "e.g. encoder.stages.3." in out  # the primary key is named, not its decoder.encoder alias
    assert all("-> fix: " in ln for ln in out.splitlines() if "[ERROR" in ln)


def test_plan_differences_are_reported_each_with_a_fix(env):
    box, ckpt_path = env
    ckpt = load_checkpoint(ckpt_path)
    plans = box.plans()
    cfg = plans["configurations"]["3d_fullres"]
    cfg["spacing"] = [s * 2 for s in cfg["spacing"]]
    cfg["patch_size"] = [p * 4 for p in cfg["patch_size"]]
    cfg["normalization_schemes"] = ["ZScoreNormalization"]
    report = diagnose(ckpt, ckpt_path, plans, "3d_fullres", box.dataset_json())
    f = by_topic(report)
    assert report.will_load and report.coverage == 100.0
    for topic in ("spacing", "normalization", "patch size", "pretraining"):
        assert f[topic].level == WARNING and f[topic].fix, topic
    assert "-overwrite_target_spacing" in f["spacing"].fix and "ratio [2, 2, 2]" in f["spacing"].message
    assert "CTNormalization vs ZScoreNormalization" in f["normalization"].message
    assert "ratio [6, 8, 8]" in f["patch size"].message and "--patch-size 96 128 128" in f["patch size"].fix
    assert "intensity statistics" not in f  # z-score does not use the dataset statistics

    plans = box.plans()
    props = plans["foreground_intensity_properties_per_channel"]["0"]
    props["mean"], props["std"] = props["mean"] + 3 * props["std"], props["std"] * 3
    f = by_topic(diagnose(ckpt, ckpt_path, plans, "3d_fullres", box.dataset_json()))
    assert f["intensity statistics"].level == WARNING
    assert "foreground_intensity_properties_per_channel" in f["intensity statistics"].fix
    assert f["spacing"].level == OK and f["patch size"].level == OK


def test_patch_ratio_uses_the_pretraining_views(env):
    box, ckpt_path = env
    ckpt = load_checkpoint(ckpt_path)
    f = by_topic(diagnose(ckpt, ckpt_path, box.plans(), "3d_fullres", box.dataset_json()))
    assert "checkpoint [16, 16, 16] vs target [24, 32, 32]" in f["patch size"].message  # --patch-size 16 16 16


@pytest.mark.parametrize("n", [2, 4])
def test_one_channel_checkpoint_maps_onto_more_channels(env, n):
    box, ckpt_path = env
    ds = box.dataset_json()
    ds["channel_names"] = {str(i): f"T{i}" for i in range(n)}
    report = diagnose(load_checkpoint(ckpt_path), ckpt_path, box.plans(), "3d_fullres", ds)
    f = by_topic(report)
    assert report.will_load and report.coverage == 100.0
    assert f["input channels"].level == NOTE
    assert f"repeated over the {n} channels and scaled by 1/{n}" in f["input channels"].message


def test_multichannel_checkpoint_onto_other_channels_will_not_load(env):
    box, ckpt_path = env
    ckpt = copy.deepcopy(load_checkpoint(ckpt_path))
    ckpt["metadata"]["num_input_channels"] = 2
    ckpt["metadata"]["channel_names"] = {"0": "T1", "1": "T2"}
    for k, v in ckpt["network_weights"].items():
        if k.endswith("stages.0.0.convs.0.conv.weight") or k.endswith("stages.0.0.convs.0.all_modules.0.weight"):
            ckpt["network_weights"][k] = v.repeat(1, 2, 1, 1, 1)
    ds = box.dataset_json()
    ds["channel_names"] = {"0": "a", "1": "b", "2": "c"}
    report = diagnose(ckpt, ckpt_path, box.plans(), "3d_fullres", ds)
    f = by_topic(report)
    assert not report.will_load
    assert f["input channels"].level == ERROR and "only 1-channel checkpoints" in f["input channels"].message
    assert f["shapes encoder stage 0"].level == ERROR and report.coverage < 100.0


def test_unfinished_run_and_missing_metadata(env):
    box, ckpt_path = env
    ckpt = copy.deepcopy(load_checkpoint(ckpt_path))
    ckpt["metadata"]["total_steps"] = 100
    f = by_topic(diagnose(ckpt, ckpt_path, box.plans(), "3d_fullres", box.dataset_json()))
    assert f["pretraining"].level == WARNING and "unfinished" in f["pretraining"].message
    bare = {"network_weights": ckpt["network_weights"]}
    report = diagnose(bare, ckpt_path, box.plans(), "3d_fullres", box.dataset_json())
    assert report.will_load and by_topic(report)["metadata"].level == WARNING


@pytest.mark.parametrize("damage", ["truncated", "malicious"])
def test_unreadable_checkpoint_will_not_load(env, capsys, tmp_path, damage):
    box, ckpt = env
    path, marker = str(tmp_path / "c.pth"), str(tmp_path / "pwned")
    if damage == "truncated":
        data = open(ckpt, "rb").read()
        open(path, "wb").write(data[: len(data) // 3])
        open(path + ".sha256", "w").write(open(ckpt + ".sha256").read())
    else:
        write_malicious_checkpoint(path, marker)
    code, out, _ = run_doctor([path, "-d", str(box.dataset_id), "-c", "3d_fullres", "-p", TINY_PLANS], capsys)
    assert code == 1 and out.startswith(f"alice_doctor: WILL NOT LOAD: {path}: ")
    assert ("checksum mismatch" if damage == "truncated" else "refused to load") in out
    assert not os.path.exists(marker)


def test_usage_errors_exit_2(env, capsys):
    box, ckpt = env
    code, _, err = run_doctor([ckpt, "-d", str(box.dataset_id), "-c", "3d_fullres", "-p", "NoSuchPlans"], capsys)
    assert code == 2 and "NoSuchPlans.json: plans not found" in err
    code, _, err = run_doctor([ckpt, "-d", str(box.dataset_id), "-c", "3d_nope", "-p", TINY_PLANS], capsys)
    assert code == 2 and "unknown configuration '3d_nope' (available: 2d, 3d_fullres)" in err


def test_trainer_prints_the_summary_before_training(trainer_box, monkeypatch, tmp_path):
    from nnunet_alice.trainers import nnUNetTrainerAlice_tiny

    box, ckpt = trainer_box
    t = make_trainer(nnUNetTrainerAlice_tiny, box, monkeypatch, pretrained=ckpt, results=tmp_path / "r")
    t.initialize()
    t.load_alice_weights()
    log = open(t.log_file).read()
    summary = log.index("alice_doctor: WILL LOAD")
    assert summary < log.index("Alice: loaded ")
    assert "[WARNING] pretraining: 4 case(s)" in log and "[OK" not in log  # the summary lists problems only


def test_stage_names():
    assert stage_of("decoder.encoder.stages.2.0.convs.1.conv.weight") == "encoder stage 2"
    assert stage_of("encoder.stem.convs.0.conv.weight") == "stem"
    assert stage_of("decoder.transpconvs.1.weight") == "decoder stage 1"
    assert stage_of("decoder.stages.0.convs.0.norm.bias") == "decoder stage 0"
