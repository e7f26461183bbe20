"""Pixel-wise InfoNCE on the coarse and fine embedding maps, with hard negatives (SAM, Yan et al. TMI 2022).

For a query point seen in one view, the positive is the embedding of the same volume position in the other
view; negatives are the other view's embeddings at positions farther than a radius from it (closer cells are
neither positive nor negative). As in SAM:

* coarse (global) map: all cells of the other view are negatives, so the coarse map learns *where* in the
  body a point lies;
* fine (local) map: only the ``num_hard`` hardest negatives, ranked by the *matching score* of inference
  (mean of coarse and fine cosine), so the fine map learns to separate exactly the locations the matcher
  would confuse.

Both directions (view 1 -> 2 and 2 -> 1) are averaged.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_alice.pretrain.matching.embedding.pairs import View


def sample_features(fmap: torch.Tensor, u: torch.Tensor, crop: Tuple[int, int, int]) -> torch.Tensor:
    """Trilinear samples (N, D) of a map (D, m0, m1, m2) covering a crop, at crop coordinates ``u`` (N, 3)."""
    size = torch.tensor(crop, dtype=u.dtype, device=u.device)
    n = 2.0 * (u + 0.5) / size - 1.0          # align_corners=False: the map covers the whole crop
    grid = n.flip(-1).view(1, -1, 1, 1, 3)
    out = F.grid_sample(fmap[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    return F.normalize(out[0, :, :, 0, 0].T, dim=1)


def cell_positions(view: View, map_shape: Tuple[int, int, int], stride: int) -> np.ndarray:
    """Volume positions (M, 3) of the centres of a map's cells, in flattened (C-order) cell order."""
    axes = [(np.arange(m) + 0.5) * stride - 0.5 for m in map_shape]
    u = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    return view.positions(u)


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
              temperature: float = 0.1, num_hard: int = 256) -> Dict[str, torch.Tensor]:
    """Symmetric coarse + fine InfoNCE of one pair. ``coarse``/``fine``: the two views' maps (D, m0, m1, m2)."""
    coarse_stride, fine_stride = strides
    device = fine[0].device
    crop = views[0].crop
    if len(u[0]) == 0:
        zero = fine[0].sum() * 0.0
        return {"coarse": zero, "fine": zero}
    x = torch.from_numpy(views[0].positions(u[0])).float().to(device)   # shared volume positions
    ut = [torch.from_numpy(np.asarray(p)).float().to(device) for p in u]
    losses = {"coarse": 0.0, "fine": 0.0}
    for a, b in ((0, 1), (1, 0)):
        qc, kc = sample_features(coarse[a], ut[a], crop), sample_features(coarse[b], ut[b], crop)
        keys_c = coarse[b].flatten(1).T
        xc = torch.from_numpy(cell_positions(views[b], tuple(coarse[b].shape[1:]), coarse_stride)).float().to(device)
        losses["coarse"] = losses["coarse"] + info_nce(qc, kc, keys_c, x, xc, radius=float(coarse_stride),
                                                       temperature=temperature)

        qf, kf = sample_features(fine[a], ut[a], crop), sample_features(fine[b], ut[b], crop)
        keys_f = fine[b].flatten(1).T
        xf = torch.from_numpy(cell_positions(views[b], tuple(fine[b].shape[1:]), fine_stride)).float().to(device)
        coarse_up = F.interpolate(coarse[b][None], size=tuple(fine[b].shape[1:]), mode="trilinear",
                                  align_corners=False)[0]
        with torch.no_grad():
            rank = 0.5 * (qf @ keys_f.T + qc @ F.normalize(coarse_up, dim=0).flatten(1))
        losses["fine"] = losses["fine"] + info_nce(qf, kf, keys_f, x, xf, radius=1.5 * fine_stride,
                                                   temperature=temperature, num_hard=num_hard, rank_by=rank)
    return {k: v / 2 for k, v in losses.items()}
