"""Projection heads: the DINO head of Alice and the linear token projections of a CNN U-Net.

alice-method Sec. 2.3: Alice's head is a DINO head (Caron et al., 2021): a 3-layer MLP
``in -> 2048 -> 2048 -> 256`` with GELU and no norm, L2 normalisation, then a weight-normalised bias-free
linear layer onto K = 512 "prototypes" whose gain is fixed at 1 (``norm_last_layer``). The same head maps
the CLS vector (B, C) and tokens (B, N, C): every layer acts on the last dimension.

Mapping Alice to a CNN U-Net (issue 3): CLS = global average pool of the bottleneck
(:func:`global_pool_tokens`); encoder tokens = bottleneck voxels; decoder tokens = voxels of an early
decoder stage. :class:`TokenProjection` turns a (B, C, *spatial) map into (B, N, dim) tokens with a linear
layer whose input width comes from the plan's ``features_per_stage`` (the role of the official "mlp3" /
"mlp4" pre-projections, whose widths were hard-coded for nnFormer).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["DinoHead", "TokenProjection", "global_pool_tokens", "flatten_tokens"]


def _trunc_normal_init(module: nn.Module) -> None:
    """DINO init: linear weights ~ truncated normal (std 0.02, cut at +-2 std), biases 0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def flatten_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) -> (B, N, C) with N = prod(spatial), voxels in C order."""
    if x.dim() < 3:
        raise ValueError(f"expected a (B, C, *spatial) feature map, got shape {tuple(x.shape)}")
    return x.flatten(2).transpose(1, 2)


def global_pool_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) -> (B, C): global average pool, the "CLS" token of a CNN U-Net bottleneck."""
    if x.dim() < 3:
        raise ValueError(f"expected a (B, C, *spatial) feature map, got shape {tuple(x.shape)}")
    return x.flatten(2).mean(dim=-1)


class TokenProjection(nn.Module):
    """Linear projection ``in_channels -> dim`` of feature-map voxels (or of an already pooled vector).

    * (B, C, *spatial) -> (B, N, dim) tokens, N = prod(spatial);
    * (B, C) -> (B, dim), so a pooled CLS vector can share the projection.
    """

    def __init__(self, in_channels: int, dim: int, bias: bool = True):
        super().__init__()
        self.in_channels, self.dim = int(in_channels), int(dim)
        self.proj = nn.Linear(self.in_channels, self.dim, bias=bias)
        _trunc_normal_init(self.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"TokenProjection expects {self.in_channels} channels at dim 1, "
                             f"got shape {tuple(x.shape)}")
        return self.proj(x if x.dim() == 2 else flatten_tokens(x))


class DinoHead(nn.Module):
    """DINO projection head (DINO Sec. 3 / alice-method Sec. 2.3): MLP, L2-normalise, weight-normed prototypes.

    Args:
        in_dim: input width (the last dimension of the input).
        hidden_dim, bottleneck_dim, out_dim: 2048, 256, 512 (K prototypes) in Alice.
        nlayers: number of linear layers in the MLP (>= 1); GELU between them, none after the last.
        norm_last_layer: fix the weight-norm gain g at 1, so every prototype row has unit norm and the
            logits are cosine similarities (DINO's recommended, more stable setting).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, out_dim: int = 512,
                 nlayers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers = []
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(_trunc_normal_init)

        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        _trunc_normal_init(last)
        self.last_layer = weight_norm(last, dim=0)  # weight = g * v / ||v||, one g per prototype row
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)
        self.norm_last_layer = bool(norm_last_layer)
        self.out_dim = int(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., out_dim) logits (before any temperature)."""
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype in (torch.float16, torch.bfloat16) else 1e-12)
        return self.last_layer(x)

    def last_layer_parameters(self) -> Iterator[nn.Parameter]:
        """The prototype layer's parameters (weight-norm direction v, and gain g)."""
        return self.last_layer.parameters()

    def cancel_last_layer_gradients(self) -> None:
        """Drop the last layer's gradients (set to None); call after ``backward`` during the first epoch.

        DINO's ``cancel_gradients_last_layer``: freezing by dropping gradients rather than toggling
        ``requires_grad`` keeps the parameter set fixed (DDP-safe), and AdamW skips a parameter whose grad
        is None, so neither the update nor the weight decay touches the prototypes while frozen.
        """
        for p in self.last_layer.parameters():
            p.grad = None
