"""Query-point sampling and matching with retries, shared by all matchers.

Implements the view-mining loop of the official Alice code (the official code's view mining, docs/method.md "Data and
views"): draw a query
point on soft tissue / foreground of volume A, match it into volume B, and retry with new query points while
the match score is below the threshold (0.7). Unlike the official code, which uses the last low-confidence
match after 101 tries, a pair that never passes falls back to an *intra-volume* pair (the key view is cropped
from A itself, at the query point; docs/method.md "Data and views") and the fallback is counted.

Foreground: voxels above an Otsu threshold of channel 0 (air/background vs. body in CT and MR alike). It is
computed once per case on a strided grid and kept in a small per-process cache, so a retry costs one random
draw, not a volume read.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from nnunet_alice.pretrain.matching.base import CaseVolume, Matcher

Margin = Union[int, float, Sequence[float], np.ndarray]

#: target number of grid points of the per-case foreground candidate list
_CANDIDATE_POINTS = 32 ** 3
_CACHE_SIZE = 128


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (maximum between-class variance) of a sample of intensities."""
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centers = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1e-12)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1e-12)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[1:][int(np.argmax(between[:-1]))]) if bins > 1 else lo


def _bounds(shape: Sequence[int], margin: Margin) -> Tuple[np.ndarray, np.ndarray]:
    """Inclusive per-axis limits ``[margin, size-1-margin]``; collapses to the centre where the volume is small."""
    size = np.asarray(shape, dtype=float)
    m = np.broadcast_to(np.asarray(margin, dtype=float), size.shape)
    lo, hi = m.copy(), size - 1 - m
    small = lo > hi
    lo[small] = hi[small] = (size[small] - 1) / 2.0
    return lo, hi


@dataclass
class _Candidates:
    points: np.ndarray   # (N, 3) int voxel coordinates of foreground grid points
    stride: int


class ForegroundSampler:
    """Draws random foreground voxels of a case (a cache of foreground grid points per case id and shape)."""

    def __init__(self, cache_size: int = _CACHE_SIZE):
        self.cache_size = int(cache_size)
        self._cache: "OrderedDict[tuple, _Candidates]" = OrderedDict()

    def candidates(self, case: CaseVolume) -> _Candidates:
        key = (case.case_id, tuple(case.shape))
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        size = int(np.prod(case.shape))
        stride = max(1, int(np.ceil((size / _CANDIDATE_POINTS) ** (1.0 / 3.0))))
        grid = np.asarray(case.image[0], dtype=np.float32)[::stride, ::stride, ::stride]
        mask = grid > otsu_threshold(grid)
        points = (np.argwhere(mask) * stride).astype(np.int32)
        hit = _Candidates(points, stride)
        self._cache[key] = hit
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return hit

    def sample(self, case: CaseVolume, rng: np.random.Generator, margin: Margin = 0) -> np.ndarray:
        """A foreground voxel at least ``margin`` voxels inside every border (any voxel there if none is)."""
        lo, hi = _bounds(case.shape, margin)
        cand = self.candidates(case)
        pts = cand.points
        if len(pts):
            inside = np.all((pts >= np.floor(lo)) & (pts <= np.ceil(hi)), axis=1)
            pts = pts[inside]
        if len(pts):
            p = pts[rng.integers(len(pts))].astype(float)
            p = p + rng.integers(0, cand.stride, size=3)  # a voxel of the grid cell, not always its corner
        else:
            p = rng.uniform(lo, hi + 1e-9)
        return np.clip(np.round(p), np.ceil(lo), np.floor(hi)).astype(float)


_DEFAULT_SAMPLER = ForegroundSampler()


def sample_query_point(case: CaseVolume, rng: np.random.Generator, margin: Margin = 0) -> np.ndarray:
    """A random foreground voxel of ``case`` (voxel coordinates, float array), ``margin`` inside the borders."""
    return _DEFAULT_SAMPLER.sample(case, rng, margin)


def match_with_retries(matcher: Matcher, case_a: CaseVolume, case_b: CaseVolume, rng: np.random.Generator,
                       threshold: float = 0.7, tries: int = 20, margin: Margin = 0,
                       sampler: Optional[ForegroundSampler] = None
                       ) -> Tuple[np.ndarray, np.ndarray, float, bool]:
    """Mine one (query, key) centre pair; returns ``(point_a, point_b, score, fell_back)``.

    Up to ``tries`` foreground query points of ``case_a`` (``margin`` voxels inside its borders, e.g. half the
    patch size) are matched into ``case_b``; the first with ``score >= threshold`` is returned with
    ``fell_back=False`` and ``point_b`` clipped into ``case_b``. If none passes, ``fell_back=True``,
    ``point_b == point_a`` and **the caller must crop the key view from case_a** (intra fallback); ``score``
    is then the last, rejected score. (The run logs the fallback rate of every batch, docs/method.md.)
    """
    sampler = sampler or _DEFAULT_SAMPLER
    point_a, score = None, float("nan")
    for _ in range(max(1, int(tries))):
        point_a = sampler.sample(case_a, rng, margin)
        point_b, score = matcher.match(case_a, point_a, case_b, rng=rng)
        score = float(score)
        if np.isfinite(score) and score >= threshold:
            upper = np.asarray(case_b.shape, dtype=float) - 1
            return point_a, np.clip(np.asarray(point_b, dtype=float), 0, upper), score, False
    return point_a, point_a.copy(), score, True
