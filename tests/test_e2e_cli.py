"""End to end through the real command-line tools, each in a subprocess with an explicit, clean environment:

synthetic dataset → ``nnUNetv2_plan_and_preprocess`` (session fixture) → ``alice_pretrain --objective mae``
(loss goes down, outputs in nnU-Net's layout, checkpoint metadata) → ``nnUNetv2_train -tr nnUNetTrainerAlice_tiny``
with no ``nnUNet_extTrainer`` (the installed start-up hook makes the class discoverable) → ``nnUNetv2_predict``
→ Dice against ``labelsTs``. Plus a ResidualEncoderUNet plan (``nnUNetPlannerResEncM``) and bad input
(one ``error:`` line on stderr, exit ≠ 0, nothing written).
"""
import hashlib
import json
import os
import re

import numpy as np
import pytest
import torch

from nnunet_alice.errors import AliceError

pytestmark = pytest.mark.slow

TRAINER = "nnUNetTrainerAlice_tiny"
PRETRAIN_DIR = "AlicePretrain__{plans}__3d_fullres"
LOG_LINE = re.compile(r": step (\d+) loss ([-+0-9.eEnaif]+)")


def _tree(folder):
    """Every path under ``folder`` (relative), to prove that a failed command wrote nothing."""
    out = set()
    for root, dirs, files in os.walk(folder):
        for n in dirs + files:
            out.add(os.path.relpath(os.path.join(root, n), folder))
    return out


def _plans(ds, plans="nnUNetPlans"):
    with open(ds.preprocessed_dataset / f"{plans}.json") as f:
        return json.load(f)


def _sidecar_digest(path):
    with open(str(path) + ".sha256") as f:
        return f.read().split()[0]


@pytest.fixture(scope="module")
def pretrained(synth_dataset):
    """``alice_pretrain`` 8 MAE steps on the fixture dataset; returns (output folder, completed process)."""
    ds = synth_dataset
    proc = ds.run(["alice_pretrain", "-d", ds.dataset_id, "-c", "3d_fullres", "-device", "cpu", "--objective", "mae",
                   "--steps", 8, "--log-every", 2, "--save-every", 4, "--lr", "3e-3", "--mask-block-size", 8])
    return ds.results / ds.dataset_name / PRETRAIN_DIR.format(plans="nnUNetPlans"), proc


def test_pretrain_writes_outputs_and_loss_goes_down(synth_dataset, pretrained):
    folder, proc = pretrained
    assert proc.returncode == 0
    for name in ("checkpoint_final.pth", "checkpoint_final.pth.sha256", "checkpoint_latest.pth",
                 "training_log.txt", "progress.png"):
        assert (folder / name).is_file(), name
    assert (folder / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp") or n.startswith(".")]

    log_text = (folder / "training_log.txt").read_text()
    records = [(int(m.group(1)), float(m.group(2))) for m in LOG_LINE.finditer(log_text)]
    assert [s for s, _ in records] == [2, 4, 6, 8]
    losses = [loss for _, loss in records]
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0], f"loss did not go down: {records}"


def test_pretrain_checkpoint_describes_the_planned_network(synth_dataset, pretrained):
    folder, _ = pretrained
    plans = _plans(synth_dataset)
    cfg = plans["configurations"]["3d_fullres"]
    final = folder / "checkpoint_final.pth"
    assert _sidecar_digest(final) == hashlib.sha256(final.read_bytes()).hexdigest()
    ck = torch.load(str(final), map_location="cpu", weights_only=True)
    meta = ck["metadata"]
    assert meta["network_class_name"] == cfg["architecture"]["network_class_name"]
    assert meta["network_class_name"].endswith("PlainConvUNet")
    assert meta["arch_kwargs"] == cfg["architecture"]["arch_kwargs"]
    assert meta["patch_size"] == cfg["patch_size"]
    assert meta["spacing"] == pytest.approx(cfg["spacing"])
    assert meta["plans_name"] == "nnUNetPlans" and meta["configuration"] == "3d_fullres"
    assert meta["data_identifier"] == cfg["data_identifier"]
    assert meta["case_ids"] == [f"synth_{i:03d}" for i in range(4)]
    assert meta["num_input_channels"] == 1 and meta["objective"] == "mae" and meta["step"] == 8
    assert meta["settings"]["mask_block_size"] == 8 and meta["settings"]["lr"] == pytest.approx(3e-3)
    assert ck["nnssl_adaptation_plan"]["architecture_plans"]["arch_class_name"] == "PlainConvUNet"
    assert "training_state" not in ck
    w = ck["network_weights"]
    assert any(k.startswith("encoder.stages.") for k in w) and any(".seg_layers." in k for k in w)
    latest = torch.load(str(folder / "checkpoint_latest.pth"), map_location="cpu", weights_only=True)
    assert latest["training_state"]["step"] == 8
    assert all(torch.equal(latest["network_weights"][k], v) for k, v in w.items())


