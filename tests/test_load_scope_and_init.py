"""What fine-tuning loads (load scope ``encoder`` / ``all``: exact keys and counts) and init-matched starts (the
benchmark's scratch arm and ``alice_pretrain --init-weights`` begin from bit-identical weights for a seed)."""
from __future__ import annotations

import pytest
import torch

import alice_trainer_utils
from alice_trainer_utils import make_trainer
from conftest import PLAIN_CLASS, tiny_arch_kwargs, tiny_metadata
from nnunet_alice.checkpoint import make_payload, network_state_dict, save_checkpoint
from nnunet_alice.compat import SEG_LAYER_TAG
from nnunet_alice.errors import AliceError
from nnunet_alice.pretrain.model import unwrap
from nnunet_alice.trainers.pretrained import in_load_scope, load_pretrained_into

trainer_box = alice_trainer_utils.trainer_box  # the module-scoped fixture, found by pytest by this name


def _save(tmp_path, net):
    path = str(tmp_path / "ckpt.pth")
    save_checkpoint(path, make_payload(network_state_dict(net), tiny_metadata(), {}))
    return path


@pytest.mark.parametrize("scope", ["encoder", "all"])
def test_load_scope_loads_exactly_the_expected_keys(tmp_path, tiny_unet, scope):
    torch.manual_seed(0)
    pretrained = tiny_unet(num_classes=1)
    path = _save(tmp_path, pretrained)
    torch.manual_seed(1)
    target = tiny_unet(num_classes=3)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    logs = []
    n = load_pretrained_into(target, path, PLAIN_CLASS, tiny_arch_kwargs(), 1, log=logs.append, scope=scope)

    src, tgt = pretrained.state_dict(), target.state_dict()
    # expected names from the module tree: the encoder's own keys under both of its names
    encoder = {f"{prefix}{k}" for k in target.encoder.state_dict() for prefix in ("encoder.", "decoder.encoder.")}
    non_seg = {k for k in tgt if SEG_LAYER_TAG not in k}
    assert encoder < non_seg and any(k.startswith("decoder.stages.") for k in non_seg - encoder)
    expected = encoder if scope == "encoder" else non_seg
    assert n == len(expected)
    assert all(torch.equal(tgt[k], src[k]) for k in expected)
    assert all(torch.equal(tgt[k], before[k]) for k in set(tgt) - expected)  # the rest keeps its initial weights
    assert {k for k in tgt if not torch.equal(tgt[k], before[k])} <= expected
    assert any(not torch.equal(tgt[k], src[k]) for k in non_seg - expected) == (scope == "encoder")
    assert f"loaded {n} of {len(tgt)} tensors (load scope {scope};" in logs[0]
    assert {k for k in tgt if in_load_scope(k, scope)} == expected


def test_unknown_scope_is_refused_before_anything_is_loaded(tmp_path, tiny_unet):
    path = _save(tmp_path, tiny_unet(num_classes=1))
    target = tiny_unet(num_classes=3)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(AliceError, match="unknown load scope 'decoder'"):
        load_pretrained_into(target, path, PLAIN_CLASS, tiny_arch_kwargs(), 1, log=lambda s: None, scope="decoder")
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_trainer_load_scope_default_env_and_plans(trainer_box, monkeypatch, tmp_path, capsys):
    from nnunet_alice.trainers import nnUNetTrainerAlice_tiny

    box, ckpt = trainer_box
    source = torch.load(ckpt, weights_only=True)["network_weights"]
    counts = {}
    for scope in ("default", "all", "encoder"):
        if scope == "default":
            monkeypatch.delenv("nnUNet_alice_load", raising=False)
        else:
            monkeypatch.setenv("nnUNet_alice_load", scope)
        t = make_trainer(nnUNetTrainerAlice_tiny, box, monkeypatch, pretrained=ckpt, results=tmp_path / scope)
        t.initialize()
        before = {k: v.clone() for k, v in unwrap(t.network).state_dict().items()}
        t.load_alice_weights()
        sd = unwrap(t.network).state_dict()
        want = {f"{p}{k}" for k in unwrap(t.network).encoder.state_dict() for p in ("encoder.", "decoder.encoder.")}
        if scope == "all":
            want = {k for k in sd if SEG_LAYER_TAG not in k}
        assert all(torch.equal(sd[k], source[k]) for k in want)
        assert all(torch.equal(sd[k], before[k]) for k in set(sd) - want)
        assert t.alice_tensors_loaded == len(want)
        counts[scope] = len(want)
        log = open(t.log_file).read()
        assert f"Alice: loaded {len(want)} of {len(sd)} tensors (load scope {t.load_scope};" in log
    assert counts["default"] == counts["encoder"] < counts["all"] == 182  # the tiny plans: 188 tensors, 6 seg
    plans = box.plans()
    plans["alice_load_scope"], plans["continue_training"] = "all", False
    monkeypatch.delenv("nnUNet_alice_load")
    t = nnUNetTrainerAlice_tiny(plans, "3d_fullres", 0, box.dataset_json(), torch.device("cpu"))
    assert (t.load_scope, t.load_scope_source) == ("all", "plans entry 'alice_load_scope'")
    monkeypatch.setenv("nnUNet_alice_load", "decoder")
    with pytest.raises(SystemExit):
        make_trainer(nnUNetTrainerAlice_tiny, box, monkeypatch, results=tmp_path / "bad")
    assert "error: nnUNet_alice_load: load scope must be one of encoder, all, got 'decoder'" in capsys.readouterr().err


