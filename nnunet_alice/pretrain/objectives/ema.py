"""The EMA teacher of Alice / DINO: a frozen copy of the student, updated by exponential moving average.

DINO, arXiv 2104.14294, Sec. 3; docs/method.md "Teacher and losses": the teacher is a full copy of the student
(encoder, decoder, projections, head),
initialised from the student and never trained by gradients. After every optimiser step

    theta_t <- m * theta_t + (1 - m) * theta_s            (over parameters whose names match)

with m from :func:`nnunet_alice.pretrain.training.schedules.momentum_schedule`. Buffers are copied from the student,
except those of submodules that declare ``keeps_own_buffers = True`` (e.g. ``heads.ClsPooling``, whose running
statistics describe the branch's own inputs: masked views for the student, unmasked ones for the teacher).

Mode. The teacher is **always in eval mode** (``train()`` on the wrapper does not change it):

* nnU-Net's planned networks use InstanceNorm without running statistics, so train and eval mode compute
  the same thing for the norms; eval only switches off dropout / drop-path, which makes the targets
  deterministic (the teacher in DINO has no dropout either);
* for a plan that uses BatchNorm, eval mode means "use the running statistics", which :meth:`update` copies
  from the student together with every other buffer, so the teacher never updates statistics itself.

The wrapped student may be a plain module, ``DistributedDataParallel`` / ``DataParallel`` (``.module``)
or ``torch.compile`` output (``._orig_mod``), nested in any order; :func:`unwrap` strips all of them.
"""
from __future__ import annotations

import copy
from typing import Dict

import torch
from torch import nn

from nnunet_alice.pretrain.model import unwrap

__all__ = ["unwrap", "EmaTeacher"]


class EmaTeacher(nn.Module):
    """Holds ``self.module``, a deep copy of the (unwrapped) student with ``requires_grad_(False)``.

    ``forward`` delegates to the copy under ``torch.no_grad()`` (the teacher never builds a graph).
    ``state_dict()`` keys are prefixed ``module.``; use ``teacher.module.state_dict()`` for the bare net.
    """

    def __init__(self, student: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(unwrap(student))
        self.module.requires_grad_(False)
        self.module.eval()

    def train(self, mode: bool = True) -> "EmaTeacher":
        """The wrapper's flag follows ``mode``; the teacher network itself stays in eval mode (see module doc)."""
        super().train(mode)
        self.module.eval()
        return self

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)

    @staticmethod
    def _matching(teacher: Dict[str, torch.Tensor], student: Dict[str, torch.Tensor], what: str):
        names = [n for n in teacher if n in student]
        if teacher and not names:
            raise KeyError(f"EMA update: no {what} names match between teacher and student; "
                           f"teacher has e.g. {next(iter(teacher))!r}")
        for n in names:
            if teacher[n].shape != student[n].shape:
                raise ValueError(f"EMA update: {what} {n!r} has shape {tuple(student[n].shape)} in the student "
                                 f"but {tuple(teacher[n].shape)} in the teacher")
        return names

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        """theta_t <- m theta_t + (1 - m) theta_s for every parameter name present in both; buffers are copied.

        Student parameters without a teacher counterpart (e.g. a student-only layer) are ignored.
        """
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
        m = float(momentum)
        src = unwrap(student)
        t_params = dict(self.module.named_parameters())
        s_params = dict(src.named_parameters())
        names = self._matching(t_params, s_params, "parameter")
        tp = [t_params[n] for n in names]
        sp = [s_params[n].detach().to(dtype=t_params[n].dtype, device=t_params[n].device) for n in names]
        if tp:
            torch._foreach_mul_(tp, m)
            torch._foreach_add_(tp, sp, alpha=1.0 - m)
        own = self.own_buffer_names()
        t_bufs = {n: b for n, b in self.module.named_buffers() if n not in own}
        s_bufs = dict(src.named_buffers())
        for n in self._matching(t_bufs, s_bufs, "buffer"):
            t_bufs[n].copy_(s_bufs[n])

    def own_buffer_names(self) -> set:
        """Buffers of the teacher that :meth:`update` leaves alone (submodules with ``keeps_own_buffers``)."""
        own = set()
        for prefix, mod in self.module.named_modules():
            if getattr(mod, "keeps_own_buffers", False):
                own.update(f"{prefix}.{n}" if prefix else n for n, _ in mod.named_buffers())
        return own
