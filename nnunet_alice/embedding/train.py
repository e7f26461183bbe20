"""Self-supervised training of the anatomical embedding (SAM, Yan et al., IEEE TMI 2022, Sec. III-A/B).

Each step draws ``batch_size`` volumes, makes one pair of overlapping, differently augmented crops of each
(:mod:`.pairs`), embeds all crops in one forward pass and minimises the coarse + fine pixel-wise InfoNCE
with hard negatives (:mod:`.loss`). AdamW, linear warm-up then cosine decay, gradient clipping.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from nnunet_alice.embedding.loss import pair_loss
from nnunet_alice.embedding.network import AnatomicalEmbeddingNet
from nnunet_alice.embedding.pairs import PairConfig, make_pair
from nnunet_alice.pretrain.matching.sampling import otsu_threshold
from nnunet_alice.pretrain.training.schedules import cosine_schedule


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 2
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    temperature: float = 0.05
    num_hard: Optional[int] = 128   # keep only the k most similar fine negatives (None: all candidates)
    coarse_radius: float = 1.0    # neutral zone around a positive, in coarse cells
    fine_radius: float = 2.0      # ... in fine cells
    coarse_keys: int = 1024       # random positions of the other view: coarse negatives
    fine_keys: int = 4096         # random positions of the other view: fine negatives ...
    fine_local: int = 16          # ... plus this many hard ones near every positive (just outside the radius)
    grad_clip: float = 5.0
    seed: int = 0
    pair: PairConfig = field(default_factory=PairConfig)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pair"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["pair"].items()}
        return d


def lr_schedule(cfg: TrainConfig) -> np.ndarray:
    """Per-step learning rate: linear warm-up from ``lr / warm`` over ``warmup_fraction`` of the run, then a half
    cosine to ``min_lr`` (the pretraining loop's ``cosine_schedule``)."""
    warm = max(1, int(cfg.warmup_fraction * cfg.steps))
    return cosine_schedule(cfg.lr, cfg.min_lr, cfg.steps, warm, warmup_start_value=cfg.lr / warm)


def foreground_points(volume: np.ndarray, max_points: int = 20000, seed: int = 0) -> np.ndarray:
    """Crop-centre candidates: voxels above the Otsu threshold (a random subset)."""
    pts = np.argwhere(volume > otsu_threshold(volume[::2, ::2, ::2]))
    if len(pts) > max_points:
        pts = pts[np.random.default_rng(seed).choice(len(pts), max_points, replace=False)]
    return pts


def _round_crop(crop: Sequence[int], divisor: int) -> tuple:
    return tuple(int(math.ceil(c / divisor) * divisor) for c in crop)


def train_embedding(volumes: Sequence[np.ndarray], arch: Optional[dict] = None, cfg: Optional[TrainConfig] = None,
                    device: str | torch.device = "cpu", progress: bool = True,
                    log: Optional[Callable[[str], None]] = None, log_every: int = 25
                    ) -> tuple[AnatomicalEmbeddingNet, List[Dict[str, float]]]:
    """Train on normalised embedding-grid volumes; returns ``(network, per-step history)``."""
    cfg = cfg or TrainConfig()
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net = AnatomicalEmbeddingNet(arch).to(device)
    vols_np = [np.ascontiguousarray(v, dtype=np.float32) for v in volumes]
    if cfg.pair.crop is None:   # whole volumes: the largest volume, capped
        cfg.pair.crop = tuple(min(int(m), max(v.shape[k] for v in vols_np)) for k, m in enumerate(cfg.pair.max_crop))
    cfg.pair.crop = _round_crop(cfg.pair.crop, net.size_divisor)
    vols_t = [torch.from_numpy(v).to(device) for v in vols_np]
    fg = [foreground_points(v, seed=cfg.seed + i) for i, v in enumerate(vols_np)]
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history: List[Dict[str, float]] = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, desc="alice_embed", unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    net.train()
    lrs = lr_schedule(cfg)
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = float(lrs[step])
        pairs = []
        for _ in range(cfg.batch_size):
            i = int(rng.integers(len(vols_t)))
            pairs.append(make_pair(vols_t[i], vols_np[i], fg[i], rng, cfg.pair))
        x = torch.stack([p[0] for p in pairs] + [p[1] for p in pairs]).to(device)
        coarse, fine = net(x)
        n = len(pairs)
        terms: Dict[str, Any] = {"coarse": 0.0, "fine": 0.0}
        for j, (_, _, v1, v2, u1, u2) in enumerate(pairs):
            part = pair_loss((coarse[j], coarse[n + j]), (fine[j], fine[n + j]), (v1, v2), (u1, u2),
                             (net.coarse_stride, net.fine_stride), cfg.temperature, cfg.num_hard,
                             cfg.coarse_radius, cfg.fine_radius, cfg.fine_keys, rng, cfg.fine_local,
                             cfg.coarse_keys)
            for k in terms:
                terms[k] = terms[k] + part[k] / n
        loss = terms["coarse"] + terms["fine"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        rec = {"step": step, "loss": loss.item(), "coarse": float(terms["coarse"].detach()),
               "fine": float(terms["fine"].detach()),
               "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
        history.append(rec)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
        if log is not None and (step % log_every == 0 or step == cfg.steps - 1):
            log(f"step {step + 1}/{cfg.steps} loss {rec['loss']:.4f} (coarse {rec['coarse']:.4f}, "
                f"fine {rec['fine']:.4f}) lr {rec['lr']:.2e} {rec['seconds']:.1f}s")
    if bar is not None:
        bar.close()
    net.eval()
    return net, history


def plot_history(history: List[Dict[str, float]], path: str) -> None:
    """Loss curves (total, coarse, fine; running mean over 20 steps) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([h["step"] + 1 for h in history])
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "coarse", "fine"):
        y = np.array([h[key] for h in history])
        k = min(20, len(y))
        smooth = np.convolve(y, np.ones(k) / k, mode="valid") if k > 1 else y
        ax.plot(steps[len(steps) - len(smooth):], smooth, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("InfoNCE")
    ax.set_title("Alice anatomical embedding training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
