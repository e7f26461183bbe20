"""A small dense anatomical embedding network: a light 3D U-Net with a coarse and a fine embedding head.

Plays the role of SAM (Yan et al., "SAM: Self-supervised Learning of Pixel-wise Anatomical Embeddings in
Radiological Images", IEEE TMI 2022): every voxel gets a *global* (coarse, large receptive field) and a
*local* (fine) embedding, both L2-normalised per location. SAM uses a ResNet-18 + FPN with 128-d maps at
strides (4, 16, 16) / 2 on a 2 mm grid; this network is our own, much lighter design for CPU training: the
encoder is dynamic-network-architectures' ``PlainConvEncoder`` (features 8-16-32-64, strides 1, 2, 2, 2), the
decoder (transposed convolution + skip + ``StackedConvBlocks``) goes up to the fine level; by default the
fine head reads it at stride 1 and the coarse head at stride 4 of a 4 mm embedding grid (cells of 4 and
16 mm). BatchNorm, so that whole-volume inference sees the normalisation statistics of training.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_ARCH: Dict = {
    "features": [8, 16, 32, 64],
    "n_conv_per_stage": 2,
    "fine_dim": 32,
    "coarse_dim": 32,
    "fine_level": 0,      # stride 1 on the embedding grid (4 mm by default, SAM's fine cell size)
    "coarse_level": 2,    # stride 4 (16 mm)
    "norm": "batch",      # batch | instance | none
    "head_norm": True,    # standardise every embedding channel over space before the L2 normalisation
}


def _block_kwargs(norm: str = "batch") -> dict:
    norms = {"batch": (nn.BatchNorm3d, {"eps": 1e-5, "affine": True, "momentum": 0.05}),
             "instance": (nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}),
             "none": (None, None)}
    norm_op, norm_kwargs = norms[norm]
    return dict(conv_op=nn.Conv3d, conv_bias=True, norm_op=norm_op, norm_op_kwargs=norm_kwargs,
                nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


class AnatomicalEmbeddingNet(nn.Module):
    """``forward(x) -> (coarse, fine)``, each (B, D, X/stride, Y/stride, Z/stride) with unit-norm vectors."""

    def __init__(self, arch: Dict | None = None):
        super().__init__()
        from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
        from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks

        self.arch = dict(DEFAULT_ARCH, **(arch or {}))
        feats: List[int] = [int(f) for f in self.arch["features"]]
        n = len(feats)
        self.fine_level = int(self.arch["fine_level"])
        self.coarse_level = int(self.arch["coarse_level"])
        if not 0 <= self.fine_level <= self.coarse_level <= n - 1:
            raise ValueError(f"need 0 <= fine_level <= coarse_level <= {n - 1}, got {self.arch}")
        self.encoder = PlainConvEncoder(1, n, feats, nn.Conv3d, 3, [1] + [2] * (n - 1),
                                        int(self.arch["n_conv_per_stage"]), return_skips=True,
                                        **{k: v for k, v in _block_kwargs(self.arch["norm"]).items()
                                           if k != "conv_op"})
        self.ups = nn.ModuleList()
        self.merges = nn.ModuleList()
        for level in range(n - 2, self.fine_level - 1, -1):   # decoder: bottleneck up to the fine level
            self.ups.append(nn.ConvTranspose3d(feats[level + 1], feats[level], 2, 2))
            self.merges.append(StackedConvBlocks(1, input_channels=2 * feats[level], output_channels=feats[level],
                                                 kernel_size=3, initial_stride=1,
                                                 **_block_kwargs(self.arch["norm"])))
        self.coarse_head = nn.Sequential(nn.Conv3d(feats[self.coarse_level], feats[self.coarse_level], 1),
                                         nn.LeakyReLU(inplace=True),
                                         nn.Conv3d(feats[self.coarse_level], int(self.arch["coarse_dim"]), 1))
        self.fine_head = nn.Sequential(nn.Conv3d(feats[self.fine_level], feats[self.fine_level], 1),
                                       nn.LeakyReLU(inplace=True),
                                       nn.Conv3d(feats[self.fine_level], int(self.arch["fine_dim"]), 1))

    @property
    def fine_stride(self) -> int:
        return 2 ** self.fine_level

    @property
    def coarse_stride(self) -> int:
        return 2 ** self.coarse_level

    @property
    def size_divisor(self) -> int:
        """Input sizes must be multiples of this (the bottleneck stride)."""
        return 2 ** (len(self.arch["features"]) - 1)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        skips = self.encoder(x)
        level = len(skips) - 1
        h = skips[-1]
        coarse = h if level == self.coarse_level else None
        for up, merge in zip(self.ups, self.merges):
            level -= 1
            h = merge(torch.cat([up(h), skips[level]], dim=1))
            if level == self.coarse_level:
                coarse = h
        return self._embed(self.coarse_head(coarse)), self._embed(self.fine_head(h))

    def _embed(self, z: torch.Tensor) -> torch.Tensor:
        """Per-location unit vectors. With ``head_norm`` every channel is first standardised over the map
        (zero mean, unit variance), so no constant component dominates: without it, the maps of a freshly
        initialised network are nearly parallel everywhere and short CPU trainings did not spread them."""
        if self.arch.get("head_norm", False):
            z = F.instance_norm(z, eps=1e-5)
        return F.normalize(z, dim=1)


@torch.no_grad()
def embed_volume(net: AnatomicalEmbeddingNet, volume: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Embed one whole normalised volume (X, Y, Z) in eval mode; returns ``(coarse, fine)`` (D, x, y, z).

    The volume is zero-padded at the far ends to a multiple of the bottleneck stride; the maps are cut back
    to ``ceil(size / stride)`` cells, so cell ``j`` always covers voxels ``[j*stride, (j+1)*stride)``.
    """
    was_training = net.training
    net.eval()
    div = net.size_divisor
    shape = volume.shape
    pad = [(-s) % div for s in shape]
    x = F.pad(volume[None, None], (0, pad[2], 0, pad[1], 0, pad[0]))
    coarse, fine = net(x)
    net.train(was_training)

    def cut(t, stride):
        cells = [(s + stride - 1) // stride for s in shape]
        return t[0, :, :cells[0], :cells[1], :cells[2]]

    return cut(coarse, net.coarse_stride), cut(fine, net.fine_stride)
