"""CASA alignment (arXiv 2302.05615; docs/method.md "Teacher and losses"): shapes, reference maths, detached targets
from teacher tokens only,
EMA target copies, and a target the student cannot fake (noise teacher tokens stay unpredictable)."""
import math

import pytest
import torch
from torch.nn import functional as F

from nnunet_alice.pretrain.objectives.casa import CASA_TARGETS, CasaAlignment

DIM, HEADS = 16, 4


def _casa(**kw):
    torch.manual_seed(0)
    return CasaAlignment(dim=DIM, num_heads=HEADS, ffn_dim=32, **kw)


def _tokens(b=2, nq=3, nk=5):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, nq, DIM, generator=g), torch.randn(b, nk, DIM, generator=g)


def _reference(query, kv, w):
    """Independent post-norm cross-attention with explicit per-head loops (no dropout)."""
    q, k, v = query @ w["q"].t(), kv @ w["k"].t(), kv @ w["v"].t()
    dk = DIM // HEADS
    heads = []
    for h in range(HEADS):
        sl = slice(h * dk, (h + 1) * dk)
        att = torch.softmax(q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(dk), dim=-1)
        heads.append(att @ v[..., sl])
    x = torch.cat(heads, dim=-1) @ w["o"].t() + query
    x = F.layer_norm(x, (DIM,), w["n1w"], w["n1b"], 1e-6)
    y = torch.relu(x @ w["f1w"].t() + w["f1b"]) @ w["f2w"].t() + w["f2b"]
    return F.layer_norm(y + x, (DIM,), w["n2w"], w["n2b"], 1e-6)


def _weights(m, ema=False):
    g = (lambda n: getattr(m, "ema_" + n.replace(".", "_"))) if ema else (lambda n: dict(m.named_parameters())[n])
    return {"q": g("q_proj.weight"), "k": g("k_proj.weight"), "v": g("v_proj.weight"), "o": g("out_proj.weight"),
            "n1w": g("norm1.weight"), "n1b": g("norm1.bias"), "f1w": g("ffn_in.weight"), "f1b": g("ffn_in.bias"),
            "f2w": g("ffn_out.weight"), "f2b": g("ffn_out.bias"), "n2w": g("norm2.weight"), "n2b": g("norm2.bias")}


def test_defaults_match_the_official_layer():
    m = CasaAlignment()
    assert (m.dim, m.num_heads, m.head_dim) == (512, 8, 64)
    assert all(getattr(m, n).bias is None for n in ("q_proj", "k_proj", "v_proj", "out_proj"))
    assert m.norm1.eps == 1e-6 and m.ffn_in.out_features == 2048 and m.dropout == 0.1
    n_online = sum(p.numel() for p in m.parameters())
    assert n_online == 4 * 512 * 512 + 2 * 512 * 2048 + 2048 + 512 + 4 * 512   # no unused linears (B6)


def test_shapes_and_reference_values():
    m = _casa(dropout=0.1).eval()
    query, kv = _tokens()
    s = m(query, kv)
    assert s.shape == (2, 3, DIM)
    torch.testing.assert_close(s, _reference(query, kv, _weights(m)))
    for mode in CASA_TARGETS:
        t = m.target(query, torch.randn(2, 7, DIM), mode)
        assert t.shape == (2, 3, DIM)
    with pytest.raises(ValueError):
        m.target(query, kv, "nonsense")
    with pytest.raises(ValueError):
        m(query, torch.randn(2, 5, DIM + 1))


def test_shared_target_is_the_same_layer_without_dropout():
    m = _casa(dropout=0.5).train()
    query, kv = _tokens()
    t = m.target(query, kv, "teacher_decoder_shared")
    torch.testing.assert_close(t, _reference(query, kv, _weights(m)))
    torch.testing.assert_close(t, m.target(query, kv, "teacher_decoder_shared"))   # deterministic
    assert not torch.allclose(m(query, kv), t)                                       # online dropout active


@pytest.mark.parametrize("mode", CASA_TARGETS)
def test_gradients_flow_only_through_s(mode):
    m = _casa(dropout=0.0).train()
    query, kv = _tokens()
    query.requires_grad_(True)
    kv.requires_grad_(True)
    teacher_tokens = torch.randn(2, 4, DIM, requires_grad=True)
    s = m(query, kv)
    t = m.target(query, teacher_tokens, mode)
    assert s.requires_grad and not t.requires_grad and t.grad_fn is None
    (s * t).sum().backward()                                   # a loss that uses both S and T
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())   # no unused params
    assert teacher_tokens.grad is None
    assert all(not b.requires_grad for b in m.buffers())
    # T's own contribution: gradient of a loss on T alone reaches nothing
    m.zero_grad(set_to_none=True)
    t2 = m.target(query, teacher_tokens, mode)
    assert not t2.requires_grad
    assert all(p.grad is None for p in m.parameters())


