"""The Alice objective on a tiny U-Net: terms, gradients, EMA, switches, and that training lowers the loss."""
import pytest
import torch

from alice_fixtures import alice_batch, schedules_for, tiny_config, tiny_network
from nnunet_alice.pretrain.loop import parameter_groups, train_step
from nnunet_alice.pretrain.objective_alice import AliceObjective


def make(**overrides):
    cfg = tiny_config(**overrides)
    obj = AliceObjective(tiny_network(), cfg, schedules_for(cfg))
    opt = torch.optim.AdamW(parameter_groups(obj.student_modules()), lr=cfg.lr)
    return cfg, obj, opt


def test_total_is_weighted_sum_of_terms():
    cfg, obj, _ = make(lambda_cls=0.5, lambda_casa=2.0, lambda_recon=3.0)
    total, terms = obj(alice_batch(2), 0)
    expected = 0.5 * terms["cls"] + 2.0 * terms["casa"] + 3.0 * terms["recon"]
    assert torch.allclose(total, expected)
    assert set(terms) >= {"cls", "casa", "recon", "teacher_entropy", "kl_uniform"}
    assert all(torch.isfinite(v) for v in terms.values())


def test_teacher_gets_no_gradient_and_student_does():
    _, obj, _ = make()
    total, _ = obj(alice_batch(2), 0)
    total.backward()
    assert all(not p.requires_grad and p.grad is None for p in obj.teacher.parameters())
    student_grads = [p.grad for p in obj.student.parameters() if p.requires_grad]
    assert student_grads and all(g is not None for g in student_grads)
    assert all(p.grad is not None for p in obj.casa.parameters() if p.requires_grad)


@pytest.mark.parametrize("flags,absent", [({"use_cls": False}, "cls"), ({"use_casa": False}, "casa"),
                                          ({"use_recon": False}, "recon")])
def test_switches_drop_terms(flags, absent):
    _, obj, _ = make(**flags)
    total, terms = obj(alice_batch(2), 0)
    assert absent not in terms and torch.isfinite(total)


def test_casa_target_modes_differ_and_run():
    out = {}
    for mode in ("teacher_encoder_ema", "teacher_decoder_shared"):
        _, obj, _ = make(casa_target=mode)
        _, terms = obj(alice_batch(2), 0)
        out[mode] = float(terms["casa"].detach())
    assert out["teacher_encoder_ema"] != pytest.approx(out["teacher_decoder_shared"])


def test_ema_update_follows_momentum_schedule():
    cfg, obj, opt = make()
    name, t_before = next((n, p.detach().clone()) for n, p in obj.teacher.module.named_parameters()
                          if n.startswith("network.encoder"))
    train_step(obj, obj, opt, alice_batch(2), 0, 1e-2, 0.0, 0.0, torch.device("cpu"))
    s_after = dict(obj.student.named_parameters())[name].detach()
    m = float(obj.schedules.momentum[0])
    expected = m * t_before + (1 - m) * s_after
    assert torch.allclose(dict(obj.teacher.module.named_parameters())[name], expected, atol=1e-6)
    assert not torch.allclose(t_before, expected)


def test_last_layer_frozen_early_then_trained():
    cfg, obj, opt = make(freeze_last_layer_fraction=0.5, steps=4)
    last = [p for p in obj.student.head.last_layer_parameters() if p.requires_grad]
    before = [p.detach().clone() for p in last]
    train_step(obj, obj, opt, alice_batch(2), 0, 1e-2, 0.0, 0.0, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(before, last))
    train_step(obj, obj, opt, alice_batch(2), 3, 1e-2, 0.0, 0.0, torch.device("cpu"))
    assert any(not torch.equal(a, b) for a, b in zip(before, last))


def test_a_few_steps_lower_the_total_loss():
    torch.manual_seed(0)
    cfg, obj, opt = make(steps=15)
    batch = alice_batch(2, seed=3)
    losses = [train_step(obj, obj, opt, batch, s, 1e-3, 0.0, 3.0, torch.device("cpu"))[0] for s in range(15)]
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3


def test_non_finite_loss_names_step_and_term():
    from nnunet_alice.errors import AliceError

    _, obj, opt = make()
    batch = alice_batch(2)
    batch["student_q"][0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(AliceError, match=r"non-finite loss at step 7: term \w+"):
        train_step(obj, obj, opt, batch, 7, 1e-3, 0.0, 3.0, torch.device("cpu"))
