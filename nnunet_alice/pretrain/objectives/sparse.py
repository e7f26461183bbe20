"""Masked image modelling made for a dense CNN U-Net (SparK: Tian et al., ICLR 2023, arXiv 2301.03580; for 3D
nnU-Net plans: Wald et al., CVPR 2025, arXiv 2410.23132, https://github.com/MIC-DKFZ/nnssl).

A dense CNN that sees zero-filled masked blocks learns statistics that fine-tuning never shows it (the
convolutions smear the zeros into the visible voxels, instance norm counts them, and the masked value equals the
background). :class:`SparseMaskedModel` makes the planned network behave like a sparse encoder **during pretraining
only**, with forward hooks, so nnU-Net's forward is never re-implemented and the network's ``state_dict`` (the
checkpoint's ``network_weights``) keeps exactly nnU-Net's keys:

* ``--masking spark`` (default):
  - every encoder convolution, norm, pooling and stage output is multiplied by the visibility mask downsampled to
    its resolution, so masked positions stay exactly 0 at every depth ("sparse convolution by masking", SparK
    Sec. 3.1);
  - instance norms in the encoder take their mean and variance over the visible voxels only
    (:func:`masked_instance_norm`); other norm types are only re-masked;
  - before the decoder reads the encoder outputs (skips and bottleneck), masked positions are filled with a
    learnable mask token per scale and then completed by a 3×3×3 "densify" convolution (SparK Sec. 3.2). The
    densify output is used at masked positions only and the convolution starts at zero, so visible positions reach
    the decoder exactly as the encoder computed them — as in fine-tuning;
* ``--masking zero``: the masked input blocks are 0 and the network runs densely (the official Alice code).

In both modes the reconstruction comes from a **separate** 1×1×1 head on the last decoder stage's features (held
here, never saved into ``network_weights``); the network's own segmentation layers are unused in pretraining.
The loss is the MSE on masked voxels (:func:`mim_loss`), optionally against a target normalised per mask block
(MAE's ``norm_pix_loss``, He et al., CVPR 2022, arXiv 2111.06377).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from nnunet_alice.pretrain.config import MASKINGS
from nnunet_alice.pretrain.objectives.losses import reconstruction_loss
from nnunet_alice.pretrain.model import unwrap
_NORMS = (nn.modules.instancenorm._InstanceNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
_POOLS = (nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd)


def downsample_visible(visible: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Visibility (B, 1, *S) at spatial ``shape``: a coarse voxel is visible when any voxel it covers is.

    Adaptive max pooling: with the plan's strides it is max pooling over each cell of the total stride, and any
    shape (odd sizes, anisotropic strides) is covered.
    """
    shape = tuple(int(s) for s in shape)
    if tuple(visible.shape[2:]) == shape:
        return visible
    pool = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}[len(shape)]
    return pool(visible, shape)