def test_ema_target_copies_and_update_formula():
    m = _casa(dropout=0.0).eval()
    query, kv = _tokens()
    # initially the EMA copies equal the online weights, so both target modes agree
    torch.testing.assert_close(m.target(query, kv, "teacher_encoder_ema"),
                               m.target(query, kv, "teacher_decoder_shared"))
    before = {k: v.clone() for k, v in _weights(m, ema=True).items()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    online = {k: v.detach().clone() for k, v in _weights(m).items()}
    m.update_target(0.9)
    after = _weights(m, ema=True)
    for k in before:                                               # every weight, the query projection too
        torch.testing.assert_close(after[k], 0.9 * before[k] + 0.1 * online[k])
    # the EMA target is the same layer with every weight taken from the EMA copies
    torch.testing.assert_close(m.target(query, kv, "teacher_encoder_ema"), _reference(query, kv, after))
    shared = m.target(query, kv, "teacher_decoder_shared")
    assert not torch.allclose(m.target(query, kv, "teacher_encoder_ema"), shared)
    # buffers, not parameters: saved in the state dict, invisible to the optimiser
    names = {n for n, _ in m.named_parameters()}
    assert not any(n.startswith("ema_") for n in names)
    assert {"ema_k_proj_weight", "ema_q_proj_weight"} <= set(m.state_dict())


def test_without_ema_copies():
    m = _casa(ema_target=False)
    query, kv = _tokens()
    assert not any(n.startswith("ema_") for n in m.state_dict())
    m.target(query, kv, "teacher_decoder_shared")
    m.update_target(0.5)                                           # a no-op
    with pytest.raises(RuntimeError):
        m.target(query, kv, "teacher_encoder_ema")


# ------------------------------------------------------------------ the target must not be fakeable by the student
def _train_against(target_fn, steps=150, k=DIM):
    """Optimise a student (token maps + the CASA layer) for ``steps`` against T = target_fn(casa, x); CE losses."""
    from nnunet_alice.pretrain.objectives.losses import CasaTokenLoss

    torch.manual_seed(0)
    x = torch.randn(2, 8, DIM)                                   # the student's view, as tokens
    enc, dec = torch.nn.Linear(DIM, DIM), torch.nn.Linear(DIM, DIM)
    casa = _casa(dropout=0.0)
    loss_fn = CasaTokenLoss(k, student_temp=0.1, centering="sinkhorn")
    opt = torch.optim.Adam(list(casa.parameters()) + list(enc.parameters()) + list(dec.parameters()), lr=1e-3)
    losses = []
    for _ in range(steps):
        s = casa(enc(x), dec(x))
        loss = loss_fn(s, target_fn(casa, enc, x), 0.01)
        opt.zero_grad()
        loss.backward()
        opt.step()
        casa.update_target(0.99)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("mode", CASA_TARGETS)
def test_noise_teacher_tokens_are_not_learnable_but_real_ones_are(mode):
    """With pure-noise teacher tokens the CASA loss stays >= 0.8 ln K after 150 steps; with teacher tokens that
    are a function of the view it falls. The control: the official target, which feeds the student's query to
    the target branch and adds it back as the residual, falls with the same noise."""
    log_k = math.log(DIM)
    teacher = torch.nn.Linear(DIM, DIM)                          # a fixed "teacher network" on the same view
    teacher.requires_grad_(False)

    def noise(casa, enc, x):
        return casa.target(torch.randn_like(x), torch.randn(2, 8, DIM), mode)

    def real(casa, enc, x):
        t = teacher(x)
        return casa.target(t, torch.tanh(t), mode)

    def official_with_noise(casa, enc, x):                       # T = CASA(student query, noise), shared weights
        q = enc(x).detach()
        with torch.no_grad():
            return casa._layer(q, casa.q_proj(q), torch.randn(2, 8, DIM), casa._online_weights(), 0.0)

    def tail(losses):
        return sum(losses[-10:]) / 10

    noise_losses = _train_against(noise)
    real_losses = _train_against(real)
    assert tail(noise_losses) >= 0.8 * log_k, tail(noise_losses)
    assert tail(real_losses) < 0.5 * log_k and tail(real_losses) < 0.5 * sum(real_losses[:10]) / 10
    assert tail(_train_against(official_with_noise)) < 0.8 * log_k   # the shortcut this target closes
