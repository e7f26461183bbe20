"""Alice losses (Alice, arXiv 2302.05615, Eq. 1-3), Sinkhorn-Knopp targets and collapse monitors against
hand-computed values and plain references."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

from nnunet_alice.pretrain.objectives.losses import (CasaTokenLoss, DinoCrossViewLoss, kl_to_uniform, probs_entropy,
                                                     probs_kl_to_uniform, reconstruction_loss, sinkhorn_knopp,
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
        # Sinkhorn-Knopp over the global rows: each rank's targets are its rows of the global solution
        local = torch.cat([t_q, t_k])
        offset = sum(2 * data[r][0].shape[0] for r in range(rank))
        expected = sinkhorn_knopp(all_cls, 0.5, 3)[offset:offset + local.shape[0]]
        torch.testing.assert_close(sinkhorn_knopp(local, 0.5, 3), expected)
        # masked token mean over the global batch: rank-local losses average to the global one under DDP
        ce = torch.arange(6.0).reshape(2, 3) + 10 * rank
        mask = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]) if rank == 0 else torch.ones(2, 3)
        local_loss = CasaTokenLoss._masked_mean(ce, mask)
        both = torch.stack([local_loss, local_loss.new_tensor(0.0)])
        dist.all_reduce(both)
        global_ce = torch.cat([torch.arange(6.0).reshape(2, 3), torch.arange(6.0).reshape(2, 3) + 10])
        global_mask = torch.cat([torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), torch.ones(2, 3)])
        torch.testing.assert_close(both[0] / world, (global_ce * global_mask).sum() / global_mask.sum())
    finally:
        dist.destroy_process_group()


def test_centre_is_averaged_over_the_global_batch(tmp_path):
    """Two gloo ranks with different teacher outputs (and batch sizes) end with the centre of the concatenation."""
    # fork (where available) skips re-importing torch in the children: ~0.2 s instead of 10+ s with spawn;
    # the workers set one intra-op thread first, as DataLoader workers do, so forking after OpenMP use is safe
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_dist_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True, start_method=method)


# ------------------------------------------------------------------------------------------------ Sinkhorn-Knopp
def _reference_sinkhorn(logits, temp, iterations):
    """SwAV Sec. 3.1 / DINOv2's ``sinkhorn_knopp_teacher`` in float64 and the exp domain (moderate temps only)."""
    q = torch.exp(logits.double() / temp).t()                    # (K, R)
    q /= q.sum()
    k, r = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= r
    return (q * r).t()


def test_sinkhorn_matches_the_exp_domain_reference_and_balances_prototypes():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g)
    for temp, it in ((1.0, 3), (0.3, 1), (0.5, 50)):
        torch.testing.assert_close(sinkhorn_knopp(logits, temp, it).double(), _reference_sinkhorn(logits, temp, it),
                                   rtol=1e-5, atol=1e-7)
    p = sinkhorn_knopp(logits, 0.5, 200)
    torch.testing.assert_close(p.sum(dim=1), torch.ones(6))                       # rows are distributions
    torch.testing.assert_close(p.sum(dim=0), torch.full((5,), 6 / 5), rtol=1e-4, atol=1e-4)  # equipartition
    # identical rows cannot pick one prototype: the equipartition makes them uniform
    same = torch.tensor([[3.0, 0.0, 0.0, 0.0]]).repeat(4, 1)
    torch.testing.assert_close(sinkhorn_knopp(same, 0.1, 3), torch.full((4, 4), 0.25))
    # rows that differ stay sharp: one row per prototype
    torch.testing.assert_close(sinkhorn_knopp(torch.eye(4), 0.05, 3).argmax(dim=1), torch.arange(4))


