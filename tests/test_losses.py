"""Alice losses (alice-method Sec. 3, Eq. 1-3) and collapse monitors against hand-computed values."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnunet_alice.pretrain.losses import (CasaTokenLoss, DinoCrossViewLoss, kl_to_uniform, reconstruction_loss,
                                          teacher_entropy)


def softmax(xs, tau=1.0, c=None):
    c = c or [0.0] * len(xs)
    e = [math.exp((x - ci) / tau) for x, ci in zip(xs, c)]
    return [v / sum(e) for v in e]


def H(p, q):
    return -sum(pi * math.log(qi) for pi, qi in zip(p, q))


T_Q = [[1.0, 0.2, -0.5], [0.1, 0.4, 0.0]]
T_K = [[-0.3, 0.6, 0.2], [0.5, -0.1, 0.3]]
S_Q = [[0.2, -0.1, 0.3], [0.0, 0.5, -0.4]]
S_K = [[0.4, 0.1, -0.2], [-0.3, 0.2, 0.1]]
CENTER = [0.1, -0.2, 0.05]


def test_dino_cross_view_loss_hand_computed():
    loss_fn = DinoCrossViewLoss(out_dim=3, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.copy_(torch.tensor([CENTER]))
    tau_t = 0.5
    expected = 0.5 * (
        sum(H(softmax(T_Q[b], tau_t, CENTER), softmax(S_K[b], 0.1)) for b in range(2)) / 2
        + sum(H(softmax(T_K[b], tau_t, CENTER), softmax(S_Q[b], 0.1)) for b in range(2)) / 2)
    s_q = torch.tensor(S_Q, requires_grad=True)
    s_k = torch.tensor(S_K, requires_grad=True)
    t_q = torch.tensor(T_Q, requires_grad=True)
    t_k = torch.tensor(T_K, requires_grad=True)
    loss = loss_fn(s_q, s_k, t_q, t_k, tau_t)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # the crossing matters: pairing teacher(Q) with student(Q) gives a different number
    same_view = 0.5 * sum(H(softmax(T_Q[b], tau_t, CENTER), softmax(S_Q[b], 0.1))
                          + H(softmax(T_K[b], tau_t, CENTER), softmax(S_K[b], 0.1)) for b in range(2)) / 2
    assert abs(expected - same_view) > 1e-3
    # centre: c <- 0.9 c + 0.1 * mean of the teacher outputs of both views
    mean = [sum(r[k] for r in T_Q + T_K) / 4 for k in range(3)]
    torch.testing.assert_close(loss_fn.center, torch.tensor([[0.9 * c + 0.1 * m for c, m in zip(CENTER, mean)]]))
    loss.backward()
    assert t_q.grad is None and t_k.grad is None                # teacher detached
    assert s_q.grad.abs().sum() > 0 and s_k.grad.abs().sum() > 0


def test_casa_token_loss_hand_computed():
    S = [[[0.2, -0.1, 0.3, 0.0], [0.5, 0.1, -0.2, 0.4]], [[-0.3, 0.2, 0.1, 0.6], [0.0, 0.0, 0.3, -0.1]]]
    T = [[[0.4, 0.1, -0.2, 0.3], [-0.1, 0.2, 0.0, 0.5]], [[0.3, -0.4, 0.2, 0.1], [0.6, 0.1, -0.3, 0.0]]]
    c2 = [0.05, -0.1, 0.2, 0.0]
    tau_t = 0.3
    loss_fn = CasaTokenLoss(out_dim=4)
    loss_fn.center.copy_(torch.tensor([[c2]]))
    expected = sum(H(softmax(T[b][n], tau_t, c2), softmax(S[b][n], 0.1)) for b in range(2) for n in range(2)) / 4
    s = torch.tensor(S, requires_grad=True)
    t = torch.tensor(T, requires_grad=True)
    loss = loss_fn(s, t, tau_t)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    token_mean = [sum(T[b][n][k] for b in range(2) for n in range(2)) / 4 for k in range(4)]
    torch.testing.assert_close(loss_fn.center, torch.tensor([[[0.9 * c + 0.1 * m for c, m in zip(c2, token_mean)]]]))
    loss.backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    # per-view sequences: mean of per-view means, same centre update as the stacked tensor
    views = CasaTokenLoss(out_dim=4)
    views.center.copy_(torch.tensor([[c2]]))
    v = views([s[:1], s[1:]], [t[:1], t[1:]], tau_t)
    assert v.item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(views.center, loss_fn.center)
    with pytest.raises(ValueError):
        views([s], [t, t], tau_t)


def test_reconstruction_loss():
    pred = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]])  # (2, 2, 3)
    target = torch.tensor([[[1.0, 0.0, 3.0], [0.0, 1.0, 0.0]], [[0.0, 1.0, 1.0], [2.0, 2.0, 5.0]]])
    mask = torch.tensor([[[0.0, 1.0, 1.0]], [[1.0, 0.0, 0.0]]])                                    # (2, 1, 3)
    sq = (pred - target) ** 2
    assert reconstruction_loss(pred, target, region="all").item() == pytest.approx(sq.sum().item() / 12)
    # masked voxels: b0 positions 1,2 and b1 position 0, both channels -> 6 entries
    masked_sum = 4 + 0 + 1 + 0 + 1 + 0                      # (2-0)^2,(3-3)^2 | (0-1)^2,(0-0)^2 | (1-0)^2 | (2-2)^2
    assert reconstruction_loss(pred, target, mask).item() == pytest.approx(masked_sum / 6)
    assert reconstruction_loss(pred, target, mask.bool()).item() == pytest.approx(masked_sum / 6)
    assert reconstruction_loss(target, target, mask).item() == 0.0
    assert reconstruction_loss(target, target, region="all").item() == 0.0
    # empty mask: falls back to the all-voxel MSE (documented)
    empty = torch.zeros_like(mask)
    assert reconstruction_loss(pred, target, empty).item() == pytest.approx(sq.sum().item() / 12)
    # gradient only at masked voxels
    p = pred.clone().requires_grad_(True)
    reconstruction_loss(p, target, mask).backward()
    assert torch.all(p.grad[mask.expand_as(p) == 0] == 0) and p.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        reconstruction_loss(pred, target, None)
    with pytest.raises(ValueError):
        reconstruction_loss(pred, target, mask, region="some")
    with pytest.raises(ValueError):
        reconstruction_loss(pred, target, torch.ones(2, 1, 4))


def test_teacher_entropy_and_kl_hand_computed():
    logits = torch.tensor(T_Q)
    center = torch.tensor([CENTER])
    tau = 0.5
    ps = [softmax(r, tau, CENTER) for r in T_Q]
    ent = sum(-sum(p * math.log(p) for p in row) for row in ps) / 2
    assert teacher_entropy(logits, center, tau).item() == pytest.approx(ent, rel=1e-5)
    p_bar = [(ps[0][k] + ps[1][k]) / 2 for k in range(3)]
    kl = sum(p * math.log(p * 3) for p in p_bar)
    assert kl_to_uniform(logits, center, tau).item() == pytest.approx(kl, rel=1e-5)
    assert teacher_entropy(logits, None, 1.0).item() == pytest.approx(
        sum(-sum(p * math.log(p) for p in softmax(r)) for r in T_Q) / 2, rel=1e-5)


def test_monitors_flag_both_collapses():
    k = 4
    uniform = torch.zeros(8, k)
    assert teacher_entropy(uniform, None, 0.01).item() == pytest.approx(math.log(k))
    assert kl_to_uniform(uniform, None, 0.01).item() == pytest.approx(0.0, abs=1e-6)
    same = torch.tensor([[5.0, 0.0, 0.0, 0.0]]).repeat(8, 1)          # every sample -> prototype 0
    assert teacher_entropy(same, None, 0.01).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_to_uniform(same, None, 0.01).item() == pytest.approx(math.log(k), abs=1e-5)
    healthy = 5.0 * torch.eye(k).repeat(2, 1)                          # sharp, prototypes used evenly
    assert teacher_entropy(healthy, None, 0.01).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_to_uniform(healthy, None, 0.01).item() == pytest.approx(0.0, abs=1e-6)
    tokens = torch.randn(2, 5, k)                                      # (B, N, K) works as well
    assert 0 <= teacher_entropy(tokens, torch.zeros(1, 1, k), 0.1).item() <= math.log(k)


# ------------------------------------------------------------------------------------------------ distributed
def _rank_data(rank):
    g = torch.Generator().manual_seed(100 + rank)
    b = 2 + rank                                                        # unequal local batches: 2 and 3
    return (torch.randn(b, 3, generator=g), torch.randn(b, 3, generator=g), torch.randn(b, 2, 3, generator=g))


def _dist_worker(rank, world, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        t_q, t_k, t_tok = _rank_data(rank)
        cls_loss, tok_loss = DinoCrossViewLoss(3), CasaTokenLoss(3)
        cls_loss(torch.zeros_like(t_q), torch.zeros_like(t_k), t_q, t_k, 0.04)
        tok_loss(torch.zeros_like(t_tok), t_tok, 0.04)
        data = [_rank_data(r) for r in range(world)]
        all_cls = torch.cat([torch.cat([q, k]) for q, k, _ in data])
        all_tok = torch.cat([tok.mean(dim=1) for _, _, tok in data])
        torch.testing.assert_close(cls_loss.center, 0.1 * all_cls.mean(dim=0, keepdim=True))
        torch.testing.assert_close(tok_loss.center, 0.1 * all_tok.mean(dim=0).reshape(1, 1, 3))
    finally:
        dist.destroy_process_group()


def test_centre_is_averaged_over_the_global_batch(tmp_path):
    """Two gloo ranks with different teacher outputs (and batch sizes) end with the centre of the concatenation."""
    # fork (where available) skips re-importing torch in the children: ~0.2 s instead of 10+ s with spawn;
    # the workers set one intra-op thread first, as DataLoader workers do, so forking after OpenMP use is safe
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_dist_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True, start_method=method)
