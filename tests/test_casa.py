"""CASA alignment (alice-method Sec. 2.5): shapes, reference maths, detached targets, EMA target copies."""
import math

import pytest
import torch
from torch.nn import functional as F

from nnunet_alice.pretrain.casa import CASA_TARGETS, CasaAlignment

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
    return {"q": m.q_proj.weight, "k": g("k_proj.weight"), "v": g("v_proj.weight"), "o": g("out_proj.weight"),
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
    for k in before:
        if k == "q":
            continue                                               # the query projection is shared, not EMA'd
        torch.testing.assert_close(after[k], 0.9 * before[k] + 0.1 * online[k])
    # the EMA target uses online W_q with the EMA K/V/out/FFN/LN weights
    torch.testing.assert_close(m.target(query, kv, "teacher_encoder_ema"), _reference(query, kv, after))
    shared = m.target(query, kv, "teacher_decoder_shared")
    assert not torch.allclose(m.target(query, kv, "teacher_encoder_ema"), shared)
    # buffers, not parameters: saved in the state dict, invisible to the optimiser
    names = {n for n, _ in m.named_parameters()}
    assert not any(n.startswith("ema_") for n in names)
    assert "ema_k_proj_weight" in m.state_dict()


def test_without_ema_copies():
    m = _casa(ema_target=False)
    query, kv = _tokens()
    assert not any(n.startswith("ema_") for n in m.state_dict())
    m.target(query, kv, "teacher_decoder_shared")
    m.update_target(0.5)                                           # a no-op
    with pytest.raises(RuntimeError):
        m.target(query, kv, "teacher_encoder_ema")
