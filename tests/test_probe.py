"""alice_probe: features, head, Dice, the probe on a real tiny nnU-Net dataset, and its bad inputs."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import build_tiny_unet, tiny_arch_kwargs, tiny_metadata

CONFIG = "3d_fullres"
PLANS = "nnUNetPlans"
FAST = {"voxels": 4000, "steps": 60}            # a smaller head fit keeps the dataset tests cheap
FAST_CLI = ["--voxels", 4000, "--steps", 60]


# ---------------------------------------------------------------------------------------------- units
@pytest.mark.parametrize("variant", ["decoder", "encoder"])
def test_gathered_features_match_predicted_logits(variant):
    """A head applied to gathered training features gives exactly the stitched prediction at those voxels
    (windows overlap and the volume is smaller than the patch on one axis, so padding and stitching are used)."""
    from nnunet_alice.probe.features import WindowFeatures

    torch.manual_seed(0)
    net = build_tiny_unet().eval()
    tap = WindowFeatures(net, variant, (8, 12, 16), step=0.5)
    image = np.random.default_rng(0).normal(size=(1, 21, 17, 10)).astype(np.float32)
    coords = np.stack([np.random.default_rng(i).integers(0, s, 40) for i, s in enumerate(image.shape[1:])], 1)
    w = torch.randn(3, tap.num_features)
    b = torch.randn(3)
    logits = tap.predict(image, w, b)
    assert logits.shape == (3, 21, 17, 10)
    direct = logits[:, coords[:, 0], coords[:, 1], coords[:, 2]].T
    torch.testing.assert_close(tap.gather(image, coords) @ w.T + b, direct, rtol=1e-4, atol=1e-4)
    assert tap.num_features == (4 if variant == "decoder" else 4 + 8 + 16)


def test_sample_at_equals_trilinear_upsampling():
    from nnunet_alice.probe.features import sample_at

    stage = torch.randn(5, 3, 4, 6)
    window = (12, 16, 24)
    up = F.interpolate(stage[None], size=window, mode="trilinear", align_corners=False)[0]
    local = torch.stack([torch.randint(0, s, (50,)) for s in window], 1)
    torch.testing.assert_close(sample_at(stage, local, window), up[:, local[:, 0], local[:, 1], local[:, 2]].T,
                               rtol=1e-5, atol=1e-5)


def test_linear_head_separates_and_is_deterministic():
    from nnunet_alice.probe.cli import fit_linear_head

    g = torch.Generator().manual_seed(0)
    y = torch.cat([torch.full((300,), 0), torch.full((40,), 1), torch.full((20,), 2)])  # imbalanced classes
    centres = torch.tensor([[0.0, 0.0, 5.0], [4.0, 0.0, 5.0], [0.0, 4.0, 5.0]])
    x = centres[y] * 3 + torch.randn(len(y), 3, generator=g) + 100.0      # raw features far from zero mean
    w1, b1, loss1 = fit_linear_head(x, y, 3, steps=100, l2=1e-4)
    w2, b2, _ = fit_linear_head(x, y, 3, steps=100, l2=1e-4)
    pred = torch.argmax(x @ w1.T + b1, 1)
    for c in range(3):  # class balancing: the rare classes are found too
        assert float((pred[y == c] == c).float().mean()) > 0.95
    assert torch.equal(w1, w2) and torch.equal(b1, b2)
    prior = torch.tensor([0.7, 0.2, 0.1])   # Bayes' rule: the prior moves only the bias, by log prior
    w3, b3, _ = fit_linear_head(x, y, 3, steps=100, l2=1e-4, prior=prior)
    assert torch.equal(w3, w1)
    torch.testing.assert_close(b3 - b1, torch.log(prior))
    assert loss1 < math.log(3) / 4


def test_dice_per_class():
    from nnunet_alice.probe.cli import dice_per_class

    ref = np.zeros((4, 4, 4), int)
    ref[:2] = 1
    ref[3, 0, 0] = -1                      # ignored voxel: predicted 2, but does not count
    pred = np.zeros_like(ref)
    pred[:1] = 1
    pred[3, 0, 0] = 2
    d = dice_per_class(pred, ref, 4)
    assert d[0] == pytest.approx(2 * 16 / (2 * 16 + 16))
    assert math.isnan(d[1]) and math.isnan(d[2])   # absent from both reference and prediction


# ---------------------------------------------------------------------------------------------- dataset helpers
def _use(monkeypatch, ds, raw=None, preprocessed=None):
    monkeypatch.setenv("nnUNet_raw", str(raw or ds.raw))
    monkeypatch.setenv("nnUNet_preprocessed", str(preprocessed or ds.preprocessed))
    monkeypatch.setenv("nnUNet_results", str(ds.results))


def _copy_preprocessed(ds, tmp_path: Path, keep=None, drop_segs=False) -> Path:
    """A copy of the fixture's preprocessed dataset (optionally only cases ``keep``, or without segmentations)."""
    root = tmp_path / "pre"
    dst = root / ds.dataset_name
    shutil.copytree(ds.preprocessed_dataset, dst)
    data = dst / "nnUNetPlans_3d_fullres"
    for f in list(data.iterdir()):
        case = f.name.split(".")[0].removesuffix("_seg")
        if (keep is not None and case not in keep) or (drop_segs and f.name.endswith("_seg.b2nd")):
            f.unlink()
    return root


