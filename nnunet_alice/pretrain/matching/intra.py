"""``intra``: both views from the same volume, the key centre jittered (docs/method.md "Data and views").

With this matcher Alice reduces to DINO/iBOT-style self-distillation + MIM + CASA; it is the default when no
anatomical model exists and the ablation "intra-only views".
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from nnunet_alice.pretrain.matching.base import CaseVolume, Matcher


class IntraVolumeMatcher(Matcher):
    name = "intra"
    inter_volume = False

    def __init__(self, jitter: float = 0.25, patch_size: Optional[Sequence[int]] = None, seed: Optional[int] = None):
        self.jitter = float(jitter)
        self.patch_size = None if patch_size is None else np.asarray(patch_size, dtype=float)
        self.rng = np.random.default_rng(seed)

    def match(self, case_a: CaseVolume, point_a: np.ndarray, case_b: CaseVolume,
              rng: Optional[np.random.Generator] = None) -> Tuple[np.ndarray, float]:
        point_a = np.asarray(point_a, dtype=float)
        scale = self.patch_size if self.patch_size is not None else np.asarray(case_a.shape, dtype=float) * 0.25
        offset = (rng or self.rng).uniform(-1.0, 1.0, size=point_a.shape) * self.jitter * scale
        upper = np.asarray(case_a.shape, dtype=float) - 1
        return np.clip(point_a + offset, 0, upper), 1.0
