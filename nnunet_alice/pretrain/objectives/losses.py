"""The three Alice loss terms, the teacher targets they use, and two collapse monitors (Alice, arXiv 2302.05615;
docs/method.md "Teacher and losses").

* :class:`DinoCrossViewLoss` -- Eq. (1), inter-volume DINO CE on the CLS outputs, teacher(Q) <-> student(K)
  and teacher(K) <-> student(Q), with a detached teacher turned into targets (below);
* :class:`CasaTokenLoss` -- Eq. (2), CE between the CASA outputs S (student) and T (target) per query token,
  averaged over the tokens whose region was masked in the student view (iBOT, Zhou et al. 2022,
  arXiv 2111.07832, Eq. 1: the patch loss is taken on masked patches);
* :func:`reconstruction_loss` -- Eq. (3), MSE of the decoder's reconstruction (masked voxels or all voxels).

Teacher targets (``centering``):

* ``"sinkhorn"`` -- Sinkhorn-Knopp normalisation of exp(t / tau_t) over the rows of the global batch (SwAV,
  Caron et al. 2020, arXiv 2006.09882, Sec. 3.1; DINOv2, Oquab et al. 2023, arXiv 2304.07193, Sec. 4): every
  prototype gets the same share of the batch's mass, so no prototype can take every sample (one-hot collapse)
  and rows that differ stay different, without the history a centre needs -- which is why it works at batch
  2-8. Optionally with a queue of past teacher rows (SwAV Sec. 4 "small batches"): the equipartition is then
  enforced over queue + batch, and only the batch rows are used as targets. Computed in the log domain (the
  paper's tau_t = 0.01 puts exp(1 / tau_t) beyond float32), three iterations as in DINOv2.
* ``"center"`` -- DINO's centring (Caron et al. 2021, arXiv 2104.14294, Algorithm 1): softmax((t - c) / tau_t),
  c <- m c + (1 - m) * batch mean of t. The centre is tracked in both modes (it is a cheap diagnostic and lets a
  run switch modes), but subtracted only in this one.

As in DINO the losses are small modules that own their buffers and update them inside ``forward`` (under
``no_grad``, after the loss is computed); batch statistics are taken over the **global** batch when
``torch.distributed`` is initialised. All softmaxes run in float32 (the teacher temperature 0.008 -> 0.01 is
far too sharp for bf16 logits). ``last_targets`` holds the targets of the latest call for the monitors.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

__all__ = ["DinoCrossViewLoss", "CasaTokenLoss", "reconstruction_loss", "teacher_entropy", "kl_to_uniform",
           "global_mean", "sinkhorn_knopp", "ring_push", "probs_entropy", "probs_kl_to_uniform", "CENTERINGS"]

Tensors = Union[torch.Tensor, Sequence[torch.Tensor]]
CENTERINGS = ("sinkhorn", "center")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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
    if _distributed():
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return (packed[:-1] / packed[-1]).reshape(rows.shape[1:])


@torch.no_grad()
def _global_sum(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    if _distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


@torch.no_grad()
def _column_logsumexp(log_q: torch.Tensor) -> torch.Tensor:
    """log sum_r exp(log_q[r, k]) over the rows of every rank: (1, K)."""
    m = log_q.max(dim=0, keepdim=True).values
    if _distributed():
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
    s = _global_sum(torch.exp(log_q - m).sum(dim=0, keepdim=True))
    return m + torch.log(s)


@torch.no_grad()
def ring_push(buffer: torch.Tensor, ptr: torch.Tensor, length: torch.Tensor, rows: torch.Tensor) -> None:
    """Write ``rows`` (R, D) into the ring buffer ``buffer`` (S, D) at ``ptr``, keeping the last S rows; ``ptr`` and
    ``length`` (0-d long buffers: next slot, rows held) are updated in place."""
    size = buffer.shape[0]
    rows = rows.detach()[-size:]
    idx = (torch.arange(rows.shape[0], device=rows.device) + int(ptr)) % size
    buffer[idx] = rows.to(buffer)
    ptr.fill_((int(ptr) + rows.shape[0]) % size)
    length.fill_(min(size, int(length) + rows.shape[0]))


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, iterations: int = 3,
                   extra_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sinkhorn-Knopp targets (SwAV Sec. 3.1 / DINOv2) for the rows of ``logits`` (R, K); rows sum to 1.

    Q = exp(logits / tau) over the global rows (``extra_rows`` (Q, K), e.g. a queue, are included in the
    normalisation but not returned) is alternately scaled so that every prototype holds 1/K of the mass and every
    row 1/R_total; the result is rescaled so that each returned row is a distribution.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    rows = logits.detach().float()
    n_local = rows.shape[0]
    if extra_rows is not None and extra_rows.numel():
        rows = torch.cat([extra_rows.detach().float().to(rows.device), rows])
    k = rows.shape[-1]
    log_total = torch.log(_global_sum(rows.new_tensor(float(rows.shape[0]))))
    log_q = rows / temp
    for _ in range(int(iterations)):
        log_q = log_q - _column_logsumexp(log_q) - math.log(k)
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - log_total
    return torch.exp(log_q + log_total)[rows.shape[0] - n_local:]


class _TeacherTargets(nn.Module):
    """Owns the centre (and the optional queue) and turns teacher logits into target distributions."""

    def __init__(self, center_shape, student_temp: float, center_momentum: float, centering: str = "center",
                 sinkhorn_iterations: int = 3, queue_size: int = 0):
        super().__init__()
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
        if queue_size < 0 or sinkhorn_iterations < 1:
            raise ValueError(f"need queue_size >= 0 and sinkhorn_iterations >= 1, got {queue_size}, "
                             f"{sinkhorn_iterations}")
        self.student_temp, self.center_momentum = float(student_temp), float(center_momentum)
        self.centering, self.sinkhorn_iterations = centering, int(sinkhorn_iterations)
        self.register_buffer("center", torch.zeros(*center_shape))
        self.queue_size = int(queue_size) if centering == "sinkhorn" else 0
        if self.queue_size:
            self.register_buffer("queue", torch.zeros(self.queue_size, center_shape[-1]))
            self.register_buffer("queue_len", torch.zeros((), dtype=torch.long))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.last_targets: Optional[torch.Tensor] = None

    @property
    def out_dim(self) -> int:
        return int(self.center.shape[-1])

    def _centred(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` (R, K) minus the current centre (the centre's trailing dimension is K)."""
        return rows - self.center.reshape(1, -1)

    def _targets(self, rows: torch.Tensor, temp: float) -> torch.Tensor:
        """Targets for teacher logits ``rows`` (R, K) at temperature ``temp``; detached, float32.

        Sinkhorn-Knopp runs on centred rows. Over the batch alone that changes nothing (a per-prototype offset
        is absorbed by the column scaling), but the queue holds rows of earlier teachers: a teacher whose logits
        drift by a common per-prototype offset would otherwise put every new row on the prototypes the queue
        used least, a target shared by all samples that a constant student predicts (measured, docs/method.md).
        The queue therefore stores each row centred by the centre of its own step.
        """
        if self.centering == "center":
            return _teacher_prob(rows, self.center.reshape(1, -1), temp)
        extra = self.queue[: int(self.queue_len)] if self.queue_size else None
        return sinkhorn_knopp(self._centred(rows), temp, self.sinkhorn_iterations, extra)

    @torch.no_grad()
    def _update(self, batch_center: torch.Tensor, rows: torch.Tensor) -> None:
        """Push ``rows`` centred by the current centre into the queue, then c <- m c + (1 - m) mean (DINO;
        ``batch_center`` has the centre's shape)."""
        if self.queue_size:
            ring_push(self.queue, self.queue_ptr, self.queue_len, self._centred(rows.detach().float()))
        self.center.mul_(self.center_momentum).add_(batch_center.to(self.center), alpha=1.0 - self.center_momentum)


