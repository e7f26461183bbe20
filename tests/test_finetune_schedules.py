"""Fine-tuning recipe and schedules: the per-iteration learning rate (iteration 0, end of warm-up, after, for short
and long runs), the sawtooth and frozen-encoder stages (which parameters are frozen when), the encoder-LR
variant, nnU-Net's own schedule for the baseline, ``--c``, and refusals as one log line + exit 2."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from alice_sandbox import TINY_PLANS
import alice_trainer_utils
from alice_trainer_utils import make_trainer, synthetic_batch, write_malicious_checkpoint
from nnunet_alice.pretrain.model import unwrap
from nnunet_alice.trainers import (nnUNetTrainerAlice, nnUNetTrainerAlice_150epochs, nnUNetTrainerAlice_encLR_tiny,
                                   nnUNetTrainerAlice_frozenEncoder, nnUNetTrainerAlice_frozenEncoder_tiny,
                                   nnUNetTrainerAlice_nnUNetSchedule, nnUNetTrainerAlice_sawtooth,
                                   nnUNetTrainerAlice_sawtooth_tiny, nnUNetTrainerAlice_tiny)
from nnunet_alice.trainers.recipe import PerIterationLR, short_run_note, warmup_iterations, warmup_poly

trainer_box = alice_trainer_utils.trainer_box  # the module-scoped fixture, found by pytest by this name

NEW = ["nnUNetTrainerAlice_150epochs", "nnUNetTrainerAlice_sawtooth", "nnUNetTrainerAlice_sawtooth_150epochs",
       "nnUNetTrainerAlice_sawtooth_tiny", "nnUNetTrainerAlice_frozenEncoder", "nnUNetTrainerAlice_frozenEncoder_tiny",
       "nnUNetTrainerAlice_encLR", "nnUNetTrainerAlice_encLR_tiny", "nnUNetTrainerAlice_nnUNetSchedule"]


# ---------------------------------------------------------------------------------------------- pure schedule
@pytest.mark.parametrize("total,expected", [(0, 0), (1, 1), (4, 2), (60, 30), (100, 50), (400, 50), (1000, 100),
                                            (250_000, 25_000)])
def test_warmup_length_scales_with_the_run(total, expected):
    # 10 % of the run, at least 50 iterations, at most half the run
    assert warmup_iterations(total) == expected


def test_warmup_then_poly_factors():
    w, t = 4, 10
    f = [warmup_poly(i, 0, w, t) for i in range(t)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])      # iteration 0 > 0, end of warm-up = peak
    assert f[4] == 1.0 and all(a > b for a, b in zip(f[4:], f[5:]))  # poly starts at the peak and decays
    assert f[9] == pytest.approx((1 - 5 / 6) ** 0.9)
    assert warmup_poly(50, 0, w, t) == f[9]                     # past the end: the last value, never negative
    assert warmup_poly(7, 5, 2, 10) == pytest.approx(1 - 0 / 3)  # an offset start (second sawtooth tooth)


# ---------------------------------------------------------------------------------------------- trainers
def lr_trace(trainer, epochs=None, train=False):
    """The learning rate of every group at every iteration, as the optimizer sees it in ``optimizer.step``."""
    seen, step = [], trainer.optimizer.step

    def spy(*a, **kw):
        seen.append({g["alice_group"]: g["lr"] for g in trainer.optimizer.param_groups})
        return step(*a, **kw)

    trainer.optimizer.step = spy
    for epoch in range(trainer.num_epochs if epochs is None else epochs):
        trainer.current_epoch = epoch
        trainer.on_train_epoch_start()
        for it in range(trainer.num_iterations_per_epoch):
            if train:
                trainer.train_step(synthetic_batch(trainer, seed=100 * epoch + it))
            else:  # the LR logic of train_step without the network: apply, "step", advance
                trainer.lr_scheduler.apply()
                trainer.optimizer.step()
                trainer.lr_scheduler.advance()
    trainer.optimizer.step = step
    return seen


@pytest.fixture
def tiny(trainer_box, monkeypatch, tmp_path):
    def build(cls, **kw):
        box, ckpt = trainer_box
        t = make_trainer(cls, box, monkeypatch, pretrained=kw.pop("pretrained", ckpt), results=tmp_path / cls.__name__,
                         **kw)
        t.initialize()
        return t
    return build


def test_new_trainers_are_exported_and_found_by_name():
    import nnunet_alice.trainers as trainers
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    assert set(NEW) <= set(trainers.__all__)
    for name in NEW:
        assert recursive_find_trainer_class_by_name(name).__name__ == name


def test_short_run_learning_rate_per_iteration(tiny):
    t = tiny(nnUNetTrainerAlice_tiny)  # 2 epochs x 2 iterations: warm-up of 2 (half the run), then poly
    assert (t.initial_lr, t.total_iterations(), t.warmup_length()) == (1e-3, 4, 2)
    assert isinstance(t.lr_scheduler, PerIterationLR) and isinstance(t.optimizer, torch.optim.SGD)
    g = t.optimizer.param_groups[0]
    assert (g["momentum"], g["nesterov"], g["weight_decay"]) == (0.99, True, 3e-5)
    lrs = [x["all"] for x in lr_trace(t, train=True)]  # real training steps
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3 * 0.5 ** 0.9])
    log = open(t.log_file).read()
    assert "Current learning rate: 0.0005" in log and "Current learning rate: 0.001" in log  # epoch 1 starts at it 2


@pytest.mark.parametrize("cls,epochs,warmup", [(nnUNetTrainerAlice, 1000, 25_000),
                                               (nnUNetTrainerAlice_150epochs, 150, 3_750)])
def test_long_run_learning_rate_per_iteration(trainer_box, monkeypatch, tmp_path, cls, epochs, warmup):
    box, _ = trainer_box
    t = make_trainer(cls, box, monkeypatch, results=tmp_path / "r")
    total = epochs * 250
    assert (t.total_iterations(), t.warmup_length()) == (total, warmup)
    lr = lambda i: t.lr_of(i, "all")  # noqa: E731
    assert lr(0) == pytest.approx(1e-3 / warmup)                # iteration 0: not 0, not the peak
    assert lr(warmup // 2 - 1) == pytest.approx(0.5e-3)
    assert lr(warmup - 1) == pytest.approx(1e-3) == lr(warmup)  # end of warm-up, first poly iteration
    assert lr(warmup + 1) < 1e-3 and lr(total - 1) == pytest.approx(1e-3 * (1 / (total - warmup)) ** 0.9)
    # per iteration, not per epoch: the rate changes inside the first epoch
    assert lr(1) > lr(0) and lr(249) == pytest.approx(250 * lr(0))


def test_short_run_note_only_for_short_runs_at_the_default_peak():
    assert short_run_note(1000, "default") is not None and "nnUNet_alice_lr=1e-2" in short_run_note(1000, "default")
    assert short_run_note(1000, "nnUNet_alice_lr") is None           # the user chose the rate
    assert short_run_note(150 * 250, "default") is None              # nnUNetTrainerAlice_150epochs and longer
    assert short_run_note(150 * 250 - 1, "default") is not None


def test_learning_rate_from_environment_and_plans(trainer_box, monkeypatch, tmp_path, capsys):
    box, _ = trainer_box
    monkeypatch.setenv("nnUNet_alice_lr", "3e-4")
    t = make_trainer(nnUNetTrainerAlice_tiny, box, monkeypatch, results=tmp_path / "a")
    assert (t.initial_lr, t.lr_source) == (3e-4, "nnUNet_alice_lr")
    monkeypatch.delenv("nnUNet_alice_lr")
    plans = box.plans(TINY_PLANS)
    plans["alice_lr"] = 2e-3
    plans["continue_training"] = False
    t = nnUNetTrainerAlice_tiny(plans, "3d_fullres", 0, box.dataset_json(), torch.device("cpu"))
    assert t.initial_lr == 2e-3 and t.lr_source == "plans entry 'alice_lr'"
    monkeypatch.setenv("nnUNet_alice_lr", "fast")
    with pytest.raises(SystemExit) as ei:
        make_trainer(nnUNetTrainerAlice_tiny, box, monkeypatch, results=tmp_path / "c")
    assert ei.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: nnUNet_alice_lr: learning rate must be a number, got 'fast'"]
    logs = list((tmp_path / "c").rglob("training_log_*.txt"))
    assert logs and "error: nnUNet_alice_lr: learning rate must be a number" in logs[0].read_text()


def test_sawtooth_freezes_the_encoder_then_trains_everything(tiny):
    t = tiny(nnUNetTrainerAlice_sawtooth_tiny)  # 6 iterations, warm-up 3: decoder 0-2 (warm-up 1), whole 3-5
    assert t.sawtooth_lengths() == (3, 1, 3)
    net = unwrap(t.network)
    enc = list(net.encoder.parameters())
    enc_ids = {id(p) for p in enc}
    dec = [p for p in net.parameters() if id(p) not in enc_ids]
    assert dec and {id(p) for p in t.optimizer.param_groups[1]["params"]} == enc_ids
    states = []
    step = t.optimizer.step

    def spy(*a, **kw):  # which parameters train at each iteration, and which change
        before = [p.detach().clone() for p in net.parameters()]
        trace.append({g["alice_group"]: g["lr"] for g in t.optimizer.param_groups})
        states.append(({id(p) for p in net.parameters() if p.requires_grad},
                       {id(p) for p in net.parameters() if p.grad is not None}))
        out = step(*a, **kw)
        states[-1] += ({id(p) for p, b in zip(net.parameters(), before) if not torch.equal(p.detach(), b)},)
        return out

    t.optimizer.step = spy
    trace = []
    for epoch in range(3):
        t.current_epoch = epoch
        t.on_train_epoch_start()
        for it in range(2):
            t.train_step(synthetic_batch(t, seed=10 * epoch + it))
    dec_ids = {id(p) for p in dec}
    seg_ids = {id(p) for p in net.decoder.seg_layers.parameters()}  # nnU-Net weighs the lowest one 0: no gradient
    for i, (trainable, with_grad, moved) in enumerate(states):
        if i < 3:  # decoder stage: exactly the decoder (+ segmentation layers) trains, the encoder is frozen
            assert trainable == dec_ids and with_grad <= dec_ids and not (dec_ids - with_grad - seg_ids)
            assert moved and moved <= dec_ids
        else:      # whole network
            assert trainable == dec_ids | enc_ids and enc_ids <= with_grad and moved & enc_ids
    peak = 1e-3
    assert [x["encoder"] for x in trace] == pytest.approx([0, 0, 0, peak / 3, 2 * peak / 3, peak])
    assert [x["decoder"] for x in trace] == pytest.approx([peak, peak, peak * 0.5 ** 0.9, peak / 3, 2 * peak / 3,
                                                           peak])
    log = open(t.log_file).read()
    assert "Alice: encoder frozen from iteration 0" in log and "Alice: encoder unfrozen at iteration 3" in log
    assert t.describe_schedule().startswith("sawtooth: decoder only for 3 iterations (warm-up 1")


def test_long_sawtooth_stage_lengths(trainer_box, monkeypatch, tmp_path):
    box, _ = trainer_box
    t = make_trainer(nnUNetTrainerAlice_sawtooth, box, monkeypatch, results=tmp_path / "r")
    assert t.sawtooth_lengths() == (25_000, 12_500, 25_000)
    assert t.lr_of(0, "encoder") == 0 and t.lr_of(24_999, "encoder") == 0 and t.lr_of(25_000, "encoder") > 0
    assert t.lr_of(12_499, "decoder") == pytest.approx(1e-3) and t.lr_of(24_999, "decoder") < 1e-6
    assert t.lr_of(49_999, "decoder") == pytest.approx(1e-3) == t.lr_of(49_999, "encoder")


def test_frozen_encoder_unfreezes_mid_epoch_with_a_ramp(tiny):
    t = tiny(nnUNetTrainerAlice_frozenEncoder_tiny)  # 6 iterations, warm-up 3: encoder frozen for 0-2
    enc = list(unwrap(t.network).encoder.parameters())
    trace = lr_trace(t, train=True)
    base = [1e-3 * warmup_poly(i, 0, 3, 6) for i in range(6)]
    assert [x["decoder"] for x in trace] == pytest.approx(base)
    assert [x["encoder"] for x in trace] == pytest.approx([0, 0, 0, base[3] / 3, base[4] * 2 / 3, base[5]])
    assert all(p.requires_grad for p in enc)
    assert "Alice: encoder unfrozen at iteration 3" in open(t.log_file).read()


def test_frozen_encoder_lengths_can_be_set(trainer_box, monkeypatch, tmp_path):
    box, _ = trainer_box
    t = make_trainer(nnUNetTrainerAlice_frozenEncoder, box, monkeypatch, results=tmp_path / "r")
    assert t.freeze_lengths() == (25_000, 25_000)
    t.freeze_encoder_iterations, t.unfreeze_ramp_iterations = 2, 4
    assert [t.lr_factor(i, "encoder") / t.lr_factor(i, "decoder") for i in range(8)] == pytest.approx(
        [0, 0, 0.25, 0.5, 0.75, 1, 1, 1])


def test_encoder_learning_rate_is_a_fixed_fraction(tiny):
    t = tiny(nnUNetTrainerAlice_encLR_tiny)
    for x in lr_trace(t, train=False):
        assert x["encoder"] == pytest.approx(0.1 * x["decoder"]) and x["decoder"] > 0


def assert_nnunets_per_epoch_poly(t, epochs=3, iterations=2):
    """Real training steps through nnU-Net's epoch hooks: 1e-2 · (1 − epoch / epochs)^0.9, constant within an epoch."""
    lrs = []
    for epoch in range(epochs):
        t.current_epoch = epoch
        t.on_train_epoch_start()
        for _ in range(iterations):
            t.train_step(synthetic_batch(t))
            lrs.append(t.optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([1e-2 * (1 - e / epochs) ** 0.9 for e in range(epochs) for _ in range(iterations)])


def test_nnunet_recipe_is_nnunets_own_schedule(trainer_box, monkeypatch, tmp_path):
    """The benchmark's scratch arm: nnUNetTrainer's SGD 1e-2 and per-epoch poly, no warm-up."""
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
    from nnunet_alice.harness.trainers import nnUNetTrainerAlice_bench

    box, _ = trainer_box
    monkeypatch.setenv("nnUNet_alice_bench_recipe", "nnunet")
    monkeypatch.setenv("nnUNet_alice_bench_epochs", "3")
    monkeypatch.setenv("nnUNet_alice_bench_iterations", "2")
    t = make_trainer(nnUNetTrainerAlice_bench, box, monkeypatch, results=tmp_path / "r")
    t.initialize()
    assert isinstance(t.lr_scheduler, PolyLRScheduler) and t.initial_lr == 1e-2
    assert_nnunets_per_epoch_poly(t)


def test_pretrained_encoder_under_nnunets_schedule(trainer_box, monkeypatch, tmp_path):
    """``nnUNetTrainerAlice_nnUNetSchedule``: nnU-Net's SGD 1e-2 and per-epoch poly, the encoder loaded, not the
    decoder; a peak the user sets wins over 1e-2."""
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

    box, ckpt = trainer_box
    t = make_trainer(nnUNetTrainerAlice_nnUNetSchedule, box, monkeypatch, pretrained=ckpt, results=tmp_path / "r")
    t.num_epochs, t.num_iterations_per_epoch = 3, 2
    t.initialize()
    assert isinstance(t.lr_scheduler, PolyLRScheduler) and t.initial_lr == 1e-2 and t.load_scope == "encoder"
    g = t.optimizer.param_groups[0]
    assert (g["momentum"], g["nesterov"], g["weight_decay"]) == (0.99, True, 3e-5)
    net = unwrap(t.network)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    t.load_alice_weights()
    t.log_recipe()
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["network_weights"]
    after = net.state_dict()
    enc = [k for k in after if k.startswith("encoder.") and after[k].is_floating_point()]
    dec = [k for k in after if k.startswith("decoder.") and not k.startswith("decoder.encoder.")
           and after[k].is_floating_point()]
    assert enc and dec
    assert all(torch.equal(after[k], saved[k]) for k in enc)                       # encoder from the checkpoint
    assert all(torch.equal(after[k], before[k]) for k in dec)                      # decoder keeps its init
    assert any(not torch.equal(saved[k], before[k]) for k in dec)                  # ... which differs from the file
    assert_nnunets_per_epoch_poly(t)
    log = open(t.log_file).read()
    assert "Alice: nnU-Net's own schedule: SGD at 0.01 (nnU-Net's default)" in log and "load scope encoder" in log

    monkeypatch.setenv("nnUNet_alice_lr", "5e-3")
    u = make_trainer(nnUNetTrainerAlice_nnUNetSchedule, box, monkeypatch, results=tmp_path / "u")
    assert (u.initial_lr, u.lr_source, u.recipe) == (5e-3, "nnUNet_alice_lr", "nnunet")


def test_benchmark_encoder_lr_arm_runs_the_decoder_at_the_peak_from_the_environment(trainer_box, monkeypatch,
                                                                                    tmp_path):
    """``alice_enclr``'s trainer: per-iteration warm-up + poly at the peak ``nnUNet_alice_lr`` (1e-2) for the
    decoder, a tenth of it for the encoder, with the budget's run length from the environment."""
    from nnunet_alice.harness.trainers import nnUNetTrainerAlice_encLR_bench

    box, _ = trainer_box
    env = {"nnUNet_alice_lr": "0.01", "nnUNet_alice_bench_epochs": "2", "nnUNet_alice_bench_iterations": "3"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    t = make_trainer(nnUNetTrainerAlice_encLR_bench, box, monkeypatch, results=tmp_path / "r")
    t.initialize()
    assert (t.initial_lr, t.lr_source, t.total_iterations()) == (1e-2, "nnUNet_alice_lr", 6)
    trace = lr_trace(t, train=False)
    w = t.warmup_length()
    assert [x["decoder"] for x in trace] == pytest.approx([1e-2 * warmup_poly(i, 0, w, 6) for i in range(6)])
    assert [x["encoder"] for x in trace] == pytest.approx([0.1 * x["decoder"] for x in trace])
    assert max(x["decoder"] for x in trace) == pytest.approx(1e-2)


def test_continue_restores_groups_and_momentum(tiny, trainer_box, monkeypatch, tmp_path):
    box, ckpt = trainer_box
    t = tiny(nnUNetTrainerAlice_frozenEncoder_tiny)
    lr_trace(t, epochs=2, train=True)
    for epoch in (0, 1):
        t.logger.log("train_losses", np.float64(0.5), epoch)  # numpy values, as nnU-Net logs them
        t.logger.log("mean_fg_dice", np.float32(0.25), epoch)
    t._best_ema = np.float64(0.25)
    t.current_epoch = 1
    path = os.path.join(t.output_folder, "checkpoint_latest.pth")
    t.save_checkpoint(path)  # stores current_epoch + 1 = 2

    again = make_trainer(nnUNetTrainerAlice_frozenEncoder_tiny, box, monkeypatch, pretrained=ckpt,
                         continue_training=True, results=tmp_path / "again")
    again.load_checkpoint(path)
    assert again.current_epoch == 2
    assert [g["alice_group"] for g in again.optimizer.param_groups] == ["decoder", "encoder"]
    enc_old, enc_new = unwrap(t.network).encoder.parameters(), unwrap(again.network).encoder.parameters()
    for p_old, p_new in zip(enc_old, enc_new):
        assert torch.equal(t.optimizer.state[p_old]["momentum_buffer"], again.optimizer.state[p_new]["momentum_buffer"])
    again.on_train_epoch_start()  # the rate follows from the epoch: iteration 4
    assert again.lr_scheduler.iteration == 4
    assert again.optimizer.param_groups[1]["lr"] == pytest.approx(t.lr_of(4, "encoder"))


def test_refusals_are_one_log_line_and_exit_2(trainer_box, monkeypatch, tmp_path, capsys):
    box, _ = trainer_box
    path, marker = str(tmp_path / "checkpoint_latest.pth"), str(tmp_path / "pwned")
    write_malicious_checkpoint(path, marker)
    t = make_trainer(nnUNetTrainerAlice_tiny, box, monkeypatch, continue_training=True, results=tmp_path / "r")
    with pytest.raises(SystemExit) as ei:
        t.load_checkpoint(path)
    assert ei.value.code == 2 and not os.path.exists(marker)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: refused to load")
    assert err[0] in open(t.log_file).read()
    # a missing pretrained checkpoint at the start of training: the same, before any data is loaded
    t = make_trainer(nnUNetTrainerAlice_tiny, box, monkeypatch, pretrained=str(tmp_path / "nope.pth"),
                     results=tmp_path / "r2")
    with pytest.raises(SystemExit) as ei:
        t.on_train_start()
    err = capsys.readouterr().err.strip().splitlines()
    assert ei.value.code == 2 and err == [f"error: {tmp_path / 'nope.pth'}: checkpoint file not found"]
    assert t.dataloader_train is None and err[0] in open(t.log_file).read()


def test_full_training_with_nnunet_then_continue(trainer_box, monkeypatch, tmp_path):
    """nnU-Net's own entry points (trainer lookup by name, run_training loop, --c loading of its checkpoint)."""
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    box, ckpt = trainer_box
    box.apply(monkeypatch)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_alice_pretrained", ckpt)
    name = "nnUNetTrainerAlice_sawtooth_tiny"
    t = get_trainer_from_args(str(box.dataset_id), "3d_fullres", 0, name, TINY_PLANS, False, torch.device("cpu"))
    maybe_load_checkpoint(t, False, False, None)
    t.run_training()
    assert os.path.isfile(os.path.join(t.output_folder, "checkpoint_final.pth"))
    log = open(t.log_file).read()
    assert "alice_doctor: WILL LOAD" in log and "(load scope encoder;" in log
    assert "recipe for pretrained weights: SGD" in log and "peak learning rate 0.001 (default)" in log
    assert "Alice: note: 6 iterations is short for the default peak 0.001" in log
    assert "Alice: encoder frozen from iteration 0" in log and "Alice: encoder unfrozen at iteration 3" in log

    again = get_trainer_from_args(str(box.dataset_id), "3d_fullres", 0, name, TINY_PLANS, True, torch.device("cpu"))
    maybe_load_checkpoint(again, True, False, None)  # nnU-Net's checkpoint, numpy logging: weights_only loads it
    assert again.current_epoch == 3
    again.run_training()  # nothing left to train; on_train_start must not reload the pretrained weights
    assert "Alice: resuming at epoch 3; pretrained weights not reloaded" in open(again.log_file).read()
    trained = unwrap(t.network).state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in unwrap(again.network).state_dict().items())
