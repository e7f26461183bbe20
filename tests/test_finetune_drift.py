"""benchmarks/finetune_drift.py: per-stage distances between initial, pretrained and fine-tuned weights."""
import numpy as np
import pytest
import torch

from benchmarks.finetune_drift import (conv_weights, drift_table, main, relative_distance,
                                       start_of_pretrained_arm, stage_of)


def _weights(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = {}
    for s in range(3):
        w[f"encoder.stages.{s}.0.convs.0.conv.weight"] = torch.randn(4, 4, 3, 3, 3, generator=g)
        w[f"encoder.stages.{s}.0.convs.0.norm.weight"] = torch.randn(4, generator=g)
    w["decoder.stages.0.convs.0.conv.weight"] = torch.randn(4, 8, 3, 3, 3, generator=g)
    w["decoder.transpconvs.0.weight"] = torch.randn(4, 4, 2, 2, 2, generator=g)
    w["decoder.seg_layers.0.weight"] = torch.randn(3, 4, 1, 1, 1, generator=g)
    for s in range(3):  # the decoder's reference to the encoder: the same tensors under a second name
        w[f"decoder.encoder.stages.{s}.0.convs.0.conv.weight"] = w[f"encoder.stages.{s}.0.convs.0.conv.weight"]
    return w


def test_stages_and_the_tensors_counted():
    assert stage_of("encoder.stages.3.0.convs.1.conv.weight") == "encoder.stages.3"
    assert stage_of("encoder.stem.convs.0.conv.weight") == "encoder.stem"
    assert stage_of("decoder.seg_layers.4.weight") == "decoder"
    keys = conv_weights(_weights())
    assert not any(k.startswith("decoder.encoder.") or k.endswith("norm.weight") for k in keys)
    assert len(keys) == 6


def test_relative_distance_is_the_norm_ratio():
    a, b = {"x": torch.tensor([[[3.0]]])}, {"x": torch.tensor([[[4.0]]])}
    assert relative_distance(a, b, ["x"]) == pytest.approx(0.25)
    assert relative_distance(b, b, ["x"]) == 0.0


def test_drift_table_recovers_known_moves():
    init = _weights(0)
    pre = {k: v.clone() for k, v in _weights(1).items()}
    start = start_of_pretrained_arm(init, pre, "encoder")
    # scope encoder: encoder tensors from the checkpoint, decoder and segmentation layers from init
    assert torch.equal(start["encoder.stages.1.0.convs.0.conv.weight"], pre["encoder.stages.1.0.convs.0.conv.weight"])
    assert torch.equal(start["decoder.stages.0.convs.0.conv.weight"], init["decoder.stages.0.convs.0.conv.weight"])
    assert torch.equal(start["decoder.seg_layers.0.weight"], init["decoder.seg_layers.0.weight"])
    scratch = {k: 1.5 * v for k, v in init.items()}           # every stage moved by exactly 0.5 of its norm
    finetuned = {k: v.clone() for k, v in start.items()}
    finetuned["encoder.stages.2.0.convs.0.conv.weight"] *= 0.9  # only stage 2 moved, by 0.1
    rows = {r[0]: r[1:] for r in drift_table(init, start, scratch, finetuned)}
    assert list(rows) == ["encoder.stages.0", "encoder.stages.1", "encoder.stages.2", "decoder"]
    for stage, (scratch_moved, pre_moved, pretraining_moved, end_gap) in rows.items():
        assert scratch_moved == pytest.approx(0.5)
        assert pre_moved == pytest.approx(0.1 if stage == "encoder.stages.2" else 0.0, abs=1e-7)
        assert (pretraining_moved == pytest.approx(0.0)) == (stage == "decoder")
    # the decoder kept its initial weights in the pretrained arm: the gap is scratch's move, seen from scratch
    assert rows["decoder"][3] == pytest.approx(0.5 / 1.5)


def test_cli_reads_nnunet_checkpoints_and_refuses_a_missing_file(tmp_path, capsys):
    init, pre = _weights(0), _weights(1)
    torch.save({"network_weights": init}, tmp_path / "init.pth")
    torch.save({"network_weights": pre}, tmp_path / "pre.pth")
    for name, w in (("scratch", init), ("tuned", pre)):  # nnU-Net keeps numpy scalars in its logging
        torch.save({"network_weights": w, "logging": {"ema_fg_dice": [np.float64(0.5)]}}, tmp_path / f"{name}.pth")
    args = ["--init", str(tmp_path / "init.pth"), "--pretrained", str(tmp_path / "pre.pth"),
            "--scratch", str(tmp_path / "scratch.pth"), "--finetuned", str(tmp_path / "tuned.pth")]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| stage | scratch moved")
    enc0 = next(line for line in out if line.startswith("| encoder.stages.0 |")).split("|")
    assert float(enc0[2]) == 0.0 and float(enc0[3]) == 0.0 and float(enc0[4]) > 0.5
    assert main(args[:-1] + [str(tmp_path / "absent.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "absent.pth" in err[0]
