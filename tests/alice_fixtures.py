"""Tiny networks, configs and batches for objective-level tests (no nnU-Net dataset needed)."""
from __future__ import annotations

import torch
from torch import nn

from nnunet_alice.pretrain.config import PretrainConfig
from nnunet_alice.pretrain.data.masking import batch_block_masks
from nnunet_alice.pretrain.model import freeze_unused_output_layers
from nnunet_alice.pretrain.training.schedules import Schedules

PATCH = (16, 16, 16)


def tiny_network(seed: int = 0, in_channels: int = 1) -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(seed)
    net = PlainConvUNet(in_channels, 3, (4, 8, 16), nn.Conv3d, 3, (1, 2, 2), (1, 1, 1), in_channels, (1, 1),
                        conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                        nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=False)
    freeze_unused_output_layers(net)
    return net


def tiny_config(**overrides) -> PretrainConfig:
    cfg = PretrainConfig(dataset_name="Dataset000_Test", steps=20, head_hidden_dim=32, head_bottleneck_dim=16,
                         head_out_dim=32, mask_block_size=4, lr=1e-3, min_lr=1e-5, warmup_fraction=0.0,
                         patch_size=list(PATCH), freeze_last_layer_fraction=0.0)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg.validate()


def schedules_for(cfg: PretrainConfig) -> Schedules:
    return Schedules.from_config(cfg, cfg.total_steps())


def structured_volume(gen: torch.Generator, batch: int) -> torch.Tensor:
    """Smooth random blobs: learnable structure for reconstruction."""
    x = torch.randn(batch, 1, 4, 4, 4, generator=gen)
    return nn.functional.interpolate(x, size=PATCH, mode="trilinear", align_corners=False)


def alice_batch(batch: int, seed: int = 0, ratio: float = 0.5) -> dict:
    import numpy as np

    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    q, k = structured_volume(gen, batch), structured_volume(gen, batch)
    noise = lambda v: v + 0.05 * torch.randn(v.shape, generator=gen)  # noqa: E731
    return {"student_q": noise(q), "teacher_q": noise(q), "student_k": noise(k), "teacher_k": noise(k),
            "mask_q": torch.from_numpy(batch_block_masks(batch, PATCH, 4, ratio, rng)),
            "mask_k": torch.from_numpy(batch_block_masks(batch, PATCH, 4, ratio, rng))}
