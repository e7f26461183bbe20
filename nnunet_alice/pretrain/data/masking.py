"""Per-sample random block masks for masked image modelling (Alice Sec. 3.2; docs/method.md "Masked image modelling").

The patch is divided into a grid of ``block_size``³ blocks; for every sample independently,
``round(ratio * n_blocks)`` blocks are chosen and all their voxels masked. When ``block_size`` divides the
patch size, exactly ``ratio`` of the voxels is masked per sample (up to rounding to whole blocks).
The official code shares one mask across the whole batch (bug B3 in docs/method.md); here every sample gets its own.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def block_grid(patch_size: Sequence[int], block_size: int) -> tuple:
    """Number of blocks per axis (the last block may be cut by the patch border)."""
    b = [max(1, min(int(block_size), int(p))) for p in patch_size]
    return tuple(int(np.ceil(p / bb)) for p, bb in zip(patch_size, b)), tuple(b)


def random_block_mask(patch_size: Sequence[int], block_size: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """One mask of shape ``patch_size`` (float32, 1 = masked, 0 = visible)."""
    grid, b = block_grid(patch_size, block_size)
    n = int(np.prod(grid))
    k = int(round(ratio * n))
    flat = np.zeros(n, dtype=np.float32)
    if k > 0:
        flat[rng.choice(n, size=k, replace=False)] = 1.0
    m = flat.reshape(grid)
    for axis, bb in enumerate(b):
        m = np.repeat(m, bb, axis=axis)
    return np.ascontiguousarray(m[tuple(slice(0, int(p)) for p in patch_size)])


def batch_block_masks(batch_size: int, patch_size: Sequence[int], block_size: int, ratio: float,
                      rng: np.random.Generator) -> np.ndarray:
    """Masks for a batch, shape ``(B, 1, *patch_size)``, drawn independently per sample."""
    return np.stack([random_block_mask(patch_size, block_size, ratio, rng)[None] for _ in range(batch_size)])
