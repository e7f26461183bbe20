"""The frozen network of a linear probe and its per-voxel features, computed in sliding windows.

* :func:`build_probe_network`: the network nnU-Net plans for the dataset (nnU-Net's ``get_network_from_plans``,
  as ``nnUNetTrainer.build_network_architecture`` calls it, one output per segmentation head), with nnU-Net's
  random initialisation under a fixed seed, optionally overwritten by a checkpoint's ``network_weights``
  (checked and loaded exactly as fine-tuning does, segmentation layers excluded).
* :class:`WindowFeatures`: features of the frozen network in windows of the plan's patch size, stitched with
  nnU-Net's Gaussian weighting (https://github.com/MIC-DKFZ/nnUNet,
  ``nnunetv2/inference/sliding_window_prediction.py``).
  Two variants:

  - ``decoder``: the output of the last decoder stage (full resolution), read with a forward hook;
  - ``encoder``: every encoder stage, trilinearly upsampled to full resolution and concatenated ("hypercolumns",
    Hariharan et al., arXiv 1411.5752).

  A linear head on upsampled features equals the upsampled head outputs (upsampling is linear), so the
  full-resolution concatenation is never materialised: training voxels are sampled with ``grid_sample`` (the
  same interpolation as ``F.interpolate(mode="trilinear", align_corners=False)``) and prediction upsamples the
  per-stage logits.
"""
from __future__ import annotations

import itertools
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_alice.pretrain.model import unwrap

VARIANTS = ("decoder", "encoder")
RANDOM = "random"


def build_probe_network(plans_manager, configuration_manager, dataset_json: dict, checkpoint: str, seed: int,
                        log: Callable[[str], None] = print, loaded: Optional[dict] = None) -> torch.nn.Module:
    """nnU-Net's planned network, randomly initialised under ``seed``, then loaded from ``checkpoint`` unless it is
    ``"random"``. ``loaded``: the checkpoint dict if already read. Any mismatch raises a one-line ``AliceError``."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunet_alice.doctor import num_channels
    from nnunet_alice.trainers.pretrained import load_pretrained_into

    n_in = num_channels(dataset_json)
    n_out = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    cm = configuration_manager
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        # what nnUNetTrainer.build_network_architecture does, without importing the trainer (and its plotting stack)
        network = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                         cm.network_arch_init_kwargs_req_import, n_in, n_out, allow_init=True,
                                         deep_supervision=False)
    if checkpoint != RANDOM:
        load_pretrained_into(network, checkpoint, cm.network_arch_class_name, cm.network_arch_init_kwargs, n_in,
                             log=log, adapt_input_channels=True, checkpoint=loaded)
    network.eval()
    for p in network.parameters():
        p.requires_grad_(False)
    return network


def tile_starts(shape: Sequence[int], patch: Sequence[int], step: float) -> List[Tuple[int, ...]]:
    """Window origins covering ``shape`` (already padded to at least ``patch``), nnU-Net's step rule."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    steps = compute_steps_for_sliding_window(tuple(int(s) for s in shape), tuple(int(p) for p in patch), step)
    return [tuple(int(v) for v in t) for t in itertools.product(*steps)]


