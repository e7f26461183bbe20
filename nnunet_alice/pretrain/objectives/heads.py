"""Projection heads: the DINO head of Alice, the linear token projections and the CLS pooling of a CNN U-Net.

docs/method.md "Network, tokens and heads": Alice's head is a DINO head (Caron et al., 2021, arXiv 2104.14294): a
3-layer MLP
``in -> 2048 -> 2048 -> 256`` with GELU and no norm, L2 normalisation, then a weight-normalised bias-free
linear layer onto K = 512 "prototypes" whose gain is fixed at 1 (``norm_last_layer``). The same head maps
the CLS vector (B, C) and tokens (B, N, C): every layer acts on the last dimension.

Mapping Alice to a CNN U-Net (docs/method.md): encoder tokens = bottleneck voxels; decoder tokens = voxels
of an early decoder stage. :class:`TokenProjection` turns a (B, C, *spatial) map into (B, N, dim) tokens with
a linear layer whose input width comes from the plan's ``features_per_stage`` (the role of the official
"mlp3" / "mlp4" pre-projections, whose widths were hard-coded for nnFormer).

The CLS vector (:class:`ClsPooling`). nnFormer's CLS is the mean of its last-stage tokens; the literal CNN
counterpart, the global average pool of the bottleneck *output*, carries almost nothing: that output is
conv -> InstanceNorm -> LeakyReLU, and InstanceNorm fixes every channel's spatial mean and variance, so the
pool is nearly the same vector for every image (mean pairwise cosine 0.997 over 8 MNI crops at
initialisation, docs/method.md). The default pools the output of the bottleneck's last main-path convolution
*before* its norm (read with a forward hook, :class:`PreNormTap`), through a per-token MLP (a DeepSets
encoder, Zaheer et al. 2017, arXiv 1703.06114: mean of phi(token), which can learn any symmetric statistic
of the token set) and standardises the pooled vector with running statistics of the branch's own inputs
(Ioffe & Szegedy 2015, arXiv 1502.03167, used in inference form: fixed statistics, no batch dependence in
the forward pass; initialised from the first batch as in data-dependent initialisation, Salimans & Kingma
2016, arXiv 1602.07868). Standardising removes the image-independent common part that the random network
gives every input, so the head sees what differs between images.
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm

from nnunet_alice.pretrain.config import CLS_POOLS
from nnunet_alice.pretrain.model import unwrap

__all__ = ["DinoHead", "TokenProjection", "global_pool_tokens", "flatten_tokens", "ClsPooling", "PreNormTap",
           "InputTap", "decoder_bottleneck_tap", "prenorm_conv", "CLS_POOLS"]



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
    """DINO projection head (DINO Sec. 3 / docs/method.md "Network, tokens and heads"): MLP, L2-normalise,
    weight-normed prototypes.

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

    def forward(self, x: torch.Tensor, with_embedding: bool = False):
        """(..., in_dim) -> (..., out_dim) logits (before any temperature); with ``with_embedding`` also the
        normalised bottleneck z they score, as ``(logits, z)``."""
        z = self.embed(x)
        logits = self.last_layer(z)
        return (logits, z) if with_embedding else logits

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., bottleneck_dim): the L2-normalised bottleneck z that the prototypes score."""
        x = self.mlp(x)
        return F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype in (torch.float16, torch.bfloat16) else 1e-12)

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


# ------------------------------------------------------------------------------------------------ CLS pooling
def prenorm_conv(network: nn.Module) -> nn.Module:
    """The last main-path convolution of the bottleneck (last encoder stage) of a dynamic-network-architectures U-Net.

    PlainConvUNet: the last ``ConvDropoutNormReLU.conv`` of the stage. ResidualEncoderUNet: ``conv2.conv``
    (``BasicBlockD``) or ``conv3.conv`` (``BottleneckD``) of the last block; the 1x1 projection on the skip path
    and squeeze-excitation convs are not on the main path and are skipped.
    """
    return _prenorm_site(network)[0]


def _prenorm_site(network: nn.Module):
    """(last main-path conv, the norm module that follows it in its ``ConvDropoutNormReLU`` or None)."""
    stage = unwrap(network).encoder.stages[-1]
    convs = [(n, m) for n, m in stage.named_modules() if isinstance(m, nn.modules.conv._ConvNd)
             and not {"skip", "squeeze_excitation"} & set(n.split("."))]
    if not convs:
        raise ValueError(f"no convolution found in the last encoder stage of {type(unwrap(network)).__name__}")
    name, conv = convs[-1]
    parent = stage.get_submodule(name.rsplit(".", 1)[0]) if "." in name else stage
    norm = getattr(parent, "norm", None)
    return conv, norm if isinstance(norm, nn.Module) and getattr(parent, "conv", None) is conv else None


class PreNormTap:
    """Keeps the bottleneck's last main-path conv output *before its norm* from the latest forward pass.

    Read as the input of that norm (a forward hook on the norm), so whatever other hooks did to the conv output
    (e.g. re-masking for sparse pretraining) is included; without a norm, the conv output itself. A plain object,
    not an ``nn.Module`` (like ``model.UNetFeatures``): the hook lives on the network, so a deep copy of the owner
    (the EMA teacher) copies a working tap along; nnU-Net's forward is never re-implemented.
    """

    def __init__(self, network: nn.Module):
        self.conv, norm = _prenorm_site(network)
        self.value: Optional[torch.Tensor] = None
        if norm is not None:
            self._hook = norm.register_forward_hook(self._keep_input)
        else:
            self._hook = self.conv.register_forward_hook(self._keep_output)

    def _keep_input(self, module, inputs, output):
        self.value = inputs[0]

    def _keep_output(self, module, inputs, output):
        self.value = output

    @property
    def channels(self) -> int:
        return int(self.conv.out_channels)

    def pop(self) -> torch.Tensor:
        if self.value is None:
            raise RuntimeError("PreNormTap: the network has not run since the last read")
        value, self.value = self.value, None
        return value


class InputTap:
    """Keeps the first input of ``module`` from its latest call (a forward pre-hook; a plain object, see
    :class:`PreNormTap`). Pre-hooks registered earlier (e.g. ones that fill masked positions) have already run."""

    def __init__(self, module: nn.Module):
        self.value: Optional[torch.Tensor] = None
        self._hook = module.register_forward_pre_hook(self._keep)

    def _keep(self, module, args):
        self.value = args[0]

    def pop(self) -> torch.Tensor:
        if self.value is None:
            raise RuntimeError("InputTap: the module has not run since the last read")
        value, self.value = self.value, None
        return value


def decoder_bottleneck_tap(network: nn.Module) -> Optional[InputTap]:
    """Tap of the bottleneck *as the decoder receives it*: the input of the decoder's first upsampling
    (``decoder.transpconvs[0]`` of dynamic-network-architectures' ``UNetDecoder``); None for other decoders."""
    ups = getattr(unwrap(network).decoder, "transpconvs", None)
    return InputTap(ups[0]) if ups is not None and len(ups) else None


class ClsPooling(nn.Module):
    """(B, C, *spatial) feature map -> (B, out_dim) CLS vector.

    Modes (:data:`CLS_POOLS`):

    * ``prenorm_mlp``: tokens of the pre-norm map -> phi = GELU(Linear(C, hidden)) per token -> mean
      -> running standardisation; ``out_dim = hidden`` (2 C by default);
    * ``prenorm_mean``: global average pool of the pre-norm map -> running standardisation; no parameters;
    * ``mlp`` (default): the same per-token MLP and standardisation on the bottleneck *output* (after its norm and
      nonlinearity). The norm fixes each channel's mean, but not the mean of a nonlinear function of all channels,
      and the output does not depend on the scale or bias of the conv before the norm, which nothing but the CLS
      term constrains (weight decay shrinks that scale, and the pre-norm pool becomes the bias; docs/method.md);
    * ``mean``: global average pool of the map as given (the bottleneck output: the earlier mapping), no
      standardisation.

    Running standardisation: ``(v - mu) / sqrt(var + eps)`` with buffers ``running_mean``/``running_var``; they
    are set from the first batch the module sees, and afterwards updated (``mu <- m mu + (1 - m) mean``, same for
    the variance) only when ``forward(..., update_stats=True)``, *after* the current batch has been standardised
    with the previous values, so a forward pass never depends on its own batch after the first one. Batch moments
    are taken over all ranks. The EMA teacher keeps its own statistics (``keeps_own_buffers``): the teacher sees
    unmasked views, the student masked ones, and each is standardised by the statistics of what it sees.
    """

    keeps_own_buffers = True   # read by ema.EmaTeacher: these buffers are not copied from the student

    def __init__(self, in_channels: int, mode: str = "prenorm_mlp", hidden_dim: Optional[int] = None,
                 momentum: float = 0.9, eps: float = 1e-5):
        super().__init__()
        if mode not in CLS_POOLS:
            raise ValueError(f"unknown CLS pooling {mode!r}; expected one of {CLS_POOLS}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.mode, self.in_channels = mode, int(in_channels)
        self.momentum, self.eps = float(momentum), float(eps)
        self.phi = None
        self.out_dim = self.in_channels
        if mode.endswith("mlp"):
            self.out_dim = int(hidden_dim or 2 * self.in_channels)
            self.phi = nn.Sequential(nn.Linear(self.in_channels, self.out_dim), nn.GELU())
        self.standardise = mode != "mean"
        self.register_buffer("running_mean", torch.zeros(self.out_dim))
        self.register_buffer("running_var", torch.ones(self.out_dim))
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long))

    @property
    def uses_prenorm(self) -> bool:
        return self.mode.startswith("prenorm")

    def pool(self, x: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The pooled vector before standardisation, float32; ``weights`` (B, N): a weighted token mean."""
        if x.dim() < 3 or x.shape[1] != self.in_channels:
            raise ValueError(f"ClsPooling expects (B, {self.in_channels}, *spatial), got {tuple(x.shape)}")
        tokens = flatten_tokens(x).float()
        if self.phi is not None:
            tokens = self.phi(tokens)
        if weights is None:
            return tokens.mean(dim=1)
        if tuple(weights.shape) != tuple(tokens.shape[:2]):
            raise ValueError(f"weights must be (B, N) = {tuple(tokens.shape[:2])}, got {tuple(weights.shape)}")
        w = weights.to(tokens.dtype).unsqueeze(-1)
        return (tokens * w).sum(dim=1) / w.sum(dim=1).clamp_min(1e-6)

    def forward(self, x: torch.Tensor, update_stats: bool = False,
                weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``weights`` (B, N), e.g. 1 at visible tokens of a sparse (masked) encoder: pool those tokens only."""
        v = self.pool(x, weights)
        if not self.standardise:
            return v
        first = int(self.num_batches) == 0
        if first:
            self._observe(v.detach(), first=True)
        out = (v - self.running_mean) / torch.sqrt(self.running_var + self.eps)
        if update_stats and not first:
            self._observe(v.detach(), first=False)
        return out

    @torch.no_grad()
    def relative_spread(self) -> torch.Tensor:
        """How much the pooled vector varies between inputs, from the running statistics: the mean over features
        of sd / sqrt(mean^2 + sd^2), in [0, 1]; near 0 the standardisation is amplifying a vector that is almost
        the same for every input (docs/method.md "Teacher targets at small batch")."""
        rms = (self.running_mean.pow(2) + self.running_var).clamp_min(1e-12).sqrt()
        return (self.running_var.clamp_min(0).sqrt() / rms).mean()

    @torch.no_grad()
    def _observe(self, v: torch.Tensor, first: bool) -> None:
        from nnunet_alice.pretrain.objectives.losses import global_mean

        mean = global_mean(v)
        var = global_mean((v - mean) ** 2)       # two passes: no cancellation when the mean dominates
        if first:
            self.running_mean.copy_(mean)
            self.running_var.copy_(var)
        else:
            m = self.momentum
            self.running_mean.mul_(m).add_(mean, alpha=1.0 - m)
            self.running_var.mul_(m).add_(var, alpha=1.0 - m)
        self.num_batches.add_(1)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, in={self.in_channels}, out={self.out_dim}, momentum={self.momentum}"


def cls_features(pool: ClsPooling, features: Dict[str, torch.Tensor], tap: Optional[PreNormTap]) -> torch.Tensor:
    """The map ``pool`` reads: the pre-norm tap for the pre-norm modes, else the bottleneck output."""
    return tap.pop() if pool.uses_prenorm else features["bottleneck"]
