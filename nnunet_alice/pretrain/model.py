"""The student network is exactly the network nnU-Net planned; this module builds it and taps its features.

* ``build_planned_network``: nnU-Net's own builder (``nnUNetTrainer.build_network_architecture`` →
  ``get_network_from_plans``) with as many output channels as input channels, so every tensor has the key and
  shape of the network nnU-Net will fine-tune except the segmentation layers, which pretraining does not use
  (reconstruction has its own head, ``pretrain/objectives/sparse.py``) and fine-tuning never loads.
* ``UNetFeatures``: runs the network once and returns its output plus the two feature maps Alice needs from a
  CNN U-Net (docs/method.md): the bottleneck (encoder tokens; its global average pool is the "CLS") and an early
  decoder stage (decoder tokens). Features are read with forward hooks, so nnU-Net's forward is never
  re-implemented and torch.compile / DDP wrappers keep working.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn


def build_planned_network(plans_manager, configuration_manager, num_input_channels: int) -> nn.Module:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    network = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                       num_input_channels, enable_deep_supervision=False)
    freeze_unused_output_layers(network)
    return network


def freeze_unused_output_layers(network: nn.Module) -> None:
    """Pretraining reconstructs through a separate head, so no segmentation layer gets a gradient.

    They are excluded from optimisation (and DDP's gradient reduction, which would otherwise wait for them).
    Output layers are never transferred to fine-tuning anyway.
    """
    unwrap(network).decoder.seg_layers.requires_grad_(False)


def unwrap(module: nn.Module) -> nn.Module:
    """Strip DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers, any nesting.

    The one home of this helper: every module that needs the bare network imports it from here."""
    while True:
        if isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        elif isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        else:
            return module


def feature_channels(network: nn.Module, decoder_stage: int = 0) -> Dict[str, int]:
    """Channels of the bottleneck and of decoder stage ``decoder_stage`` (0 = the lowest-resolution stage)."""
    net = unwrap(network)
    return {"bottleneck": int(net.encoder.output_channels[-1]),
            "decoder": int(net.encoder.output_channels[-2 - decoder_stage])}


class UNetFeatures:
    """``features(x) -> {"recon", "bottleneck", "decoder"}`` for a dynamic-network-architectures U-Net.

    A plain object, not an ``nn.Module``: it holds hooks on ``network`` without registering it a second time
    (the owner registers the network; a deep copy of the owner copies the hooks along).
    """

    def __init__(self, network: nn.Module, decoder_stage: int = 0):
        self.network = network
        self._run = None
        self.decoder_stage = decoder_stage
        self._store: Dict[str, torch.Tensor] = {}
        net = unwrap(network)
        n_dec = len(net.decoder.stages)
        if not 0 <= decoder_stage < n_dec:
            raise ValueError(f"decoder_stage must be in [0, {n_dec}), got {decoder_stage}")
        self._hooks: List = [
            net.encoder.register_forward_hook(self._keep_bottleneck),
            net.decoder.stages[decoder_stage].register_forward_hook(self._keep_decoder),
        ]

    def _keep_bottleneck(self, module, inputs, output):
        self._store["bottleneck"] = output[-1] if isinstance(output, (list, tuple)) else output

    def _keep_decoder(self, module, inputs, output):
        self._store["decoder"] = output

    def compile(self, **kwargs) -> None:
        """Run the network through ``torch.compile``; hooks and parameters stay on the original module,
        so state dicts never see ``_orig_mod``."""
        self._run = torch.compile(self.network, **kwargs)

    def encoder(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The encoder alone: ``{"bottleneck"}``, for what needs no decoder (the CLS of an unmasked view)."""
        self._store.clear()
        unwrap(self.network).encoder(x)
        out = dict(self._store)
        self._store.clear()
        return out

    def __call__(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        self._store.clear()
        recon = (self._run if self._run is not None else self.network)(x)
        if isinstance(recon, (list, tuple)):
            recon = recon[0]
        out = {"recon": recon, **self._store}
        self._store.clear()
        return out
