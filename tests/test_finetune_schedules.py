"""Fine-tuning schedules: frozen-then-unfrozen encoder and a lower encoder learning rate, through
nnUNetTrainer_warmup's optimizer re-creation at epoch 0 and at the warm-up switch, and through ``--c``."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from alice_sandbox import TINY_PLANS
from alice_trainer_utils import make_trainer, synthetic_batch, trainer_box, write_malicious_checkpoint  # noqa: F401
from nnunet_alice.errors import AliceError
from nnunet_alice.pretrain.model import unwrap
from nnunet_alice.trainers import (nnUNetTrainerAlice_encLR, nnUNetTrainerAlice_encLR_tiny,
                                   nnUNetTrainerAlice_frozenEncoder, nnUNetTrainerAlice_frozenEncoder_tiny,
                                   nnUNetTrainerAlice_tiny)

pytestmark = pytest.mark.slow
NEW = ["nnUNetTrainerAlice_frozenEncoder", "nnUNetTrainerAlice_frozenEncoder_tiny", "nnUNetTrainerAlice_encLR",
       "nnUNetTrainerAlice_encLR_tiny"]


def groups(trainer):
    return {g["alice_group"]: g for g in trainer.optimizer.param_groups}


def encoder_params(trainer):
    return list(unwrap(trainer.network).encoder.parameters())


def snapshot(params):
    return [p.detach().clone() for p in params]


def changed(before, params) -> bool:
    return any(not torch.equal(a, p.detach()) for a, p in zip(before, params))


def start_epoch(trainer, epoch: int) -> None:
    trainer.current_epoch = epoch
    trainer.on_train_epoch_start()


@pytest.fixture
def frozen(trainer_box, monkeypatch, tmp_path):
    box, ckpt = trainer_box
    t = make_trainer(nnUNetTrainerAlice_frozenEncoder_tiny, box, monkeypatch, pretrained=ckpt,
                     results=tmp_path / "results")
    t.initialize()
    return t


def test_new_trainers_are_exported_and_found_by_name():
    import nnunet_alice.trainers as trainers
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    assert set(NEW) <= set(trainers.__all__)
    for name in NEW:
        assert recursive_find_trainer_class_by_name(name).__name__ == name


def test_parameter_groups_hold_every_parameter_once(frozen):
    g = groups(frozen)
    assert [x["alice_group"] for x in frozen.optimizer.param_groups] == ["decoder", "encoder"]  # group 0 is logged
    all_ids = [id(p) for x in frozen.optimizer.param_groups for p in x["params"]]
    assert len(all_ids) == len(set(all_ids)) == len(list(frozen.network.parameters()))
    assert {id(p) for p in g["encoder"]["params"]} == {id(p) for p in encoder_params(frozen)}


def test_frozen_encoder_trains_only_the_decoder_until_it_is_unfrozen(frozen):
    assert (frozen.freeze_encoder_epochs, frozen.unfreeze_ramp_epochs, frozen.warmup_duration_whole_net) == (1, 1, 1)
    enc = encoder_params(frozen)
    dec = list(unwrap(frozen.network).decoder.seg_layers.parameters())

    start_epoch(frozen, 0)  # warm-up, encoder frozen
    g = groups(frozen)
    assert g["encoder"]["lr"] == 0.0 and g["decoder"]["lr"] == pytest.approx(frozen.initial_lr)
    e0, d0 = snapshot(enc), snapshot(dec)
    frozen.train_step(synthetic_batch(frozen))
    assert not changed(e0, enc) and changed(d0, dec)
    assert all("momentum_buffer" in frozen.optimizer.state[p] for p in enc)  # gathered while frozen ...

    optimizer = frozen.optimizer
    start_epoch(frozen, 1)  # warm-up switch (optimizer kept) and unfreezing
    assert frozen.training_stage == "train" and frozen.optimizer is optimizer
    g = groups(frozen)
    assert g["encoder"]["lr"] == pytest.approx(g["decoder"]["lr"]) and g["encoder"]["lr"] > 0
    assert not any("momentum_buffer" in frozen.optimizer.state[p] for p in enc)  # ... and dropped here
    e1 = snapshot(enc)
    frozen.train_step(synthetic_batch(frozen, seed=1))
    assert changed(e1, enc)

    start_epoch(frozen, 2)
    g = groups(frozen)
    assert g["encoder"]["lr"] == pytest.approx(g["decoder"]["lr"]) and g["decoder"]["lr"] < frozen.initial_lr
    log = open(frozen.log_file).read()
    assert "Alice: encoder frozen (epoch 0 of the first 1)" in log and "Alice: encoder unfrozen at epoch 1" in log


def test_unfreezing_ramps_the_encoder_learning_rate(trainer_box, monkeypatch, tmp_path):
    box, _ = trainer_box
    t = make_trainer(nnUNetTrainerAlice_frozenEncoder, box, monkeypatch, results=tmp_path / "r")
    assert (t.num_epochs, t.freeze_encoder_epochs, t.unfreeze_ramp_epochs) == (1000, 50, 50)
    t.freeze_encoder_epochs, t.unfreeze_ramp_epochs = 2, 4
    assert [t.encoder_lr_scale(e) for e in range(8)] == [0, 0, 0.25, 0.5, 0.75, 1, 1, 1]


def test_encoder_learning_rate_is_a_fixed_fraction_across_the_warmup_switch(trainer_box, monkeypatch, tmp_path):
    box, ckpt = trainer_box
    t = make_trainer(nnUNetTrainerAlice_encLR_tiny, box, monkeypatch, pretrained=ckpt, results=tmp_path / "r")
    t.initialize()
    for epoch in (0, 1):  # epoch 0: warm-up optimizer; epoch 1: the switch to poly
        start_epoch(t, epoch)
        g = groups(t)
        assert g["encoder"]["lr"] == pytest.approx(0.1 * g["decoder"]["lr"]) and g["decoder"]["lr"] > 0
        t.train_step(synthetic_batch(t, seed=epoch))
    assert make_trainer(nnUNetTrainerAlice_encLR, box, monkeypatch, results=tmp_path / "r2").encoder_lr_factor == 0.1


def test_continue_restores_groups_stage_and_momentum(frozen, trainer_box, monkeypatch, tmp_path):
    box, ckpt = trainer_box
    for epoch in (0, 1):
        start_epoch(frozen, epoch)
        frozen.train_step(synthetic_batch(frozen, seed=epoch))
        frozen.logger.log("train_losses", np.float64(0.5), epoch)  # numpy values, as nnU-Net logs them
        frozen.logger.log("mean_fg_dice", np.float32(0.25), epoch)
    frozen._best_ema = np.float64(0.25)
    frozen.current_epoch = 1
    path = os.path.join(frozen.output_folder, "checkpoint_latest.pth")
    frozen.save_checkpoint(path)  # stores current_epoch + 1 = 2

    again = make_trainer(nnUNetTrainerAlice_frozenEncoder_tiny, box, monkeypatch, pretrained=ckpt,
                         continue_training=True, results=tmp_path / "results")
    again.load_checkpoint(path)
    assert again.current_epoch == 2 and again.training_stage == "train"
    assert [g["alice_group"] for g in again.optimizer.param_groups] == ["decoder", "encoder"]
    for p_old, p_new in zip(encoder_params(frozen), encoder_params(again)):
        assert torch.equal(frozen.optimizer.state[p_old]["momentum_buffer"],
                           again.optimizer.state[p_new]["momentum_buffer"])
    start_epoch(again, 2)
    g = groups(again)
    assert g["encoder"]["lr"] == pytest.approx(g["decoder"]["lr"]) and g["encoder"]["lr"] > 0
    again.train_step(synthetic_batch(again, seed=2))


def test_continue_refuses_a_malicious_checkpoint(trainer_box, monkeypatch, tmp_path):
    box, _ = trainer_box
    path, marker = str(tmp_path / "checkpoint_latest.pth"), str(tmp_path / "pwned")
    write_malicious_checkpoint(path, marker)
    t = make_trainer(nnUNetTrainerAlice_tiny, box, monkeypatch, continue_training=True, results=tmp_path / "r")
    with pytest.raises(AliceError, match="refused to load") as ei:
        t.load_checkpoint(path)
    assert path in str(ei.value) and "\n" not in str(ei.value)
    assert not os.path.exists(marker)


def test_full_training_with_nnunet_then_continue(trainer_box, monkeypatch, tmp_path):
    """nnU-Net's own entry points (trainer lookup by name, run_training loop, --c loading of its checkpoint)."""
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    box, ckpt = trainer_box
    box.apply(monkeypatch)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_alice_pretrained", ckpt)
    name = "nnUNetTrainerAlice_frozenEncoder_tiny"
    t = get_trainer_from_args(str(box.dataset_id), "3d_fullres", 0, name, TINY_PLANS, False, torch.device("cpu"))
    maybe_load_checkpoint(t, False, False, None)
    t.run_training()
    final = os.path.join(t.output_folder, "checkpoint_final.pth")
    assert os.path.isfile(final)
    log = open(t.log_file).read()
    assert "alice_doctor: WILL LOAD" in log and "Alice: loaded 182 of 188 tensors" in log
    assert "Alice: encoder learning rate 0 (0 x decoder)" in log and "Alice: encoder unfrozen at epoch 1" in log

    again = get_trainer_from_args(str(box.dataset_id), "3d_fullres", 0, name, TINY_PLANS, True, torch.device("cpu"))
    maybe_load_checkpoint(again, True, False, None)  # nnU-Net's checkpoint, numpy logging: weights_only loads it
    assert again.current_epoch == 3 and again.training_stage == "train"
    again.run_training()  # nothing left to train; on_train_start must not reload the pretrained weights
    assert "Alice: resuming at epoch 3; pretrained weights not reloaded" in open(again.log_file).read()
    trained = unwrap(t.network).state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in unwrap(again.network).state_dict().items())