@pytest.fixture(scope="module")
def finetuned(synth_dataset, pretrained):
    ds = synth_dataset
    env = ds.env(n_proc_da=0)
    assert "nnUNet_extTrainer" not in env and set(env) == {
        "PATH", "HOME", "nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA", "nnUNet_def_n_proc"}
    proc = ds.run(["nnUNetv2_train", ds.dataset_id, "3d_fullres", "all", "-tr", TRAINER, "-device", "cpu"])
    return ds.results / ds.dataset_name / f"{TRAINER}__nnUNetPlans__3d_fullres" / "fold_all", proc


def test_nnunet_train_loads_the_pretrained_weights(synth_dataset, pretrained, finetuned):
    pre_folder, _ = pretrained
    fold, proc = finetuned
    assert (fold / "checkpoint_final.pth").is_file()
    logs = sorted(fold.glob("training_log_*.txt"))
    assert logs
    text = logs[-1].read_text()
    final = pre_folder / "checkpoint_final.pth"
    m = re.search(r"Alice: loaded (\d+) of (\d+) tensors .* from (\S+) \(sha256 ([0-9a-f]{64})\)", text)
    assert m, text[-3000:]
    n, total = int(m.group(1)), int(m.group(2))
    ck = torch.load(str(final), map_location="cpu", weights_only=True)
    assert n == len([k for k in ck["network_weights"] if k.startswith(("encoder.", "decoder.encoder."))])  # load scope
    assert 0 < n < total
    assert os.path.samefile(m.group(3), final)
    assert m.group(4) == _sidecar_digest(final)
    assert "Alice: loaded" in proc.stdout


def test_nnunet_predict_and_dice(synth_dataset, finetuned, tmp_path):
    import SimpleITK as sitk

    ds = synth_dataset
    out = tmp_path / "pred"
    ds.run(["nnUNetv2_predict", "-i", ds.raw_dataset / "imagesTs", "-o", out, "-d", ds.dataset_id,
            "-c", "3d_fullres", "-f", "all", "-tr", TRAINER, "-device", "cpu", "--disable_tta", "-npp", 1, "-nps", 1])
    labels = sorted((ds.raw_dataset / "labelsTs").glob("*.nii.gz"))
    assert labels
    for lab_file in labels:
        pred_file = out / lab_file.name
        assert pred_file.is_file()
        gt = sitk.GetArrayFromImage(sitk.ReadImage(str(lab_file)))
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_file)))
        assert pred.shape == gt.shape
        assert set(np.unique(pred)) <= {0, 1, 2}
        for label in (1, 2):
            g, p = gt == label, pred == label
            assert g.sum() > 0
            dice = 2.0 * np.logical_and(g, p).sum() / (g.sum() + p.sum())
            assert np.isfinite(dice) and 0.0 <= dice <= 1.0


# ---------------------------------------------------------------------------------------------- ResEnc plans
RESENC = "nnUNetResEncUNetMPlans"