def _save_planned_checkpoint(ds, path: Path, seed: int, with_metadata=True, state=None) -> Path:
    """A checkpoint of the fixture's planned network (nnU-Net init under ``seed``) in the package's format."""
    from nnunet_alice.checkpoint import make_payload, network_state_dict, save_checkpoint
    from nnunet_alice.pretrain.data.cases import load_plans
    from nnunet_alice.pretrain.training.metadata import architecture_of
    from nnunet_alice.probe.features import build_probe_network

    _, pm, cm, dj = load_plans(ds.dataset_name, PLANS, CONFIG)
    net = build_probe_network(pm, cm, dj, "random", seed)
    meta = {**architecture_of(cm), "num_input_channels": 1} if with_metadata else None
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(str(path), make_payload(state or network_state_dict(net), meta, {}))
    return path


def _files(folder: Path):
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


# ---------------------------------------------------------------------------------------------- the probe
def test_probe_random_and_checkpoint_cli(synth_dataset, tmp_path, monkeypatch, capsys):
    ds = synth_dataset
    _use(monkeypatch, ds)
    proc = ds.run(["alice_probe", "-d", ds.dataset_id, "-c", CONFIG, "--checkpoint", "random", "--labels", 1,
                   "--seed", 3] + FAST_CLI)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1
    res = json.loads(lines[0])
    out = ds.results / ds.dataset_name / f"AliceProbe__{PLANS}__{CONFIG}" / "probe_K1_seed3.json"
    assert res["output"] == str(out) and json.loads(out.read_text()) == res
    assert res["checkpoint"] == "random" and res["sha256"] is None
    assert res["labels"] == 1 and res["seed"] == 3 and res["features"] == "decoder"
    assert set(res["dice"]) == {"organ1", "organ2"} and len(res["train_cases"]) == 1
    assert res["test_source"] == "imagesTs/labelsTs" and res["test_cases"] == ["synth_004"]
    assert 0.0 <= res["mean_dice"] <= 1.0
    assert res["mean_dice"] == pytest.approx(np.mean([v for v in res["dice"].values()]))

    from nnunet_alice.checkpoint import sha256_of_file

    ckpt = _save_planned_checkpoint(ds, tmp_path / "ck" / "checkpoint_final.pth", seed=11)
    from nnunet_alice.probe.cli import main   # in-process from here on: the imports are paid once

    capsys.readouterr()
    main(["-d", ds.dataset_name, "-c", CONFIG, "--checkpoint", str(ckpt), "--labels", "all", "--features", "encoder",
          "-q"] + [str(a) for a in FAST_CLI])
    out = capsys.readouterr()
    assert out.err == ""   # -q: no progress lines
    res2 = json.loads(out.out)
    assert res2["checkpoint"] == str(ckpt) and res2["sha256"] == sha256_of_file(str(ckpt))
    assert res2["labels"] == 4 and res2["features"] == "encoder" and res2["num_features"] > res["num_features"]
    assert (tmp_path / "ck" / "probe_K4_seed0_encoder.json").is_file()


