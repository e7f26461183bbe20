"""The matcher interface: find, in volume B, the point that shows the anatomy at ``point_a`` of volume A.

Paper (Jiang et al., ICCV 2023, Sec. 3.1): the key view is cropped from a *different* volume around the point
that an anatomical embedding matches to the query point. Every matcher implements
``match(case_a, point_a, case_b, rng=None) -> (point_b, score)``; the training loop never knows which one it uses.

Coordinates are voxel indices (float allowed) in the axis order of the preprocessed arrays, i.e. the arrays
``case.image[c]`` of shape ``case.shape``. Scores are in [-1, 1]; higher is more confident.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np


@dataclass
class CaseVolume:
    """One preprocessed case as the view sampler sees it."""
    case_id: str
    image: np.ndarray            # (C, X, Y, Z) float32 array-like (numpy or memory-mapped blosc2)
    spacing: Tuple[float, ...]   # mm per voxel along the array axes

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.image.shape[1:])

    def channel(self, c: int = 0) -> np.ndarray:
        """One channel as an in-memory float32 numpy array (reads the whole channel)."""
        return np.asarray(self.image[c], dtype=np.float32)


class Matcher(ABC):
    """Maps a point of one case to the anatomically corresponding point of another case."""

    name: str = "base"
    #: True when the matcher needs two *different* volumes (the sampler then never pairs a case with itself)
    inter_volume: bool = True

    def prepare(self, cases: Sequence[CaseVolume]) -> None:
        """Compute per-case state once (in the main process, before data workers start). Optional."""

    @abstractmethod
    def match(self, case_a: CaseVolume, point_a: np.ndarray, case_b: CaseVolume,
              rng: Optional[np.random.Generator] = None) -> Tuple[np.ndarray, float]:
        """Return ``(point_b, score)``; ``point_b`` is a float array of voxel coordinates inside ``case_b``.

        ``rng``: the caller's generator, for a matcher that draws random numbers (the view sampler passes the
        batch's own, so the stream of views stays a function of the batch index)."""