def sample_at(stage: torch.Tensor, local: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """Values of ``stage`` (C, d, h, w), upsampled trilinearly to ``window``, at integer voxels ``local`` (n, 3).

    Returns (n, C). Equal to ``F.interpolate(stage[None], size=window, mode="trilinear")[0][:, z, y, x]``:
    with ``align_corners=False`` both map output voxel i to source coordinate (i + 0.5)·in/out − 0.5, and border
    padding reproduces interpolate's clamping.
    """
    if tuple(stage.shape[1:]) == tuple(window):
        return stage[:, local[:, 0], local[:, 1], local[:, 2]].T
    size = torch.tensor(window, dtype=torch.float32, device=local.device)
    norm = (2.0 * local.float() + 1.0) / size - 1.0           # (n, 3) in (z, y, x) order
    grid = norm.flip(-1).view(1, 1, 1, -1, 3)                  # grid_sample wants (x, y, z)
    out = F.grid_sample(stage[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.view(stage.shape[0], -1).T


class WindowFeatures:
    """Frozen per-voxel features of one preprocessed image (C, X, Y, Z), in windows of ``patch_size``."""

    def __init__(self, network: torch.nn.Module, variant: str, patch_size: Sequence[int], step: float = 0.5,
                 device: str | torch.device = "cpu"):
        if variant not in VARIANTS:
            raise ValueError(f"feature variant must be one of {VARIANTS}, got {variant!r}")
        self.network = unwrap(network)
        self.variant = variant
        self.patch = tuple(int(p) for p in patch_size)
        self.step = float(step)
        self.device = torch.device(device)
        self.network.to(self.device)
        chans = [int(c) for c in self.network.encoder.output_channels]
        self.stage_channels = chans[:1] if variant == "decoder" else chans
        self.gaussian = self._gaussian()

    @property
    def num_features(self) -> int:
        return int(sum(self.stage_channels))

    def _gaussian(self) -> torch.Tensor:
        from nnunetv2.inference.sliding_window_prediction import compute_gaussian

        return compute_gaussian(self.patch, sigma_scale=1.0 / 8, value_scaling_factor=10, dtype=torch.float32,
                                device=torch.device("cpu")).clone()

    # ------------------------------------------------------------------ one window
    @torch.inference_mode()
    def window(self, tile: torch.Tensor) -> List[torch.Tensor]:
        """Feature maps of one (C, *patch) tile: [last decoder stage] or [every encoder stage], batch dim removed."""
        x = tile[None].float().to(self.device)
        if self.variant == "encoder":
            skips = self.network.encoder(x)
            return [s[0] for s in skips]
        store: Dict[str, torch.Tensor] = {}
        hook = self.network.decoder.stages[-1].register_forward_hook(lambda m, i, o: store.__setitem__("f", o))
        try:
            self.network(x)
        finally:
            hook.remove()
        return [store["f"][0]]

    def _padded(self, image: np.ndarray) -> torch.Tensor:
        shape = image.shape[1:]
        full = [max(int(s), p) for s, p in zip(shape, self.patch)]
        out = torch.zeros((image.shape[0], *full), dtype=torch.float32)
        out[(slice(None), *(slice(0, int(s)) for s in shape))] = torch.from_numpy(np.asarray(image, dtype=np.float32))
        return out

    def _tiles(self, padded: torch.Tensor):
        for start in tile_starts(padded.shape[1:], self.patch, self.step):
            box = tuple(slice(s, s + p) for s, p in zip(start, self.patch))
            yield start, padded[(slice(None), *box)]

    # ------------------------------------------------------------------ training voxels
    def gather(self, image: np.ndarray, coords: np.ndarray) -> torch.Tensor:
        """Features (n, num_features) at voxels ``coords`` (n, 3) of ``image``: Gaussian-weighted over the windows
        that contain each voxel, exactly what :meth:`predict` applies the head to."""
        coords_t = torch.from_numpy(np.asarray(coords, dtype=np.int64))
        acc = torch.zeros((len(coords_t), self.num_features), dtype=torch.float32)
        wsum = torch.zeros(len(coords_t), dtype=torch.float32)
        padded = self._padded(image)
        for start, tile in self._tiles(padded):
            lo = torch.tensor(start)
            inside = ((coords_t >= lo) & (coords_t < lo + torch.tensor(self.patch))).all(1)
            if not bool(inside.any()):
                continue
            local = coords_t[inside] - lo
            feats = self.window(tile)
            f = torch.cat([sample_at(s, local.to(s.device), self.patch) for s in feats], dim=1).cpu()
            w = self.gaussian[local[:, 0], local[:, 1], local[:, 2]]
            acc[inside] += w[:, None] * f
            wsum[inside] += w
        return acc / wsum[:, None]

    # ------------------------------------------------------------------ prediction
    def predict(self, image: np.ndarray, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Logits (n_classes, X, Y, Z) of the linear head ``weight`` (n_classes, num_features), ``bias``."""
        shape = tuple(int(s) for s in image.shape[1:])
        padded = self._padded(image)
        n_cls = int(weight.shape[0])
        logits = torch.zeros((n_cls, *padded.shape[1:]), dtype=torch.float32)
        wsum = torch.zeros(padded.shape[1:], dtype=torch.float32)
        parts = torch.split(weight.float(), self.stage_channels, dim=1)
        for start, tile in self._tiles(padded):
            out = bias.float().to(self.device).view(-1, 1, 1, 1).expand(n_cls, *self.patch).clone()
            for w, f in zip(parts, self.window(tile)):
                z = torch.einsum("kc,cxyz->kxyz", w.to(self.device), f.float())
                if tuple(z.shape[1:]) != self.patch:
                    z = F.interpolate(z[None], size=self.patch, mode="trilinear", align_corners=False)[0]
                out += z
            box = tuple(slice(s, s + p) for s, p in zip(start, self.patch))
            logits[(slice(None), *box)] += out.cpu() * self.gaussian
            wsum[box] += self.gaussian
        logits /= wsum
        return logits[(slice(None), *(slice(0, s) for s in shape))]
