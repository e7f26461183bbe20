"""The DINO parts of Alice against a small reference written from the DINO paper (Caron et al., ICCV 2021,
arXiv 2104.14294): Algorithm 1 (loss, centring, EMA teacher) and the schedules of Sec. 3 / App. A.

The reference is plain Python written from the pseudo-code, kept independent of the package on purpose: the
package's modules are compared against it on random inputs over several settings (the pattern of lightly's tests
against the "original" DINO loss).
"""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from nnunet_alice.pretrain.config import PretrainConfig
from nnunet_alice.pretrain.objectives.ema import EmaTeacher
from nnunet_alice.pretrain.objectives.losses import DinoCrossViewLoss
from nnunet_alice.pretrain.training.schedules import Schedules


# ----------------------------------------------------------------------------------- Algorithm 1, as printed
class Algorithm1:
    """DINO Algorithm 1:

        C = 0; gt.params = gs.params
        for x in loader:
            x1, x2 = augment(x), augment(x)
            s1, s2 = gs(x1), gs(x2); t1, t2 = gt(x1), gt(x2)
            loss = H(t1, s2)/2 + H(t2, s1)/2
            loss.backward(); update(gs)
            gt.params = l*gt.params + (1-l)*gs.params
            C = m*C + (1-m)*cat([t1, t2]).mean(dim=0)
        def H(t, s):
            t = t.detach(); s = softmax(s / tps, dim=1); t = softmax((t - C) / tpt, dim=1)
            return - (t * log(s)).sum(dim=1).mean()
    """

    def __init__(self, out_dim, tps, m):
        self.C = torch.zeros(out_dim, dtype=torch.float64)
        self.tps, self.m = tps, m

    def H(self, t, s, tpt):
        t = t.detach().double()
        s = torch.softmax(s.double() / self.tps, dim=1)
        t = torch.softmax((t - self.C) / tpt, dim=1)
        return -(t * torch.log(s)).sum(dim=1).mean()

    def loss(self, s1, s2, t1, t2, tpt):
        return self.H(t1, s2, tpt) / 2 + self.H(t2, s1, tpt) / 2

    def update_center(self, t1, t2):
        self.C = self.m * self.C + (1 - self.m) * torch.cat([t1, t2]).detach().double().mean(dim=0)


@pytest.mark.parametrize("out_dim,batch,tps,tpt,m", [(8, 2, 0.1, 0.04, 0.9), (64, 5, 0.1, 0.07, 0.99),
                                                     (512, 3, 0.1, 0.01, 0.9), (16, 1, 0.2, 0.5, 0.0)])