def test_probe_deterministic_by_seed(synth_dataset, monkeypatch):
    from nnunet_alice.probe.cli import probe_checkpoint

    _use(monkeypatch, synth_dataset)
    runs = [probe_checkpoint(synth_dataset.dataset_name, CONFIG, PLANS, "random", 2, seed, write=False, **FAST)
            for seed in (5, 5, 6)]
    keys = ("mean_dice", "dice", "per_case", "train_cases", "head_loss", "voxels")
    assert {k: runs[0][k] for k in keys} == {k: runs[1][k] for k in keys}
    assert runs[0]["output"] is None
    assert runs[2]["head_loss"] != runs[0]["head_loss"]   # another seed: other init, cases and voxels


def test_probe_holds_out_training_cases_without_test_set(synth_dataset, tmp_path, monkeypatch):
    from nnunet_alice.probe.cli import probe_checkpoint

    (tmp_path / "raw").mkdir()
    _use(monkeypatch, synth_dataset, raw=tmp_path / "raw")
    res = probe_checkpoint(synth_dataset.dataset_name, CONFIG, PLANS, "random", "all", 0, write=False, **FAST)
    assert res["test_source"] == "held-out training cases"
    assert res["test_cases"] == ["synth_003"] and sorted(res["train_cases"]) == ["synth_000", "synth_001",
                                                                                 "synth_002"]


# ---------------------------------------------------------------------------------------------- bad input
def _expect_cli_error(ds, capsys, args, match: str) -> str:
    """``alice_probe ARGS`` (in-process) exits 2 with one line on stderr that contains ``match``."""
    from nnunet_alice.probe.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["-d", str(ds.dataset_id), "-c", CONFIG] + [str(a) for a in args])
    out = capsys.readouterr()
    assert exc.value.code == 2, out.err
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], out.err
    assert out.out.strip() == ""
    return lines[0]


def test_bad_checkpoint_for_another_network(synth_dataset, tmp_path, monkeypatch, capsys):
    from nnunet_alice.checkpoint import make_payload, save_checkpoint

    ds = synth_dataset
    _use(monkeypatch, ds)
    folder = tmp_path / "other"
    folder.mkdir()
    tiny = build_tiny_unet(tiny_arch_kwargs(), num_classes=3)
    save_checkpoint(str(folder / "meta.pth"), make_payload(tiny.state_dict(), tiny_metadata(), {}))
    save_checkpoint(str(folder / "bare.pth"), make_payload(tiny.state_dict(), None, {}))
    before = _files(folder)
    _expect_cli_error(ds, capsys, ["--checkpoint", folder / "meta.pth", "--labels", 1], "does not fit this plan")
    _expect_cli_error(ds, capsys, ["--checkpoint", folder / "bare.pth", "--labels", 1],
                      "weights do not fit the network")
    assert _files(folder) == before


def test_bad_labels_larger_than_labelled_cases(synth_dataset, tmp_path, monkeypatch, capsys):
    _use(monkeypatch, synth_dataset)
    ckpt = _save_planned_checkpoint(synth_dataset, tmp_path / "checkpoint_final.pth", seed=0)
    before = _files(tmp_path)
    _expect_cli_error(synth_dataset, capsys, ["--checkpoint", ckpt, "--labels", 5], "--labels 5 is larger than")
    assert _files(tmp_path) == before