def test_sinkhorn_at_the_paper_temperature_stays_finite():
    """tau_t = 0.008 puts exp(1 / tau_t) = e^125 beyond float32; the log-domain version does not overflow."""
    logits = torch.tensor([[1.0, -1.0, 0.5], [0.9, 1.0, -0.2]])
    p = sinkhorn_knopp(logits, 0.008, 3)
    assert torch.isfinite(p).all() and torch.allclose(p.sum(dim=1), torch.ones(2))
    torch.testing.assert_close(p.double(), _reference_sinkhorn(logits, 0.008, 3), rtol=1e-5, atol=1e-6)  # float64 ok
    with pytest.raises(ValueError):
        sinkhorn_knopp(logits, 0.1, 0)


def test_sinkhorn_queue_rows_take_part_but_are_not_returned():
    g = torch.Generator().manual_seed(1)
    queue, batch = torch.randn(5, 4, generator=g), torch.randn(3, 4, generator=g)
    expected = sinkhorn_knopp(torch.cat([queue, batch]), 0.2, 3)[5:]
    torch.testing.assert_close(sinkhorn_knopp(batch, 0.2, 3, extra_rows=queue), expected)
    loss = DinoCrossViewLoss(4, centering="sinkhorn", queue_size=5)
    t = [torch.randn(2, 4, generator=g) for _ in range(6)]
    loss(t[0], t[1], t[0], t[1], 0.2)                                 # 4 rows in
    assert int(loss.queue_len) == 4
    torch.testing.assert_close(loss.queue[:4], torch.cat([t[0], t[1]]))
    centre = loss.center.clone()                                      # rows enter the queue centred
    loss(t[2], t[3], t[2], t[3], 0.2)                                 # 4 more: ring buffer keeps the last 5
    assert int(loss.queue_len) == 5
    kept = torch.cat([t[0], t[1], t[2] - centre, t[3] - centre])[-5:]
    assert sorted(map(tuple, loss.queue.tolist())) == sorted(map(tuple, kept.tolist()))
    # the next call uses those 5 rows in its normalisation, with its own rows centred
    s_q, s_k = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    targets = sinkhorn_knopp(torch.cat([t[4], t[5]]) - loss.center, 0.2, 3, extra_rows=loss.queue.clone())
    got = loss(s_q, s_k, t[4], t[5], 0.2)
    ce = lambda p, s: -(p * F.log_softmax(s / 0.1, dim=-1)).sum(-1).mean()   # noqa: E731
    assert got.item() == pytest.approx(0.5 * (ce(targets[:2], s_k) + ce(targets[2:], s_q)).item(), rel=1e-5)
    torch.testing.assert_close(loss.last_targets, targets)
    assert "queue" in loss.state_dict()                              # resumed runs continue with the same queue
    assert not hasattr(DinoCrossViewLoss(4, centering="center", queue_size=5), "queue")


def test_sinkhorn_targets_over_fewer_rows_than_prototypes_cannot_be_sharp_and_a_queue_lifts_that_floor():
    """Equipartition over R < K rows forces every row to spread over >= K/R prototypes: entropy >= ln(K/R)."""
    g = torch.Generator().manual_seed(0)
    k = 512
    protos = F.normalize(torch.randn(k, 64, generator=g), dim=1)
    logits = lambda n: F.normalize(torch.randn(n, 64, generator=g), dim=1) @ protos.T   # noqa: E731
    batch = logits(4)                                        # batch 2 x 2 views: the default pretraining batch
    sharp = F.softmax(batch / 0.01, dim=-1)
    assert probs_entropy(sharp) < 0.3 * math.log(k)          # the logits themselves separate the rows
    alone = sinkhorn_knopp(batch, 0.01, 3)
    assert probs_entropy(alone) >= math.log(k / 4) - 0.05    # 0.78 ln K: read as near-uniform by the monitors
    with_queue = sinkhorn_knopp(batch, 0.01, 3, extra_rows=logits(2048))
    assert probs_entropy(with_queue) < 0.5 * math.log(k)
    assert torch.allclose(with_queue.sum(dim=1), torch.ones(4))