def masked_instance_norm(x: torch.Tensor, visible: torch.Tensor, weight: Optional[torch.Tensor],
                         bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """Instance norm with per-sample, per-channel mean and (biased) variance over the visible voxels only.

    ``visible`` is (B, 1, *S) with 1 = visible. The output is 0 at masked positions, and also for a sample with no
    visible voxel at this resolution. Computed in float32 (as autocast runs instance norm), returned in x's dtype.
    """
    v = visible.to(torch.float32)
    xf = x.to(torch.float32)
    dims = tuple(range(2, x.dim()))
    n = v.sum(dim=dims, keepdim=True)
    mean = (xf * v).sum(dim=dims, keepdim=True) / n.clamp_min(1.0)
    var = (((xf - mean) ** 2) * v).sum(dim=dims, keepdim=True) / n.clamp_min(1.0)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = y * weight.to(torch.float32).reshape(shape)
        if bias is not None:
            y = y + bias.to(torch.float32).reshape(shape)
    return (y * v).to(x.dtype)


def block_normalise(target: torch.Tensor, block_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Standardise ``target`` (B, C, *S) within each ``block_size`` block of the mask grid (per sample and channel).

    Blocks are clipped per axis to the patch and cut at the border, exactly as in ``masking.block_grid``.
    """
    spatial = target.shape[2:]
    k = [max(1, min(int(block_size), int(s))) for s in spatial]
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(spatial)]
    t = target.float()
    ones = torch.ones_like(t[:, :1])
    # sum / count through the same pooling: exact also for border blocks cut by the patch
    count = pool(ones, k, k, ceil_mode=True)
    mean = pool(t, k, k, ceil_mode=True) / count
    sq = pool(t * t, k, k, ceil_mode=True) / count
    var = (sq - mean * mean).clamp_min(0.0)

    def up(z):
        for axis, kk in enumerate(k):
            z = z.repeat_interleave(kk, dim=2 + axis)
        return z[(slice(None), slice(None)) + tuple(slice(0, int(s)) for s in spatial)]

    return (t - up(mean)) / torch.sqrt(up(var) + eps)


def mim_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, region: str = "masked",
             norm_target: bool = False, block_size: int = 16) -> torch.Tensor:
    """MSE between the reconstruction and the (optionally block-normalised) target, on masked voxels by default."""
    if norm_target:
        target = block_normalise(target, block_size)
    return reconstruction_loss(pred.float(), target.float(), mask, region)


def _plain(method):
    """Wrap a bound method in a plain function: ``copy.deepcopy`` shares functions, so a deep copy of the network
    (the EMA teacher) calls the same, inactive hook instead of copying this module along with it."""
    def hook(*args):
        return method(*args)
    return hook


class SparseMaskedModel(nn.Module):
    """Pretraining-only companion of the planned network: sparse-encoder hooks, mask tokens, densify convs and
    the reconstruction head.

    ``with model.masked(mask): network(x)`` runs the network with the hooks active (``mask`` (B, 1, *S), 1 =
    masked); afterwards ``model.reconstruction()`` is the head applied to the last decoder stage of that run.
    Outside the context every hook passes its input through, so a deep copy of the network (an EMA teacher) or
    the plain network seen by fine-tuning behaves exactly as nnU-Net's. The network is not a submodule: only the
    additions appear in this module's ``state_dict``.
    """

    def __init__(self, network: nn.Module, in_channels: int, masking: str = "spark", with_head: bool = True):
        super().__init__()
        if masking not in MASKINGS:
            raise ValueError(f"masking must be one of {MASKINGS}, got {masking!r}")
        net = unwrap(network)
        encoder, decoder = net.encoder, net.decoder
        self.masking = masking
        convs = [m for m in encoder.modules() if isinstance(m, nn.modules.conv._ConvNd)]
        if not convs:
            raise ValueError("the network's encoder holds no convolution")
        conv_type = type(convs[0])
        channels = [int(c) for c in encoder.output_channels]
        last_channels = int(decoder.seg_layers[-1].in_channels)
        self.head = conv_type(last_channels, int(in_channels), kernel_size=1) if with_head else None
        self.mask_tokens = nn.ParameterList()
        self.densify = nn.ModuleList()
        if masking == "spark":
            for c in channels:
                self.mask_tokens.append(nn.Parameter(torch.randn((1, c) + (1,) * (convs[0].weight.dim() - 2))
                                                     * 0.02))
                conv = conv_type(c, c, kernel_size=3, padding=1)
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)
                self.densify.append(conv)
        self._active = False
        self._visible: Optional[torch.Tensor] = None
        self._cache: Dict[tuple, torch.Tensor] = {}
        self._features: Optional[torch.Tensor] = None
        self._handles: List = [decoder.stages[-1].register_forward_hook(_plain(self._hook_keep_features))]
        if masking == "spark":
            self._handles.append(decoder.register_forward_pre_hook(_plain(self._hook_densify)))
            stage_outputs = list(encoder.stages) + ([encoder.stem] if getattr(encoder, "stem", None) is not None
                                                    else [])
            for m in encoder.modules():
                if isinstance(m, _NORMS):
                    self._handles.append(m.register_forward_hook(_plain(self._hook_norm)))
                elif isinstance(m, (nn.modules.conv._ConvNd,) + _POOLS) or any(m is s for s in stage_outputs):
                    self._handles.append(m.register_forward_hook(_plain(self._hook_mask)))

    # ------------------------------------------------------------------ context
    @contextmanager
    def masked(self, mask: torch.Tensor):
        """Hooks active for the network calls inside; ``mask`` (B, 1, *S), 1 = masked."""
        self._active, self._features, self._cache = True, None, {}
        self._visible = (1.0 - mask.float()) if self.masking == "spark" else None
        try:
            yield self
        finally:
            self._active, self._visible, self._cache = False, None, {}

    def visible_at(self, shape: Sequence[int]) -> torch.Tensor:
        key = tuple(int(s) for s in shape)
        v = self._cache.get(key)
        if v is None:
            v = self._cache[key] = downsample_visible(self._visible, key)
        return v

    def reconstruction(self) -> torch.Tensor:
        """The head on the last decoder stage of the latest masked run."""
        if self.head is None:
            raise RuntimeError("this model was built without a reconstruction head")
        if self._features is None:
            raise RuntimeError("no network run inside masked() since the last reconstruction")
        feats, self._features = self._features, None
        return self.head(feats)

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ hooks
    def _sparse(self) -> bool:
        return self._active and self._visible is not None

    def _hook_keep_features(self, module, inputs, output):
        if self._active:
            self._features = output

    def _hook_mask(self, module, inputs, output):
        if not self._sparse() or not torch.is_tensor(output):
            return None
        return output * self.visible_at(output.shape[2:]).to(output.dtype)

    def _hook_norm(self, module, inputs, output):
        if not self._sparse():
            return None
        v = self.visible_at(output.shape[2:])
        if isinstance(module, nn.modules.instancenorm._InstanceNorm) and not module.track_running_stats:
            return masked_instance_norm(inputs[0], v, module.weight, module.bias, module.eps)
        return output * v.to(output.dtype)

    def _hook_densify(self, module, args):
        if not self._sparse():
            return None
        skips = list(args[0])
        filled = []
        for i, x in enumerate(skips):
            v = self.visible_at(x.shape[2:]).to(x.dtype)
            token = self.mask_tokens[i].to(x.dtype)
            base = x * v + token * (1.0 - v)
            filled.append(x * v + (base + self.densify[i](base)) * (1.0 - v))
        return (filled,) + tuple(args[1:])