@pytest.fixture(scope="module")
def resenc_checkpoint(synth_dataset):
    ds = synth_dataset
    ds.run(["nnUNetv2_plan_experiment", "-d", ds.dataset_id, "-pl", "nnUNetPlannerResEncM"], n_proc_da=None)
    assert _plans(ds, RESENC)["configurations"]["3d_fullres"]["data_identifier"] == "nnUNetPlans_3d_fullres"
    ds.run(["alice_pretrain", "-d", ds.dataset_name, "-c", "3d_fullres", "-p", RESENC, "-device", "cpu",
            "--objective", "mae", "--steps", 2, "--batch-size", 1, "--patch-size", 16, 16, 16,
            "--mask-block-size", 8, "--log-every", 1])
    return ds.results / ds.dataset_name / PRETRAIN_DIR.format(plans=RESENC) / "checkpoint_final.pth"


def _planned_network(ds, plans_name, num_classes=3):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(_plans(ds, plans_name))
    cm = pm.get_configuration("3d_fullres")
    net = nnUNetTrainer.build_network_architecture(pm, cm, 1, num_classes, enable_deep_supervision=True)
    return net, cm


def test_resenc_checkpoint_loads_into_the_planned_network(synth_dataset, resenc_checkpoint):
    from nnunet_alice.trainers.pretrained import load_pretrained_into

    ck = torch.load(str(resenc_checkpoint), map_location="cpu", weights_only=True)
    assert ck["metadata"]["network_class_name"].endswith("ResidualEncoderUNet")
    assert ck["metadata"]["plans_name"] == RESENC
    net, cm = _planned_network(synth_dataset, RESENC)
    assert type(net).__name__ == "ResidualEncoderUNet"
    n = load_pretrained_into(net, str(resenc_checkpoint), cm.network_arch_class_name, cm.network_arch_init_kwargs,
                             1, log=lambda s: None)
    sd = net.state_dict()
    non_seg = [k for k in sd if ".seg_layers." not in k]
    assert n == len(non_seg)
    assert all(torch.equal(sd[k], ck["network_weights"][k]) for k in non_seg)


def test_checkpoint_for_another_network_is_rejected(synth_dataset, resenc_checkpoint):
    from nnunet_alice.trainers.pretrained import load_pretrained_into

    net, cm = _planned_network(synth_dataset, "nnUNetPlans")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(AliceError) as ei:
        load_pretrained_into(net, str(resenc_checkpoint), cm.network_arch_class_name, cm.network_arch_init_kwargs,
                             1, log=lambda s: None)
    msg = str(ei.value)
    assert "\n" not in msg and str(resenc_checkpoint) in msg
    assert "network_class_name" in msg and "ResidualEncoderUNet" in msg
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


# ---------------------------------------------------------------------------------------------- bad input
def _fails_cleanly(ds, args, expect):
    before_results, before_pre = _tree(ds.results), _tree(ds.preprocessed)
    proc = ds.run(["alice_pretrain", *args, "-device", "cpu", "--objective", "mae", "--steps", 1], check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert re.search(expect, lines[0]), lines[0]
    assert _tree(ds.results) == before_results and _tree(ds.preprocessed) == before_pre
    return lines[0]


def test_unknown_dataset(synth_dataset):
    _fails_cleanly(synth_dataset, ["-d", "999"], r"unknown dataset '999'")


def test_missing_plans(synth_dataset):
    line = _fails_cleanly(synth_dataset, ["-d", str(synth_dataset.dataset_id), "-p", "NoSuchPlans"],
                          r"NoSuchPlans\.json: plans not found")
    assert "nnUNetv2_plan_and_preprocess" in line


def test_continue_without_checkpoint(synth_dataset):
    ds = synth_dataset
    plans = _plans(ds)
    plans["plans_name"] = "nnUNetPlansFresh"  # same data, a plans name nobody pretrained yet
    with open(ds.preprocessed_dataset / "nnUNetPlansFresh.json", "w") as f:
        json.dump(plans, f)
    _fails_cleanly(ds, ["-d", str(ds.dataset_id), "-p", "nnUNetPlansFresh", "--continue"],
                   r"AlicePretrain__nnUNetPlansFresh__3d_fullres.*--continue")
    assert not (ds.results / ds.dataset_name / PRETRAIN_DIR.format(plans="nnUNetPlansFresh")).exists()