class DinoCrossViewLoss(_TeacherTargets):
    """Alice Eq. (1) / DINO: L = 1/2 [ H(P_t(Q), P_s(K)) + H(P_t(K), P_s(Q)) ], averaged over the batch.

    P_t = the teacher targets of both views, computed jointly (``centering``, module doc), detached;
    P_s(x) = softmax(g_s(x) / tau_s). Inputs are (B, out_dim) CLS logits per view. After the loss the centre
    (shape (1, out_dim)) moves towards the mean teacher logit of both views over the global batch, and the
    teacher rows enter the queue (if any).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "center", sinkhorn_iterations: int = 3, queue_size: int = 0):
        super().__init__((1, out_dim), student_temp, center_momentum, centering, sinkhorn_iterations, queue_size)

    def forward(self, student_out_q: torch.Tensor, student_out_k: torch.Tensor, teacher_out_q: torch.Tensor,
                teacher_out_k: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        for name, t in (("student_out_q", student_out_q), ("student_out_k", student_out_k),
                        ("teacher_out_q", teacher_out_q), ("teacher_out_k", teacher_out_k)):
            if t.dim() != 2 or t.shape[-1] != self.out_dim:
                raise ValueError(f"{name} must be (B, {self.out_dim}), got {tuple(t.shape)}")
        rows = torch.cat([teacher_out_q, teacher_out_k], dim=0).detach().float()
        targets = self._targets(rows, teacher_temp)
        t_q, t_k = targets[: teacher_out_q.shape[0]], targets[teacher_out_q.shape[0]:]
        loss = 0.5 * (_cross_entropy(t_q, student_out_k, self.student_temp).mean()
                      + _cross_entropy(t_k, student_out_q, self.student_temp).mean())
        self.last_targets = targets
        self._update(global_mean(rows).unsqueeze(0), rows)
        return loss


class CasaTokenLoss(_TeacherTargets):
    """Alice Eq. (2) (iBOT-style): mean over views of the mean over masked query tokens of
    H(P_t(T), softmax(S / tau_s)).

    ``student`` / ``teacher`` are S and T, either one (B, N, out_dim) tensor or a sequence with one such tensor
    per view. ``token_mask`` (same structure, (B, N), 1 = the token's region was masked in the student view)
    selects the tokens; ``None`` or a view without any masked token uses all its tokens. Targets of all tokens of
    all views are computed jointly (``centering``). The per-view mean divides by the global count of selected
    tokens, so data-parallel gradients equal those of the concatenated batch. The centre c2 (1, 1, out_dim)
    follows the per-sample token mean of T over the global batch (all views, all tokens).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "center", sinkhorn_iterations: int = 3, queue_size: int = 0):
        super().__init__((1, 1, out_dim), student_temp, center_momentum, centering, sinkhorn_iterations, queue_size)

    def forward(self, student: Tensors, teacher: Tensors, teacher_temp: float,
                token_mask: Optional[Tensors] = None) -> torch.Tensor:
        s_views = [student] if torch.is_tensor(student) else list(student)
        t_views = [teacher] if torch.is_tensor(teacher) else list(teacher)
        if token_mask is None:
            m_views = [None] * len(s_views)
        else:
            m_views = [token_mask] if torch.is_tensor(token_mask) else list(token_mask)
        if len(s_views) != len(t_views) or not s_views or len(m_views) != len(s_views):
            raise ValueError(f"need as many student as teacher views (and masks), got {len(s_views)}, "
                             f"{len(t_views)} and {len(m_views)}")
        for s, t, m in zip(s_views, t_views, m_views):
            if s.shape != t.shape or s.dim() != 3 or s.shape[-1] != self.out_dim:
                raise ValueError(f"S and T must both be (B, N, {self.out_dim}), got {tuple(s.shape)} and "
                                 f"{tuple(t.shape)}")
            if m is not None and tuple(m.shape) != tuple(s.shape[:2]):
                raise ValueError(f"token_mask must be (B, N) = {tuple(s.shape[:2])}, got {tuple(m.shape)}")
        rows = torch.cat([t.detach().float().reshape(-1, self.out_dim) for t in t_views])
        targets = self._targets(rows, teacher_temp)
        losses, start = [], 0
        for s, t, m in zip(s_views, t_views, m_views):
            n = t.shape[0] * t.shape[1]
            ce = _cross_entropy(targets[start:start + n].reshape(t.shape), s, self.student_temp)  # (B, N)
            start += n
            losses.append(self._masked_mean(ce, m))
        loss = torch.stack(losses).mean()
        self.last_targets = targets
        self._update(global_mean(torch.cat([t.detach().float().mean(dim=1) for t in t_views])).reshape(1, 1, -1),
                     rows)
        return loss

    @staticmethod
    def _masked_mean(ce: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Mean of ``ce`` over the selected tokens of the global batch (all tokens if none is selected)."""
        world = dist.get_world_size() if _distributed() else 1
        w = torch.ones_like(ce) if mask is None else mask.to(ce.dtype)
        counts = _global_sum(torch.stack([w.sum(), w.new_tensor(float(w.numel()))]).detach())
        masked = (ce * w).sum() / (counts[0] / world).clamp_min(1e-12)
        everything = ce.sum() / (counts[1] / world)
        return torch.where(counts[0] > 0, masked, everything)


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
                        region: str = "masked") -> torch.Tensor:
    """Alice Eq. (3): MSE between the reconstruction and the unmasked input (no extra 1/2; weight with lambda).

    ``region='all'``: mean over every voxel and channel (the official code, bug B5 in docs/method.md made official).
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
def probs_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean per-row entropy (nats, in [0, log K]) of target distributions ``probs`` (..., K)."""
    p = probs.float().reshape(-1, probs.shape[-1])
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1).mean()


@torch.no_grad()
def probs_kl_to_uniform(probs: torch.Tensor) -> torch.Tensor:
    """KL(p_bar || u) = log K - H(p_bar) of the mean distribution p_bar of the rows of ``probs`` (..., K)."""
    p_bar = probs.float().reshape(-1, probs.shape[-1]).mean(dim=0)
    return (p_bar * (torch.log(p_bar.clamp_min(1e-30)) + math.log(p_bar.numel()))).sum()


@torch.no_grad()
def teacher_entropy(teacher_logits: torch.Tensor, center: Optional[torch.Tensor], temp: float) -> torch.Tensor:
    """:func:`probs_entropy` of softmax((t - c) / tau_t) (DINO centring; ``center=None``: no centre).

    Near log K: every sample is uniform (uniform collapse); near 0: every sample is one-hot -- a collapse only if
    they share the prototype, which :func:`kl_to_uniform` tells.
    """
    c = 0.0 if center is None else center.float()
    return probs_entropy(F.softmax((teacher_logits.float() - c) / temp, dim=-1))


@torch.no_grad()
def kl_to_uniform(teacher_logits: torch.Tensor, center: Optional[torch.Tensor], temp: float) -> torch.Tensor:
    """:func:`probs_kl_to_uniform` of softmax((t - c) / tau_t): KL of the **batch-mean** distribution, in nats.

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
    return probs_kl_to_uniform(F.softmax((teacher_logits.float() - c) / temp, dim=-1))
