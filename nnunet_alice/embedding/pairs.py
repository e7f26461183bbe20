"""Training pairs for the embedding: two overlapping, differently augmented crops with known correspondence.

SAM (Yan et al., IEEE TMI 2022, Sec. III-A) learns from two random crops of the *same* volume that overlap;
because both crops come from known transforms of one volume, every voxel of the overlap has a known
partner in the other crop. Here each view samples the volume through its own random centre, rotation and
scale (view 1 also through a smooth elastic field, so the pair differs by a non-rigid deformation, like two
patients), followed by intensity augmentation. Positions are in voxels of the embedding grid of the volume.

By default a crop is the *whole* volume (up to ``max_crop``): the embeddings are later computed on whole
volumes, and crops much smaller than the volume gave features that depend on where the crop ends, which
matched poorly across volumes in our benchmark (``docs/correspondence.md``). Volumes larger than
``max_crop`` are cropped around a random foreground voxel.

    view v, crop voxel u  ->  volume position  x = c_v + L_v (u - centre) [+ d_1(u) for view 1]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import map_coordinates


@dataclass
class PairConfig:
    crop: Optional[Tuple[int, int, int]] = None   # None: the whole volume, at most max_crop
    max_crop: Tuple[int, int, int] = (128, 128, 128)
    max_shift: float = 0.15         # centre offset between the views, fraction of the crop size
    max_rotation_deg: float = 12.0
    scale_range: Tuple[float, float] = (0.88, 1.12)
    elastic_voxels: float = 2.5     # amplitude (grid voxels) of view 1's smooth displacement
    elastic_nodes: int = 4          # control points per axis of that displacement
    points: int = 512               # corresponding points per pair
    fov_prob: float = 0.5           # chance that a view gets a field of view of its own (a box, rest zeroed)
    fov_range: Tuple[float, float] = (0.6, 1.0)   # that box's edge, fraction of the crop per axis


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    r = np.eye(3)
    for axis in range(3):
        t = np.deg2rad(rng.uniform(-max_deg, max_deg))
        c, s = np.cos(t), np.sin(t)
        i, j = [k for k in range(3) if k != axis]
        m = np.eye(3)
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        r = r @ m
    return r


@dataclass
class View:
    centre: np.ndarray        # (3,) volume position of the crop centre
    linear: np.ndarray        # (3, 3) crop offset -> volume offset
    displacement: np.ndarray  # (3, *crop) volume-voxel displacement at every crop voxel (zeros: none)
    crop: Tuple[int, int, int]

    def positions(self, u: np.ndarray) -> np.ndarray:
        """Volume positions of crop coordinates ``u`` (N, 3)."""
        mid = (np.asarray(self.crop, dtype=float) - 1) / 2
        x = self.centre + (u - mid) @ self.linear.T
        if np.any(self.displacement):
            d = np.stack([map_coordinates(self.displacement[k], u.T, order=1, mode="nearest") for k in range(3)], 1)
            x = x + d
        return x

    def inverse_affine(self, x: np.ndarray) -> np.ndarray:
        """Crop coordinates of volume positions ``x`` (valid for views without displacement)."""
        mid = (np.asarray(self.crop, dtype=float) - 1) / 2
        return (x - self.centre) @ np.linalg.inv(self.linear).T + mid

    def sampling_grid(self, volume_shape: Sequence[int]) -> torch.Tensor:
        """``grid_sample`` grid (1, *crop, 3), align_corners=True, last dim in (z, y, x) = (W, H, D) order."""
        axes = [np.arange(n, dtype=float) for n in self.crop]
        u = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        mid = (np.asarray(self.crop, dtype=float) - 1) / 2
        x = self.centre + (u - mid) @ self.linear.T
        x = x + self.displacement.reshape(3, -1).T
        n = 2.0 * x / np.maximum(np.asarray(volume_shape, dtype=float) - 1, 1) - 1.0
        return torch.from_numpy(n[:, ::-1].copy().reshape(1, *self.crop, 3)).float()


def random_view(rng: np.random.Generator, centre: np.ndarray, cfg: PairConfig, elastic: bool) -> View:
    linear = _rotation(rng, cfg.max_rotation_deg) * rng.uniform(*cfg.scale_range)
    disp = np.zeros((3, *cfg.crop), dtype=np.float32)
    if elastic and cfg.elastic_voxels > 0:
        nodes = torch.from_numpy(rng.normal(0.0, 1.0, (1, 3) + (cfg.elastic_nodes,) * 3).astype(np.float32))
        disp = F.interpolate(nodes, size=tuple(cfg.crop), mode="trilinear", align_corners=True)[0].numpy()
        disp *= cfg.elastic_voxels / max(float(np.abs(disp).max()), 1e-6)
    return View(np.asarray(centre, dtype=float), linear, disp, tuple(cfg.crop))


def augment_intensity(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Gamma, contrast/brightness and noise on a [0, 1]-normalised crop (independently per view)."""
    x = x.clamp(0, 1) ** float(np.exp(rng.uniform(np.log(0.7), np.log(1.4))))
    x = x * float(rng.uniform(0.85, 1.15)) + float(rng.uniform(-0.08, 0.08))
    sigma = float(rng.uniform(0.0, 0.04))
    if sigma > 0:
        gen = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
        x = x + sigma * torch.randn(x.shape, generator=gen).to(x.device)
    return x


