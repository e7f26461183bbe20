"""Masked image modelling through the planned U-Net (Alice's generative term, docs/method.md "Masked image modelling").

The student sees its view with masked blocks set to zero. With ``--masking spark`` (default) the network runs as
a sparse encoder with mask tokens and densify convolutions before the decoder (SparK, arXiv 2301.03580, as in
nnssl for nnU-Net plans, arXiv 2410.23132; ``objectives/sparse.py``); ``--masking zero`` runs it densely. A separate
1×1×1 head on the last decoder stage reconstructs the target: the same spatially augmented crop without the
intensity augmentation (``target_q``; the student view itself when a batch has no target). The loss is the MSE on
masked voxels (``--recon-region masked``, default) or all voxels (``all``, the official code), optionally against
a target standardised per mask block (``--recon-norm-target``).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from nnunet_alice.pretrain.model import unwrap
from nnunet_alice.pretrain.objectives.sparse import SparseMaskedModel, mim_loss


def input_channels(network: nn.Module) -> int:
    """Input channels of a dynamic-network-architectures U-Net (its first encoder convolution)."""
    conv = next(m for m in unwrap(network).encoder.modules() if isinstance(m, nn.modules.conv._ConvNd))
    return int(conv.in_channels)


class MaeObjective(nn.Module):
    def __init__(self, network: nn.Module, config):
        super().__init__()
        self.network = network
        self.config = config
        self.mim = SparseMaskedModel(network, input_channels(network), masking=config.masking)

    def enable_compile(self) -> None:
        """torch.compile the network's forward; kept outside the module tree, so state dicts stay plain."""
        self.__dict__["_compiled"] = torch.compile(self.network)

    def student_modules(self) -> Dict[str, nn.Module]:
        """Modules the optimiser trains (name → module); names prefix the parameter groups."""
        return {"network": self.network, "mim": self.mim}

    def forward(self, batch: Dict[str, torch.Tensor], step: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        x, mask = batch["student_q"], batch["mask_q"]
        target = batch.get("target_q", x)
        with self.mim.masked(mask):
            self.__dict__.get("_compiled", self.network)(x * (1.0 - mask))
        cfg = self.config
        rec = mim_loss(self.mim.reconstruction(), target, mask, cfg.recon_region, cfg.recon_norm_target,
                       cfg.mask_block_size)
        return rec, {"recon": rec.detach()}

    def after_optimizer_step(self, step: int) -> None:
        """Nothing to update for MAE (Alice updates its EMA teacher here)."""

    def before_optimizer_step(self, step: int) -> None:
        """Nothing to do for MAE (Alice cancels last-layer gradients early on)."""
