"""Input-channel adaptation: a 1-channel checkpoint fine-tunes on a 2- or 4-channel dataset (first convolution
repeated over the channels and scaled by 1/n, nnssl-style); every other mismatch stays an error."""
from __future__ import annotations

import copy

import pytest
import torch

from alice_trainer_utils import make_trainer, synthetic_batch, trainer_box  # noqa: F401 (fixture)
from conftest import PLAIN_CLASS, build_tiny_unet, tiny_arch_kwargs, tiny_metadata
from nnunet_alice.checkpoint import make_payload, network_state_dict, save_checkpoint
from nnunet_alice.compat import adapt_input_channels, channel_adaptation_problem, in_proj_weight_keys
from nnunet_alice.errors import AliceError
from nnunet_alice.trainers.pretrained import load_pretrained_into

FIRST_CONV = "encoder.stages.0.0.convs.0.conv.weight"


def _save(tmp_path, net, in_channels=1, name="c.pth", meta=True):
    path = str(tmp_path / name)
    if meta:
        save_checkpoint(path, make_payload(network_state_dict(net), tiny_metadata(in_channels=in_channels), {}))
    else:  # bare weights, e.g. converted from another framework
        save_checkpoint(path, {"network_weights": network_state_dict(net)})
    return path


def test_in_proj_keys_include_the_aliases():
    net = build_tiny_unet()
    keys = in_proj_weight_keys(net.keys_to_in_proj, net.state_dict())
    assert sorted(keys) == sorted([FIRST_CONV, "encoder.stages.0.0.convs.0.all_modules.0.weight",
                                   "decoder.encoder.stages.0.0.convs.0.conv.weight",
                                   "decoder.encoder.stages.0.0.convs.0.all_modules.0.weight"])


@pytest.mark.parametrize("n", [2, 4])
def test_adapted_filter_is_repeated_and_scaled(n):
    torch.manual_seed(0)
    src = build_tiny_unet(in_channels=1).state_dict()
    tgt = build_tiny_unet(in_channels=n).state_dict()
    out, adapted = adapt_input_channels(src, tgt, build_tiny_unet().keys_to_in_proj)
    assert len(adapted) == 4 and FIRST_CONV in adapted
    w = out[FIRST_CONV]
    assert w.shape == tgt[FIRST_CONV].shape
    for c in range(n):
        assert torch.allclose(w[:, c:c + 1], src[FIRST_CONV] / n)
    assert torch.allclose(w.sum(dim=1, keepdim=True), src[FIRST_CONV], atol=1e-6)
    assert out["encoder.stages.0.0.convs.0.conv.bias"] is src["encoder.stages.0.0.convs.0.conv.bias"]


@pytest.mark.parametrize("n", [2, 4])
def test_adapted_network_sees_a_repeated_image_like_the_pretrained_one(tmp_path, n):
    torch.manual_seed(1)
    pretrained = build_tiny_unet(in_channels=1, num_classes=1).eval()
    path = _save(tmp_path, pretrained)
    target = build_tiny_unet(in_channels=n, num_classes=3).eval()
    logs = []
    loaded = load_pretrained_into(target, path, PLAIN_CLASS, tiny_arch_kwargs(), n, log=logs.append,
                                  adapt_input_channels=True)
    assert loaded == len([k for k in target.state_dict() if ".seg_layers." not in k])
    assert f"input channels adapted 1 -> {n}" in logs[0] and f"scaled by 1/{n}" in logs[0] and FIRST_CONV in logs[0]
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        a = pretrained.encoder(x)[-1]
        b = target.encoder(x.repeat(1, n, 1, 1, 1))[-1]
    assert torch.allclose(a, b, atol=1e-4)


def test_without_the_flag_a_channel_difference_stays_an_error(tmp_path):
    path = _save(tmp_path, build_tiny_unet(num_classes=1))
    with pytest.raises(AliceError, match="num_input_channels"):
        load_pretrained_into(build_tiny_unet(in_channels=2), path, PLAIN_CLASS, tiny_arch_kwargs(), 2,
                             log=lambda s: None)


def test_only_one_channel_checkpoints_are_adapted(tmp_path):
    path = _save(tmp_path, build_tiny_unet(in_channels=2, num_classes=1), in_channels=2)
    target = build_tiny_unet(in_channels=4)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(AliceError) as ei:
        load_pretrained_into(target, path, PLAIN_CLASS, tiny_arch_kwargs(), 4, log=lambda s: None,
                             adapt_input_channels=True)
    msg = str(ei.value)
    assert "num_input_channels: checkpoint 2 vs dataset 4" in msg and "only 1-channel checkpoints" in msg
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())
    assert channel_adaptation_problem(1, 3, ()) is not None  # no keys_to_in_proj: nothing to adapt


def test_other_differences_stay_errors_when_channels_are_adapted(tmp_path):
    path = _save(tmp_path, build_tiny_unet(num_classes=1))
    kw = tiny_arch_kwargs(features=(4, 8, 32))
    with pytest.raises(AliceError) as ei:
        load_pretrained_into(build_tiny_unet(kw, in_channels=2), path, PLAIN_CLASS, kw, 2, log=lambda s: None,
                             adapt_input_channels=True)
    assert "arch_kwargs.features_per_stage" in str(ei.value) and "num_input_channels" not in str(ei.value)


def test_checkpoint_without_metadata_is_adapted_from_its_weight_shape(tmp_path):
    path = _save(tmp_path, build_tiny_unet(num_classes=1), meta=False)
    logs = []
    load_pretrained_into(build_tiny_unet(in_channels=4), path, PLAIN_CLASS, tiny_arch_kwargs(), 4, log=logs.append,
                         adapt_input_channels=True)
    assert "input channels adapted 1 -> 4" in logs[0]


# ---------------------------------------------------------------------------------------------- the trainer
@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 4])
def test_trainer_fine_tunes_a_multichannel_dataset_from_a_one_channel_checkpoint(trainer_box, monkeypatch, tmp_path,
                                                                                  n):
    from nnunet_alice.trainers import nnUNetTrainerAlice_tiny

    box, ckpt = trainer_box
    dataset_json = box.dataset_json()
    dataset_json["channel_names"] = {str(i): f"MR{i}" for i in range(n)}
    trainer = make_trainer(nnUNetTrainerAlice_tiny, box, monkeypatch, pretrained=ckpt, dataset_json=dataset_json,
                           results=tmp_path / "results")
    trainer.initialize()
    trainer.load_alice_weights()
    log = open(trainer.log_file).read()
    assert "alice_doctor: WILL LOAD" in log
    assert f"input channels adapted 1 -> {n}" in log and f"scaled by 1/{n}" in log
    w = trainer.network.state_dict()[FIRST_CONV].clone()
    src = torch.load(ckpt, weights_only=True)["network_weights"][FIRST_CONV]
    assert w.shape[1] == n and torch.allclose(w, src.repeat(1, n, 1, 1, 1) / n)
    trainer.on_train_epoch_start()
    loss = trainer.train_step(synthetic_batch(trainer))["loss"]
    assert float(loss) == float(loss)  # finite: a fine-tuning step on n channels works
    assert not torch.equal(trainer.network.state_dict()[FIRST_CONV], w)
