"""Masked image modelling through the planned U-Net (Alice's generative term, alice-method.md §3 (3)).

The student sees its view with masked blocks set to zero (official code: pixel zeroing) and reconstructs
the unmasked view through the decoder; the loss is the MSE on masked voxels (``--recon-region masked``,
default) or on all voxels (``all``, the official code).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from nnunet_alice.pretrain.losses import reconstruction_loss


class MaeObjective(nn.Module):
    def __init__(self, network: nn.Module, config):
        super().__init__()
        self.network = network
        self.config = config

    def enable_compile(self) -> None:
        """torch.compile the network's forward; kept outside the module tree, so state dicts stay plain."""
        self.__dict__["_compiled"] = torch.compile(self.network)

    def student_modules(self) -> Dict[str, nn.Module]:
        """Modules the optimiser trains (name → module); names prefix the parameter groups."""
        return {"network": self.network}

    def forward(self, batch: Dict[str, torch.Tensor], step: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        x, mask = batch["student_q"], batch["mask_q"]
        pred = self.__dict__.get("_compiled", self.network)(x * (1.0 - mask))
        if isinstance(pred, (list, tuple)):
            pred = pred[0]
        rec = reconstruction_loss(pred.float(), x, mask, self.config.recon_region)
        return rec, {"recon": rec.detach()}

    def after_optimizer_step(self, step: int) -> None:
        """Nothing to update for MAE (Alice updates its EMA teacher here)."""

    def before_optimizer_step(self, step: int) -> None:
        """Nothing to do for MAE (Alice cancels last-layer gradients early on)."""