def test_a_common_drift_of_the_teacher_does_not_become_a_shared_target_of_the_queue():
    """A teacher whose rows drift by a common per-prototype offset: with uncentred queue rows every new row goes
    to the drift's prototype (a target shared by all samples, which a constant student predicts); the queue
    holds centred rows, so the targets stay spread as they would without the drift."""
    g = torch.Generator().manual_seed(3)
    k, steps = 16, 80
    drift = torch.zeros(k)
    drift[3] = 2.0                                                    # every teacher row drifts towards prototype 3
    loss = DinoCrossViewLoss(k, centering="sinkhorn", queue_size=256, center_momentum=0.5)
    s, raw = torch.zeros(2, k), []
    for step in range(steps):                                        # the queue fills while the teacher drifts
        r = torch.randn(4, k, generator=g) + drift * step / steps
        raw.append(r)
        loss(s, s, r[:2], r[2:], 0.1)
    uncentred = sinkhorn_knopp(raw[-1], 0.1, 3, extra_rows=torch.cat(raw[:-1])[-256:])
    assert uncentred.mean(dim=0)[3] > 3 / k                           # the failure mode: 4x a fair share
    assert loss.last_targets.mean(dim=0)[3] < 1.5 / k                 # centred: no pile-up on the drift


def test_sinkhorn_loss_keeps_tracking_the_centre():
    loss = DinoCrossViewLoss(3, centering="sinkhorn")
    t_q, t_k = torch.tensor(T_Q), torch.tensor(T_K)
    loss(torch.tensor(S_Q), torch.tensor(S_K), t_q, t_k, 0.5)
    torch.testing.assert_close(loss.center, 0.1 * torch.cat([t_q, t_k]).mean(dim=0, keepdim=True))
    targets = sinkhorn_knopp(torch.cat([t_q, t_k]), 0.5, 3)
    torch.testing.assert_close(loss.last_targets, targets)
    with pytest.raises(ValueError):
        DinoCrossViewLoss(3, centering="median")


def test_casa_loss_on_masked_tokens_only():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 4, 5, generator=g, requires_grad=True), torch.randn(2, 4, 5, generator=g)
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    loss_fn = CasaTokenLoss(5, centering="center")
    loss = loss_fn(s, t, 0.3, mask)
    p = F.softmax(t / 0.3, dim=-1)
    ce = -(p * F.log_softmax(s / 0.1, dim=-1)).sum(-1)
    assert loss.item() == pytest.approx(ce[mask].mean().item(), rel=1e-5)
    loss.backward()
    assert torch.all(s.grad[~mask] == 0) and s.grad[mask].abs().sum() > 0   # unmasked tokens teach nothing
    # a view without masked tokens falls back to all of them; per-view masks in sequences
    loss_fn.center.zero_()
    none = loss_fn(s.detach(), t, 0.3, torch.zeros(2, 4, dtype=torch.bool))
    assert none.item() == pytest.approx(ce.mean().item(), rel=1e-5)
    loss_fn.center.zero_()
    views = loss_fn([s.detach()[:1], s.detach()[1:]], [t[:1], t[1:]], 0.3, [mask[:1], mask[1:]])
    assert views.item() == pytest.approx(0.5 * (ce[:1][mask[:1]].mean() + ce[1:][mask[1:]].mean()).item(), rel=1e-5)
    with pytest.raises(ValueError):
        loss_fn(s, t, 0.3, torch.ones(2, 3))
    with pytest.raises(ValueError):
        loss_fn([s], [t], 0.3, [mask, mask])


def test_target_monitors_from_probabilities():
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    assert probs_entropy(p).item() == pytest.approx(math.log(2) / 2)
    p_bar = [0.25, 0.25, 0.5, 0.0]
    kl = sum(q * math.log(q * 4) for q in p_bar if q > 0)
    assert probs_kl_to_uniform(p).item() == pytest.approx(kl, rel=1e-5)
    logits, center = torch.tensor(T_Q), torch.tensor([CENTER])
    assert teacher_entropy(logits, center, 0.5).item() == pytest.approx(
        probs_entropy(F.softmax((logits - center) / 0.5, dim=-1)).item())
