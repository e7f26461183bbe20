"""Coarse-to-fine point matching on cached embedding maps (SAM inference, Yan et al., IEEE TMI 2022, Sec. III-C).

The query point's coarse and fine vectors are read (trilinearly) from A's maps. The coarse similarity is
computed over all of B's coarse cells; around each of the ``top_k`` best coarse cells, the fine similarity is
computed in a window of B's fine map, and the matching score at a fine cell is the mean of the fine cosine and
the (trilinearly interpolated) coarse cosine, as in the Alice code (alice-method.md §1.2, step 5). The best
cell is refined to sub-cell precision by a per-axis parabola fit and mapped back to B's voxel coordinates.
Pure numpy on in-memory arrays: no disk access, a few milliseconds per query.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np
from scipy.ndimage import map_coordinates

from nnunet_alice.pretrain.matching.embedding.volume import case_to_grid, grid_to_case, grid_to_map, map_to_grid


@dataclass
class CaseEmbedding:
    """One case's embedding maps on the embedding grid, and how they relate to the case's voxels."""
    coarse: np.ndarray          # (Dc, c0, c1, c2) float32, unit vectors
    fine: np.ndarray            # (Df, f0, f1, f2) float16, unit vectors
    scale: np.ndarray           # embedding-grid voxels per case voxel, per axis
    case_shape: Tuple[int, int, int]
    coarse_stride: int
    fine_stride: int

    def to_map(self, p_case: np.ndarray, stride: int) -> np.ndarray:
        return grid_to_map(case_to_grid(p_case, self.scale), stride)

    def to_case(self, m: np.ndarray, stride: int) -> np.ndarray:
        return grid_to_case(map_to_grid(m, stride), self.scale)


def vector_at(fmap: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Trilinearly interpolated, re-normalised vector of a map (D, ...) at map coordinates ``m``."""
    shape = np.asarray(fmap.shape[1:])
    m = np.clip(np.asarray(m, dtype=float), 0, shape - 1)
    i0 = np.minimum(np.floor(m).astype(int), np.maximum(shape - 2, 0))
    w = m - i0
    v = np.zeros(fmap.shape[0], dtype=np.float64)
    for corner in range(8):
        bits = np.array([(corner >> k) & 1 for k in range(3)])
        idx = np.minimum(i0 + bits, shape - 1)
        weight = float(np.prod(np.where(bits == 1, w, 1 - w)))
        if weight > 0:
            v += weight * fmap[(slice(None),) + tuple(idx)].astype(np.float64)
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


def _parabola_offset(left: float, mid: float, right: float) -> float:
    den = left - 2 * mid + right
    if not np.isfinite(den) or den >= 0:
        return 0.0
    return float(np.clip(0.5 * (left - right) / den, -0.5, 0.5))


def match_embeddings(ea: CaseEmbedding, point_a: np.ndarray, eb: CaseEmbedding, top_k: int = 4
                     ) -> Tuple[np.ndarray, float]:
    """Best match in B of voxel ``point_a`` of A: ``(point_b in B's voxels, score = mean of both cosines)``."""
    qc = vector_at(ea.coarse, ea.to_map(point_a, ea.coarse_stride)).astype(np.float32)
    qf = vector_at(ea.fine, ea.to_map(point_a, ea.fine_stride)).astype(np.float32)
    sim_c = np.tensordot(qc, eb.coarse, axes=(0, 0))
    cs, fs = eb.coarse_stride, eb.fine_stride
    fshape = np.asarray(eb.fine.shape[1:])
    half = int(np.ceil(cs / fs)) + 1
    order = np.argsort(-sim_c.ravel(), kind="stable")[:max(1, int(top_k))]
    best_val, best_pos, best_win, best_lo = -np.inf, None, None, None
    for flat in order:
        cell = np.asarray(np.unravel_index(flat, sim_c.shape), dtype=float)
        centre = grid_to_map(map_to_grid(cell, cs), fs)
        lo = np.clip(np.floor(centre).astype(int) - half, 0, fshape - 1)
        hi = np.clip(np.ceil(centre).astype(int) + half + 1, lo + 1, fshape)
        window = eb.fine[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].astype(np.float32)
        sim_f = np.tensordot(qf, window, axes=(0, 0))
        axes = [np.arange(lo[k], hi[k], dtype=float) for k in range(3)]
        mf = np.stack(np.meshgrid(*axes, indexing="ij"), 0)                       # fine map coords
        mc = grid_to_map(map_to_grid(mf, fs), cs)                                 # -> coarse map coords
        sim_cw = map_coordinates(sim_c, mc.reshape(3, -1), order=1, mode="nearest").reshape(sim_f.shape)
        combined = 0.5 * (sim_f + sim_cw)
        j = np.unravel_index(int(np.argmax(combined)), combined.shape)
        if combined[j] > best_val:
            best_val, best_pos, best_win, best_lo = float(combined[j]), np.asarray(j), combined, lo
    # sub-cell refinement inside the winning window
    pos = best_pos.astype(float)
    mid = float(best_win[tuple(best_pos)])
    for k in range(3):
        if 0 < best_pos[k] < best_win.shape[k] - 1:
            left, right = best_pos.copy(), best_pos.copy()
            left[k] -= 1
            right[k] += 1
            pos[k] += _parabola_offset(float(best_win[tuple(left)]), mid, float(best_win[tuple(right)]))
    m_b = pos + best_lo
    point_b = np.clip(eb.to_case(m_b, fs), 0, np.asarray(eb.case_shape, dtype=float) - 1)
    return point_b, float(np.clip(best_val, -1.0, 1.0))