def random_fov(rng: np.random.Generator, cfg: PairConfig) -> Tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)`` crop coordinates of a view's field of view: the whole crop, or a random sub-box."""
    crop = np.asarray(cfg.crop, dtype=float)
    if rng.uniform() >= cfg.fov_prob:
        return np.zeros(3), crop - 1
    size = np.maximum(np.round(crop * rng.uniform(*cfg.fov_range, size=3)), 2)
    lo = np.floor(rng.uniform(0, 1, 3) * (crop - size + 1))
    return lo, lo + size - 1


def _inside(u: np.ndarray, box: Tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return np.all((u >= box[0]) & (u <= box[1]), axis=1)


def make_pair(volume: torch.Tensor, volume_np: np.ndarray, foreground: np.ndarray, rng: np.random.Generator,
              cfg: PairConfig):
    """Two augmented crops of ``volume`` (X, Y, Z tensor; ``volume_np`` the same as numpy) and ``cfg.points``
    corresponding crop coordinates.

    Returns ``(crop1, crop2, view1, view2, u1, u2)``: crops (1, *crop) tensors, ``u1``/``u2`` (N, 3) float
    arrays of matching crop coordinates (query points drawn preferably on foreground).

    Field of view: with probability ``cfg.fov_prob`` a view keeps only a random box of its crop (60-100 % per
    axis) and is zero elsewhere, independently per view, like scans that start and stop at different levels;
    corresponding points are drawn inside both boxes. Without this, both views share the volume's borders
    and the embedding can encode the distance to them, which does not carry over to a scan with another
    field of view (``docs/correspondence.md``).
    """
    shape = np.asarray(volume.shape, dtype=float)
    crop = np.asarray(cfg.crop, dtype=float)
    fg = foreground[rng.integers(len(foreground))].astype(float) if len(foreground) else rng.uniform(0, shape - 1)
    c1 = np.where(crop >= shape, (shape - 1) / 2, fg)     # crops covering an axis are centred on it
    c2 = np.clip(c1 + rng.uniform(-1, 1, 3) * cfg.max_shift * crop, 0, shape - 1)
    v1 = random_view(rng, c1, cfg, elastic=True)
    v2 = random_view(rng, c2, cfg, elastic=False)
    vol = volume[None, None]
    crops, boxes = [], []
    for v in (v1, v2):
        g = v.sampling_grid(volume.shape).to(volume.device)
        x = augment_intensity(F.grid_sample(vol, g, mode="bilinear", padding_mode="zeros", align_corners=True)[0],
                              rng)
        lo, hi = random_fov(rng, cfg)
        if np.any(lo > 0) or np.any(hi < crop - 1):
            keep = torch.zeros_like(x)
            keep[(slice(None),) + tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi))] = 1.0
            x = x * keep
        crops.append(x)
        boxes.append((lo, hi))
    # corresponding points: drawn in view 1's field of view, kept where they land inside view 2's, foreground first
    cand = boxes[0][0] + rng.uniform(0, 1, size=(cfg.points * 6, 3)) * (boxes[0][1] - boxes[0][0])
    x = v1.positions(cand)
    u2 = v2.inverse_affine(x)
    ok = _inside(u2, boxes[1]) & np.all((x >= 0) & (x <= shape - 1), axis=1)
    cand, u2, x = cand[ok], u2[ok], x[ok]
    if len(cand):
        vals = map_coordinates(volume_np, x.T, order=1)
        order = np.argsort(-(vals > 0.1).astype(float) + rng.uniform(0, 0.5, len(vals)))   # foreground first, shuffled
        keep = order[:cfg.points]
        cand, u2 = cand[keep], u2[keep]
    return crops[0], crops[1], v1, v2, cand, u2
