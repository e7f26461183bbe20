"""KoLeo spread regulariser on the student's CLS embedding, against a memory of earlier embeddings.

DINOv2 (Oquab et al. 2023, arXiv 2304.07193, Sec. 4 "KoLeo regularizer"; Sablayrolles et al. 2019,
arXiv 1806.03198) adds L = -1/n sum_i log(d_i), d_i the distance from the L2-normalised embedding z_i to its
nearest neighbour in the batch, so that embeddings spread over the sphere; public code:
https://github.com/facebookresearch/dinov2/blob/main/dinov2/loss/koleo_loss.py.

At batch 2 the batch holds two volumes, and the nearest neighbour of a view is the other view of its own
volume, which the CLS term pulls closer; pushing that pair apart would fight the invariance the CLS term teaches.
So the neighbours here are the student's embeddings of the previous steps (detached, a ring buffer of
``memory`` rows, other volumes with high probability), as in a memory bank (Wu et al. 2018, arXiv 1805.01978).
Under torch.distributed each rank keeps its own memory (DINOv2 takes the nearest neighbour within each GPU's
batch too). Why it was added, and that it did not stop the student's CLS embeddings from collapsing at batch 2,
is measured in docs/method.md "Teacher targets at small batch" and docs/results.md.
"""
from __future__ import annotations

import torch
from torch import nn

from nnunet_alice.pretrain.objectives.losses import ring_push


class KoLeoMemory(nn.Module):
    def __init__(self, dim: int, memory: int = 64, eps: float = 1e-8):
        super().__init__()
        if memory < 1:
            raise ValueError(f"memory must be >= 1, got {memory}")
        self.eps = float(eps)
        self.register_buffer("bank", torch.zeros(int(memory), int(dim)))
        self.register_buffer("bank_len", torch.zeros((), dtype=torch.long))
        self.register_buffer("bank_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` (R, dim), L2-normalised rows: -mean log(distance to the nearest memory row); 0 while the memory
        is empty. The rows enter the memory afterwards (detached)."""
        if z.dim() != 2 or z.shape[1] != self.bank.shape[1]:
            raise ValueError(f"z must be (R, {self.bank.shape[1]}), got {tuple(z.shape)}")
        n = int(self.bank_len)
        if n:
            d = torch.cdist(z.float(), self.bank[:n].clone())         # (R, n); a copy: the bank changes below
            loss = -torch.log(d.min(dim=1).values + self.eps).mean()
        else:
            loss = z.new_zeros(()).float() + 0.0 * z.sum()           # keeps the graph (DDP: every parameter used)
        ring_push(self.bank, self.bank_ptr, self.bank_len, z.detach().float())
        return loss
