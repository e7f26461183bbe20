"""The embedding grid: how a case is resampled and normalised for the embedding network, and coordinates.

SAM (Yan et al., IEEE TMI 2022) embeds every scan on a fixed 2 mm grid; here we embed *exactly the array the
trainer crops from* (channel 0 of the preprocessed case), resampled to
``target_spacing`` (never upsampled) and carry the per-axis scale instead of hard-coding it.

Coordinates (continuous, voxel centres at integers):
    case voxel p  ->  grid voxel  e = (p + 0.5) * scale - 0.5,   scale = grid_shape / case_shape
    grid voxel e  ->  map cell    m = e / stride   (cell j is centred on grid voxel j*stride: the encoder's
                                                   stride-2 convolutions, kernel 3, padding 1, centre output j
                                                   on input 2j; the decoder's skips keep that alignment)
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np


def grid_shape_for(shape: Sequence[int], spacing: Sequence[float], target_spacing: float) -> Tuple[int, ...]:
    """Shape on the embedding grid: spacing ``max(spacing, target_spacing)`` per axis."""
    out = []
    for n, s in zip(shape, spacing):
        new = max(float(s), float(target_spacing))
        out.append(max(1, int(round(n * float(s) / new))))
    return tuple(out)


def normalize_intensity(arr: np.ndarray) -> np.ndarray:
    """Clip to the 0.5-99.5 percentiles and rescale to [0, 1] (modality-agnostic; background near 0)."""
    arr = np.asarray(arr, dtype=np.float32)
    sub = arr[::2, ::2, ::2] if arr.size > 64 ** 3 else arr
    lo, hi = np.percentile(sub, [0.5, 99.5])
    if hi <= lo:
        return np.zeros_like(arr, dtype=np.float32)
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def to_embedding_grid(arr: np.ndarray, spacing: Sequence[float], target_spacing: float
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """Resample (Gaussian anti-aliasing + trilinear) and normalise; returns ``(volume float32, scale per axis)``.

    Trilinear with ``align_corners=False`` puts grid voxel ``e`` exactly at case voxel ``(e+0.5)/scale-0.5``.
    """
    import torch
    import torch.nn.functional as F
    from scipy.ndimage import gaussian_filter

    arr = np.asarray(arr, dtype=np.float32)
    shape = tuple(arr.shape)
    grid = grid_shape_for(shape, spacing, target_spacing)
    if grid != shape:
        factors = np.asarray(shape, dtype=float) / np.asarray(grid, dtype=float)
        if np.any(factors > 1.2):
            arr = gaussian_filter(arr, sigma=np.where(factors > 1.2, 0.4 * factors, 0.0), mode="nearest")
        t = torch.from_numpy(np.ascontiguousarray(arr))[None, None]
        arr = F.interpolate(t, size=grid, mode="trilinear", align_corners=False)[0, 0].numpy()
    scale = np.asarray(grid, dtype=float) / np.asarray(shape, dtype=float)
    return normalize_intensity(arr), scale


def case_to_grid(p: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (np.asarray(p, dtype=float) + 0.5) * scale - 0.5


def grid_to_case(e: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (np.asarray(e, dtype=float) + 0.5) / scale - 0.5


def grid_to_map(e: np.ndarray, stride: int) -> np.ndarray:
    return np.asarray(e, dtype=float) / float(stride)


def map_to_grid(m: np.ndarray, stride: int) -> np.ndarray:
    return np.asarray(m, dtype=float) * float(stride)