def test_cross_view_loss_and_centre_match_algorithm_1(out_dim, batch, tps, tpt, m):
    """Several calls with random inputs: same loss, same centre after each call, same gradient."""
    g = torch.Generator().manual_seed(out_dim + batch)
    ours = DinoCrossViewLoss(out_dim, student_temp=tps, center_momentum=m, centering="center")
    ref = Algorithm1(out_dim, tps, m)
    for _ in range(4):
        s1, s2, t1, t2 = (torch.randn(batch, out_dim, generator=g) for _ in range(4))
        s1.requires_grad_(True)
        expected = ref.loss(s1, s2, t1, t2, tpt)
        (g_ref,) = torch.autograd.grad(expected, s1)
        got = ours(s1, s2, t1, t2, tpt)           # Alice's order: (student Q, student K, teacher Q, teacher K)
        (g_ours,) = torch.autograd.grad(got, s1)
        ref.update_center(t1, t2)
        assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
        torch.testing.assert_close(g_ours.double(), g_ref.double(), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(ours.center.double().reshape(-1), ref.C, rtol=1e-5, atol=1e-7)


def test_training_loop_matches_algorithm_1():
    """Five steps of Algorithm 1 with a small network: student, EMA teacher and centre equal the reference's."""
    torch.manual_seed(0)
    gs = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 8))
    ref_gs, ref_gt = copy.deepcopy(gs), copy.deepcopy(gs)              # gt.params = gs.params
    teacher = EmaTeacher(gs)
    loss_fn = DinoCrossViewLoss(8, student_temp=0.1, center_momentum=0.9, centering="center")
    ref = Algorithm1(8, 0.1, 0.9)
    opt, ref_opt = torch.optim.SGD(gs.parameters(), lr=0.5), torch.optim.SGD(ref_gs.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(1)
    lam, tpt = 0.9, 0.04
    for _ in range(5):
        x = torch.randn(4, 6, generator=g)
        x1, x2 = x + 0.1 * torch.randn(4, 6, generator=g), x + 0.1 * torch.randn(4, 6, generator=g)
        # ours
        loss = loss_fn(gs(x1), gs(x2), teacher(x1), teacher(x2), tpt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        teacher.update(gs, lam)
        # reference
        t1, t2 = ref_gt(x1), ref_gt(x2)
        ref_loss = ref.loss(ref_gs(x1), ref_gs(x2), t1, t2, tpt)
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
        with torch.no_grad():
            for pt, ps in zip(ref_gt.parameters(), ref_gs.parameters()):
                pt.copy_(lam * pt + (1 - lam) * ps)
        ref.update_center(t1, t2)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    # float32 round-off of two equal formulas, amplified by 1/tpt = 25 and lr 0.5 over five steps, reached 3e-6 on
    # one weight (under another thread layout); a wrong update differs by orders of magnitude more
    for a, b in zip(gs.parameters(), ref_gs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(teacher.module.parameters(), ref_gt.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss_fn.center.double().reshape(-1), ref.C, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------ schedules, as described
def _reference_schedules(n, lr, min_lr, lr_warm, wd0, wd1, m0, tpt0, tpt1, tpt_warm):
    """DINO Sec. 3 / App. A, one value per step i = 0..n-1:

    * learning rate: "linearly ramped up during the first [W] to its base value", then "decay[ed] with a cosine
      schedule" to min_lr (here reaching it on the last step);
    * weight decay: "cosine schedule from 0.04 to 0.4";
    * teacher momentum: "cosine schedule from 0.996 to 1 during training";
    * teacher temperature: "linear warm-up for tau_t from 0.04 to 0.07 during the first 30 epochs", then constant.
    """
    out = {"lr": [], "wd": [], "m": [], "tpt": []}
    for i in range(n):
        if i < lr_warm:
            out["lr"].append(lr * i / lr_warm)
        else:
            t = (i - lr_warm) / max(n - 1 - lr_warm, 1)
            out["lr"].append(min_lr + (lr - min_lr) * (1 + math.cos(math.pi * t)) / 2)
        t = i / max(n - 1, 1)
        out["wd"].append(wd1 + (wd0 - wd1) * (1 + math.cos(math.pi * t)) / 2)
        out["m"].append(1 - (1 - m0) * (1 + math.cos(math.pi * i / n)) / 2)
        out["tpt"].append(tpt0 + (tpt1 - tpt0) * i / tpt_warm if i < tpt_warm else tpt1)
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("steps,expected_warm", [(1000, (100, 300, 25)), (120, (50, 50, 25)), (30, (15, 15, 15))])
def test_schedules_match_the_paper_description_with_step_floors(steps, expected_warm):
    """DINO's fractions (LR warm-up 10 %, teacher temperature warm-up 30 %, last layer frozen 1 epoch of 100),
    with the floors in steps (50, 50, 25) that keep short runs from rounding them away, capped at half the run."""
    cfg = PretrainConfig(steps=steps, lr=5e-4, min_lr=1e-6, warmup_fraction=0.1, weight_decay=0.04,
                         weight_decay_end=0.4, momentum_teacher=0.996, warmup_teacher_temp=0.04, teacher_temp=0.07,
                         warmup_teacher_temp_fraction=0.3, freeze_last_layer_fraction=0.01, warmup_min_steps=50,
                         warmup_teacher_temp_min_steps=50, freeze_last_layer_min_steps=25).validate()
    s = Schedules.from_config(cfg)
    lr_warm, tpt_warm, freeze = expected_warm
    assert (s.lr_warmup_steps, s.teacher_temp_warmup_steps, s.freeze_last_layer_steps) == expected_warm
    ref = _reference_schedules(steps, 5e-4, 1e-6, lr_warm, 0.04, 0.4, 0.996, 0.04, 0.07, tpt_warm)
    np.testing.assert_allclose(s.lr, ref["lr"], rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(s.weight_decay, ref["wd"], rtol=1e-9)
    np.testing.assert_allclose(s.momentum, ref["m"], rtol=1e-12)
    np.testing.assert_allclose(s.teacher_temp, ref["tpt"], rtol=1e-12)


def test_head_logits_are_cosines_with_unit_prototypes():
    """DINO App.: l2-normalised bottleneck, weight-normalised last layer with the norm fixed to 1 ->
    logits are cosine similarities, so a temperature means the same thing for every head width."""
    from nnunet_alice.pretrain.objectives.heads import DinoHead

    torch.manual_seed(0)
    head = DinoHead(10, 32, 8, 20)
    z = F.normalize(head.mlp(torch.randn(7, 10)), dim=-1)
    w = head.last_layer.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(20))
    torch.testing.assert_close(head.last_layer(z), F.cosine_similarity(z[:, None], w[None], dim=-1))
