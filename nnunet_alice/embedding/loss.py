"""Pixel-wise InfoNCE on the coarse and fine embedding maps, with hard negatives (SAM, Yan et al. TMI 2022).

For a query point seen in one view, the positive is the embedding of the same volume position in the other
view; negatives are the other view's embeddings at positions farther than a radius from it (closer ones are
neither positive nor negative). As in SAM:

* coarse (global) map: negatives spread over the whole other view, so the coarse map learns *where* in the
  body a point lies;
* fine (local) map: the same global negatives plus *hard* negatives, the locations just outside the radius
  around the positive (the most similar non-corresponding locations: same anatomy, a few mm off), so the
  fine map learns to localise precisely. Of these, only the ``num_hard`` (128 by default; ``None`` keeps all)
  negatives with the highest matching score of inference (mean of coarse and fine cosine) are kept, SAM's
  hard-negative mining; it lowered the median error on MNI from 3.3 / 5.5 / 4.6 mm to 2.4 / 4.2 / 3.6 mm
  (mild / strong / field-of-view pairs, ``docs/correspondence.md``).

All embeddings (queries, positives, negatives) are sampled at continuous positions, trilinearly, and
re-normalised; both directions (view 1 -> 2 and 2 -> 1) are averaged.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_alice.embedding.pairs import View


def sample_features(fmap: torch.Tensor, u: torch.Tensor, stride: int) -> torch.Tensor:
    """Trilinear samples (N, D) of a map (D, m0, m1, m2) at crop coordinates ``u`` (N, 3); cell j sits on voxel
    ``j * stride`` (see :mod:`.volume`)."""
    size = torch.tensor(fmap.shape[1:], dtype=u.dtype, device=u.device)
    n = 2.0 * (u / stride) / torch.clamp(size - 1, min=1) - 1.0
    grid = n.flip(-1).view(1, -1, 1, 1, 3)
    out = F.grid_sample(fmap[None], grid, mode="bilinear", padding_mode="border", align_corners=True)
    return F.normalize(out[0, :, :, 0, 0].T, dim=1)


def negative_positions(crop: Tuple[int, int, int], positives: np.ndarray, rng: np.random.Generator,
                       n_global: int, n_local: int, local_voxels: float) -> np.ndarray:
    """Crop coordinates (K, 3) of candidate negatives: ``n_global`` uniform positions in the crop plus
    ``n_local`` positions within ``local_voxels`` of every positive (the near, hard ones).

    Continuous positions, sampled like the queries and positives. Taking negatives at cell centres only
    (while queries and positives are interpolated between cells) lets the network tell them apart by
    sub-cell phase alone: our first trainings learned exactly that shortcut, with maps that matched
    nothing across volumes.
    """
    upper = np.asarray(crop, dtype=float) - 1
    glob = rng.uniform(0, upper, size=(n_global, 3))
    centres = np.repeat(np.asarray(positives, dtype=float), n_local, axis=0)
    local = np.clip(centres + rng.uniform(-local_voxels, local_voxels, centres.shape), 0, upper)
    return np.concatenate([glob, local], 0)


def info_nce(query: torch.Tensor, positive: torch.Tensor, keys: torch.Tensor, query_x: torch.Tensor,
             keys_x: torch.Tensor, radius: float, temperature: float, num_hard: int | None = None,
             rank_by: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE of (N, D) queries vs. their positives and the keys (M, D) farther than ``radius`` away.

    ``num_hard``: keep only that many negatives per query, the highest under ``rank_by`` (N, M; default the
    query-key similarity itself).
    """
    pos = (query * positive).sum(1, keepdim=True)
    neg = query @ keys.T
    far = torch.cdist(query_x, keys_x) > radius
    neg = neg.masked_fill(~far, float("-inf"))
    if num_hard is not None and num_hard < neg.shape[1]:
        rank = neg.detach() if rank_by is None else rank_by.detach().masked_fill(~far, float("-inf"))
        idx = rank.topk(num_hard, dim=1).indices
        neg = neg.gather(1, idx)
    logits = torch.cat([pos, neg], 1) / temperature
    target = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target)


def pair_loss(coarse: Tuple[torch.Tensor, torch.Tensor], fine: Tuple[torch.Tensor, torch.Tensor],
              views: Tuple[View, View], u: Tuple[np.ndarray, np.ndarray], strides: Tuple[int, int],
              temperature: float = 0.1, num_hard: int | None = None, coarse_radius: float = 2.0,
              fine_radius: float = 2.0, fine_keys: int = 4096, rng: np.random.Generator | None = None,
              fine_local: int = 16, coarse_keys: int = 1024) -> Dict[str, torch.Tensor]:
    """Symmetric coarse + fine InfoNCE of one pair. ``coarse``/``fine``: the two views' maps (D, m0, m1, m2).

    ``coarse_radius``/``fine_radius``: the neutral zone around a positive, in cells of the respective map
    (wide enough that neighbouring cells stay similar, so the maps interpolate well between cell centres).
    Negatives are ``coarse_keys`` / ``fine_keys`` random positions of the other view (fine: plus
    ``fine_local`` near each positive), see :func:`negative_positions`; the fine ones are then mined.
    """
    rng = rng if rng is not None else np.random.default_rng()
    coarse_stride, fine_stride = strides
    device = fine[0].device
    if len(u[0]) == 0:
        zero = fine[0].sum() * 0.0
        return {"coarse": zero, "fine": zero}
    x = torch.from_numpy(views[0].positions(u[0])).float().to(device)   # shared volume positions
    ut = [torch.from_numpy(np.asarray(p)).float().to(device) for p in u]
    losses = {"coarse": 0.0, "fine": 0.0}
    for a, b in ((0, 1), (1, 0)):
        crop = views[b].crop
        qc, kc = sample_features(coarse[a], ut[a], coarse_stride), sample_features(coarse[b], ut[b], coarse_stride)
        neg_c = negative_positions(crop, u[b], rng, coarse_keys, 0, 0.0)
        neg_c_t = torch.from_numpy(neg_c).float().to(device)
        keys_c = sample_features(coarse[b], neg_c_t, coarse_stride)
        xc = torch.from_numpy(views[b].positions(neg_c)).float().to(device)
        losses["coarse"] = losses["coarse"] + info_nce(qc, kc, keys_c, x, xc, radius=coarse_radius * coarse_stride,
                                                       temperature=temperature)

        qf, kf = sample_features(fine[a], ut[a], fine_stride), sample_features(fine[b], ut[b], fine_stride)
        neg_f = negative_positions(crop, u[b], rng, fine_keys, fine_local, 4 * fine_radius * fine_stride)
        neg_f_t = torch.from_numpy(neg_f).float().to(device)
        keys_f = sample_features(fine[b], neg_f_t, fine_stride)
        xf = torch.from_numpy(views[b].positions(neg_f)).float().to(device)
        with torch.no_grad():
            coarse_at = sample_features(coarse[b], neg_f_t, coarse_stride)
            rank = 0.5 * (qf @ keys_f.T + qc @ coarse_at.T)
        losses["fine"] = losses["fine"] + info_nce(qf, kf, keys_f, x, xf, radius=fine_radius * fine_stride,
                                                   temperature=temperature, num_hard=num_hard, rank_by=rank)
    return {k: v / 2 for k, v in losses.items()}