def test_bad_no_test_cases_and_no_room(synth_dataset, tmp_path, monkeypatch):
    from nnunet_alice.errors import AliceError
    from nnunet_alice.probe.cli import probe_checkpoint

    pre = _copy_preprocessed(synth_dataset, tmp_path, keep={"synth_000"})
    (tmp_path / "raw").mkdir()
    _use(monkeypatch, synth_dataset, raw=tmp_path / "raw", preprocessed=pre)
    before = _files(synth_dataset.results)
    with pytest.raises(AliceError, match="no test cases .* no room to hold any out"):
        probe_checkpoint(synth_dataset.dataset_name, CONFIG, PLANS, "random", 1, 0)
    assert _files(synth_dataset.results) == before


def test_bad_dataset_without_labels(synth_dataset, tmp_path, monkeypatch):
    from nnunet_alice.errors import AliceError
    from nnunet_alice.probe.cli import probe_checkpoint

    pre = _copy_preprocessed(synth_dataset, tmp_path, drop_segs=True)
    _use(monkeypatch, synth_dataset, preprocessed=pre)
    with pytest.raises(AliceError, match="has no labels"):
        probe_checkpoint(synth_dataset.dataset_name, CONFIG, PLANS, "random", 1, 0)
    dj = pre / synth_dataset.dataset_name / "dataset.json"
    meta = json.loads(dj.read_text())
    meta["labels"] = {"background": 0}
    dj.write_text(json.dumps(meta))
    before = _files(synth_dataset.results)
    with pytest.raises(AliceError, match="has no labels"):
        probe_checkpoint(synth_dataset.dataset_name, CONFIG, PLANS, "random", 1, 0)
    assert _files(synth_dataset.results) == before


# ---------------------------------------------------------------------------------------------- sanity
def _supervised_checkpoint(ds, path: Path, steps: int) -> Path:
    """The fixture's planned network after ``steps`` Adam steps of cross-entropy on the 4 training cases (whole
    cases cropped/padded to the patch): a feature extractor that knows the organs, unlike the random init."""
    from nnunet_alice.checkpoint import make_payload, network_state_dict, save_checkpoint
    from nnunet_alice.pretrain.training.metadata import architecture_of
    from nnunet_alice.probe.cases import ProbeData
    from nnunet_alice.probe.features import build_probe_network

    data = ProbeData(ds.dataset_name, PLANS, CONFIG)
    cm = data.configuration_manager
    net = build_probe_network(data.plans_manager, cm, data.dataset_json, "random", 0).train()
    for p in net.parameters():
        p.requires_grad_(True)
    patch = [int(p) for p in cm.patch_size]
    xs, ys = torch.zeros((len(data.pool), 1, *patch)), torch.zeros((len(data.pool), *patch), dtype=torch.long)
    for i, case in enumerate(data.pool):
        image, seg = data.load_training(case)
        box = tuple(slice(0, min(s, p)) for s, p in zip(image.shape[1:], patch))
        xs[(i, slice(None), *box)] = torch.from_numpy(image[(slice(None), *box)])
        ys[(i, *box)] = torch.from_numpy(data.class_index(seg)[box])
    torch.manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(steps):
        idx = torch.randperm(len(xs))[:2]
        loss = F.cross_entropy(net(xs[idx]), ys[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_checkpoint(str(path), make_payload(network_state_dict(net), {**architecture_of(cm), "num_input_channels": 1},
                                            {}))
    return path


@pytest.mark.slow
def test_probe_prefers_a_network_that_knows_the_organs(synth_dataset, tmp_path, monkeypatch):
    from nnunet_alice.probe.cli import probe_checkpoint

    _use(monkeypatch, synth_dataset)
    ckpt = _supervised_checkpoint(synth_dataset, tmp_path / "supervised.pth", steps=15)
    scores = {c: probe_checkpoint(synth_dataset.dataset_name, CONFIG, PLANS, c, 1, 0, write=False)["mean_dice"]
              for c in ("random", str(ckpt))}
    assert scores[str(ckpt)] > scores["random"] + 0.15, scores