def test_init_matched_weights_are_bit_identical(trainer_box, monkeypatch, tmp_path):
    """The benchmark's scratch arm and pretraining start from the same tensors for a seed (and not for another)."""
    from alice_sandbox import TINY_PLANS, pretrain_config
    from nnunet_alice.pretrain.training.run import PretrainRun
    from nnunet_alice.harness.steps import write_init
    from nnunet_alice.harness.trainers import nnUNetTrainerAlice_bench

    box, _ = trainer_box
    box.apply(monkeypatch)
    files = {s: write_init(str(box.dataset_id), TINY_PLANS, "3d_fullres", s, str(tmp_path / f"init_{s}.pth"))
             for s in (3, 4)}

    monkeypatch.setenv("nnUNet_alice_bench_init", files[3])
    monkeypatch.setenv("nnUNet_alice_bench_seed", "5")  # another trainer seed: the file, not the seed, decides
    scratch = make_trainer(nnUNetTrainerAlice_bench, box, monkeypatch, pretrained="none", results=tmp_path / "s")
    scratch.initialize()
    drawn = {k: v.clone() for k, v in unwrap(scratch.network).state_dict().items()}
    scratch.load_alice_weights()  # the bench trainer loads its initial weights first
    start = unwrap(scratch.network).state_dict()

    run = PretrainRun(pretrain_config(box, "mae", steps=1, seed=3, init_weights=files[3]),
                      output_folder=str(tmp_path / "pre"))
    pre = unwrap(run.network).state_dict()
    shared = [k for k in start if SEG_LAYER_TAG not in k]
    assert shared and set(shared) <= set(pre)
    assert all(torch.equal(start[k], pre[k]) for k in shared)  # bit-identical, every tensor but the output layers
    stored = torch.load(files[3], weights_only=True)["network_weights"]
    assert all(torch.equal(start[k], stored[k]) for k in start)  # the scratch arm: every tensor, seg layers too
    assert any(not torch.equal(start[k], drawn[k]) for k in shared)  # it was not already the trainer's own draw
    other = torch.load(files[4], weights_only=True)["network_weights"]
    assert all(not torch.equal(stored[k], other[k]) for k in shared if k.endswith("conv.weight"))
    assert any("initial weights: " in n and files[3] in n for n in run.notes)

    # the same seed gives the same file; a file for another network is refused in one line
    again = write_init(str(box.dataset_id), TINY_PLANS, "3d_fullres", 3, str(tmp_path / "again.pth"))
    assert all(torch.equal(v, torch.load(again, weights_only=True)["network_weights"][k]) for k, v in stored.items())
    with pytest.raises(AliceError, match="initial weights do not fit the network") as ei:
        PretrainRun(pretrain_config(box, "mae", steps=1, plans="nnUNetPlans", init_weights=files[3]),
                    output_folder=str(tmp_path / "pre2"))
    assert "\n" not in str(ei.value) and files[3] in str(ei.value)
