"""Coarse-to-fine point matching on cached embedding maps (SAM inference, Yan et al., IEEE TMI 2022, Sec. III-C).

The query point's coarse and fine vectors are read (trilinearly) from A's maps. The coarse similarity is
computed over all of B's coarse cells; around each of the ``top_k`` best coarse cells, the fine similarity is
computed in a window of B's fine map, and the matching score at a fine cell is the mean of the fine cosine and
the (trilinearly interpolated) coarse cosine, as in the Alice code (docs/method.md "Data and views"). The best
cell is refined to sub-cell precision by a small continuous search on interpolated, re-normalised maps and
mapped back to B's voxel coordinates. Pure numpy on in-memory arrays: no disk access, a few ms per query.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np
from scipy.ndimage import map_coordinates

from nnunet_alice.embedding.volume import case_to_grid, grid_to_case, grid_to_map, map_to_grid


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


def vectors_at(fmap: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Trilinearly interpolated, re-normalised vectors (N, D) of a map (D, ...) at map coordinates ``m`` (N, 3).

    Re-normalising matters: neighbouring cells of a contrastively trained map are far from parallel, so a
    plain interpolation is shorter than 1 and would bias cosines low between cell centres (SAM, too,
    re-normalises its upsampled coarse map).
    """
    shape = np.asarray(fmap.shape[1:])
    m = np.clip(np.atleast_2d(np.asarray(m, dtype=float)), 0, shape - 1)
    i0 = np.clip(np.floor(m).astype(int), 0, np.maximum(shape - 2, 0))
    w = m - i0
    out = np.zeros((len(m), fmap.shape[0]), dtype=np.float32)
    for corner in range(8):
        bits = np.array([(corner >> k) & 1 for k in range(3)])
        idx = np.minimum(i0 + bits, shape - 1)
        weight = np.prod(np.where(bits == 1, w, 1 - w), axis=1).astype(np.float32)
        out += weight[:, None] * fmap[:, idx[:, 0], idx[:, 1], idx[:, 2]].T.astype(np.float32)
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norm, 1e-12)


def vector_at(fmap: np.ndarray, m: np.ndarray) -> np.ndarray:
    """One interpolated, re-normalised vector (D,) at map coordinates ``m`` (3,)."""
    return vectors_at(fmap, np.asarray(m, dtype=float)[None])[0]


def _combined(qc, qf, eb: "CaseEmbedding", m_fine: np.ndarray) -> np.ndarray:
    """Matching score at continuous fine-map coordinates (N, 3): mean of the coarse and fine cosines."""
    m_coarse = grid_to_map(map_to_grid(m_fine, eb.fine_stride), eb.coarse_stride)
    return 0.5 * (vectors_at(eb.fine, m_fine) @ qf + vectors_at(eb.coarse, m_coarse) @ qc)


def _offsets(step: float, n: int) -> np.ndarray:
    axis = (np.arange(n) - (n - 1) / 2) * step
    return np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)


def match_embeddings(ea: CaseEmbedding, point_a: np.ndarray, eb: CaseEmbedding, top_k: int = 8
                     ) -> Tuple[np.ndarray, float]:
    """Best match in B of voxel ``point_a`` of A: ``(point_b in B's voxels, score = mean of both cosines)``.

    1. coarse: cosine of the query's coarse vector with every coarse cell of B, keep the ``top_k`` cells;
    2. fine: in a window of fine cells around each, score = mean(fine cosine, interpolated coarse cosine);
    3. refine the best cell continuously (half- then quarter-cell steps) on interpolated, re-normalised maps;
       the score returned is the one at the refined point.
    """
    qc = vector_at(ea.coarse, ea.to_map(point_a, ea.coarse_stride))
    qf = vector_at(ea.fine, ea.to_map(point_a, ea.fine_stride))
    sim_c = np.tensordot(qc, eb.coarse, axes=(0, 0))
    cs, fs = eb.coarse_stride, eb.fine_stride
    fshape = np.asarray(eb.fine.shape[1:])
    half = int(np.ceil(cs / fs)) + 1
    order = np.argsort(-sim_c.ravel(), kind="stable")[:max(1, int(top_k))]
    best_val, best_cell = -np.inf, None
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
            best_val, best_cell = float(combined[j]), np.asarray(j, dtype=float) + lo
    # continuous refinement on interpolated maps
    pos = best_cell
    best_val = float(_combined(qc, qf, eb, pos[None])[0])
    for step, n in ((0.5, 5), (0.25, 3)):
        cand = np.clip(pos + _offsets(step, n), 0, fshape - 1)
        vals = _combined(qc, qf, eb, cand)
        j = int(np.argmax(vals))
        if vals[j] > best_val:
            best_val, pos = float(vals[j]), cand[j]
    point_b = np.clip(eb.to_case(pos, fs), 0, np.asarray(eb.case_shape, dtype=float) - 1)
    return point_b, float(np.clip(best_val, -1.0, 1.0))
