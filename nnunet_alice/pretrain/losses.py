"""The three Alice loss terms and two collapse monitors (alice-method Sec. 3).

* :class:`DinoCrossViewLoss` -- Eq. (1), inter-volume DINO CE on the CLS outputs, teacher(Q) <-> student(K)
  and teacher(K) <-> student(Q), with a centred, sharpened, detached teacher;
* :class:`CasaTokenLoss` -- Eq. (2), CE between the CASA outputs S (student) and T (target) per query token;
* :func:`reconstruction_loss` -- Eq. (3), MSE of the decoder's reconstruction (masked voxels or all voxels).

As in DINO the losses are small modules that own their centre buffers and update them inside ``forward``
(under ``no_grad``, after the loss is computed); the centre is the mean over the **global** batch when
``torch.distributed`` is initialised. All softmaxes run in float32 (the teacher temperature 0.008 -> 0.01
is far too sharp for bf16 logits).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

__all__ = ["DinoCrossViewLoss", "CasaTokenLoss", "reconstruction_loss", "teacher_entropy", "kl_to_uniform",
           "global_mean"]

Tensors = Union[torch.Tensor, Sequence[torch.Tensor]]


def _cross_entropy(teacher_prob: torch.Tensor, student_logits: torch.Tensor, student_temp: float) -> torch.Tensor:
    """H(a, b) = -sum_k a_k log b_k per row, b = softmax(student / tau_s); returns the rows' H (no reduction)."""
    return -(teacher_prob * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(dim=-1)


def _teacher_prob(teacher_logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """softmax((t - c) / tau_t), detached (the teacher side never receives gradients)."""
    return F.softmax((teacher_logits.detach().float() - center) / temp, dim=-1)


@torch.no_grad()
def global_mean(rows: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 of ``rows`` (R, ...) across all ranks: sum and count are all-reduced together.

    Equals the mean of the concatenated global batch, also when ranks hold different numbers of rows.
    """
    flat = rows.detach().float().reshape(rows.shape[0], -1)
    packed = torch.cat([flat.sum(dim=0), flat.new_tensor([float(rows.shape[0])])])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return (packed[:-1] / packed[-1]).reshape(rows.shape[1:])


class _CenteredLoss(nn.Module):
    def __init__(self, center_shape, student_temp: float, center_momentum: float):
        super().__init__()
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        self.student_temp, self.center_momentum = float(student_temp), float(center_momentum)
        self.register_buffer("center", torch.zeros(*center_shape))

    @torch.no_grad()
    def _update(self, batch_center: torch.Tensor) -> None:
        """c <- m c + (1 - m) mean (DINO); ``batch_center`` already has the centre's shape."""
        self.center.mul_(self.center_momentum).add_(batch_center.to(self.center), alpha=1.0 - self.center_momentum)


class DinoCrossViewLoss(_CenteredLoss):
    """Alice Eq. (1) / DINO: L = 1/2 [ H(P_t(Q), P_s(K)) + H(P_t(K), P_s(Q)) ], averaged over the batch.

    P_t(x) = softmax((g_t(x) - c) / tau_t) (detached), P_s(x) = softmax(g_s(x) / tau_s). Inputs are
    (B, out_dim) CLS logits per view. After the loss, c <- m c + (1 - m) * mean of the teacher logits of both
    views over the global batch; ``center`` has shape (1, out_dim).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__((1, out_dim), student_temp, center_momentum)

    def forward(self, student_out_q: torch.Tensor, student_out_k: torch.Tensor, teacher_out_q: torch.Tensor,
                teacher_out_k: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        for name, t in (("student_out_q", student_out_q), ("student_out_k", student_out_k),
                        ("teacher_out_q", teacher_out_q), ("teacher_out_k", teacher_out_k)):
            if t.dim() != 2 or t.shape[-1] != self.center.shape[-1]:
                raise ValueError(f"{name} must be (B, {self.center.shape[-1]}), got {tuple(t.shape)}")
        t_q = _teacher_prob(teacher_out_q, self.center, teacher_temp)
        t_k = _teacher_prob(teacher_out_k, self.center, teacher_temp)
        loss = 0.5 * (_cross_entropy(t_q, student_out_k, self.student_temp).mean()
                      + _cross_entropy(t_k, student_out_q, self.student_temp).mean())
        self._update(global_mean(torch.cat([teacher_out_q, teacher_out_k], dim=0)).unsqueeze(0))
        return loss


class CasaTokenLoss(_CenteredLoss):
    """Alice Eq. (2) (iBOT-style): mean over views, batch, query tokens of H(sm((T - c2)/tau_t), sm(S/tau_s)).

    ``student`` / ``teacher`` are S and T, either one (B, N, out_dim) tensor (views stacked on the batch, as
    in the official code) or a sequence with one such tensor per view (the loss is then the mean of the
    per-view means). The centre c2 (1, 1, out_dim) is updated from the token mean of T, averaged over the
    global batch (all views).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__((1, 1, out_dim), student_temp, center_momentum)

    def forward(self, student: Tensors, teacher: Tensors, teacher_temp: float) -> torch.Tensor:
        s_views = [student] if torch.is_tensor(student) else list(student)
        t_views = [teacher] if torch.is_tensor(teacher) else list(teacher)
        if len(s_views) != len(t_views) or not s_views:
            raise ValueError(f"need as many student as teacher views, got {len(s_views)} and {len(t_views)}")
        losses, token_means = [], []
        for s, t in zip(s_views, t_views):
            if s.shape != t.shape or s.dim() != 3 or s.shape[-1] != self.center.shape[-1]:
                raise ValueError(f"S and T must both be (B, N, {self.center.shape[-1]}), "
                                 f"got {tuple(s.shape)} and {tuple(t.shape)}")
            losses.append(_cross_entropy(_teacher_prob(t, self.center, teacher_temp), s, self.student_temp).mean())
            token_means.append(t.detach().float().mean(dim=1))
        loss = torch.stack(losses).mean()
        self._update(global_mean(torch.cat(token_means, dim=0)).reshape(1, 1, -1))
        return loss


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
                        region: str = "masked") -> torch.Tensor:
    """Alice Eq. (3): MSE between the reconstruction and the unmasked input (no extra 1/2; weight with lambda).

    ``region='all'``: mean over every voxel and channel (the official code, bug B5 made official).
    ``region='masked'``: mean over the masked voxels only; ``mask`` is (B, 1, *spatial) (or pred's shape),
    1/True = masked, broadcast over channels. A mask without any masked voxel (e.g. mask ratio 0) falls back
    to the all-voxel MSE, so the term stays defined and keeps its gradient; the choice is made with
    ``torch.where`` (no host sync). The result is 0 exactly for a perfect reconstruction.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    sq = (pred.float() - target.float()) ** 2
    mse_all = sq.mean()
    if region == "all":
        return mse_all
    if region != "masked":
        raise ValueError(f"region must be 'masked' or 'all', got {region!r}")
    if mask is None:
        raise ValueError("region='masked' needs a mask")
    if mask.dim() != pred.dim() or mask.shape[0] != pred.shape[0] or mask.shape[2:] != pred.shape[2:] \
            or mask.shape[1] not in (1, pred.shape[1]):
        raise ValueError(f"mask must be (B, 1, *spatial) for pred {tuple(pred.shape)}, got {tuple(mask.shape)}")
    w = mask.to(sq.dtype).expand_as(sq)
    count = w.sum()
    mse_masked = (sq * w).sum() / count.clamp_min(1.0)
    return torch.where(count > 0, mse_masked, mse_all)


@torch.no_grad()
def teacher_entropy(teacher_logits: torch.Tensor, center: Optional[torch.Tensor], temp: float) -> torch.Tensor:
    """Mean per-row entropy (nats, in [0, log K]) of the teacher distribution softmax((t - c) / tau_t).

    Rows are all leading dimensions of ``teacher_logits`` (..., K). Near log K: every sample is uniform
    (uniform collapse); near 0: every sample is one-hot -- a collapse only if they share the prototype,
    which :func:`kl_to_uniform` tells.
    """
    c = 0.0 if center is None else center.float()
    logp = F.log_softmax((teacher_logits.float() - c) / temp, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean()


@torch.no_grad()
def kl_to_uniform(teacher_logits: torch.Tensor, center: Optional[torch.Tensor], temp: float) -> torch.Tensor:
    """KL(p_bar || u) = log K - H(p_bar) of the **batch-mean** teacher distribution p_bar (local batch), in nats.

    Chosen over the mean per-sample KL(p || u), which is just log K minus :func:`teacher_entropy`. Reading
    the two monitors together:

    ========================  ======================  =======================
    state                     teacher_entropy         kl_to_uniform
    ========================  ======================  =======================
    uniform collapse          ~ log K                 ~ 0
    one-hot collapse          ~ 0                     ~ log K (all rows pick one prototype)
    healthy                   low (sharp rows)        low (prototypes used evenly)
    ========================  ======================  =======================
    """
    c = 0.0 if center is None else center.float()
    p = F.softmax((teacher_logits.float() - c) / temp, dim=-1)
    p_bar = p.reshape(-1, p.shape[-1]).mean(dim=0)
    k = p_bar.numel()
    return (p_bar * (torch.log(p_bar.clamp_min(1e-30)) + math.log(k))).sum()
