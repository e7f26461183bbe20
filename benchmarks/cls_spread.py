"""Does the CLS of a pretraining checkpoint still tell volumes apart? Student and teacher, side by side.

The DINO-style CLS term (Alice, arXiv 2302.05615, Eq. 1; DINO, arXiv 2104.14294) teaches nothing once the student
maps every volume to the same prototype distribution: its loss then sits at ln K while the teacher, an EMA of it,
follows. This reads ``training_state.objective`` of an ``alice_pretrain`` checkpoint with ``--continue`` state
(``checkpoint_latest.pth``, its ``network_weights`` for the student network; ``init`` = the objective at
initialisation), takes one 32³-voxel (or ``--patch``) crop
near the centre of each of ``--cases`` preprocessed training cases, and prints for the student and the teacher:
the mean pairwise cosine of the head's input (the standardised CLS vector) and of its normalised bottleneck ``z``,
the spread of the logits across cases, and the entropy of the Sinkhorn-Knopp and softmax targets at the teacher
temperature, as a fraction of ln K (1.0 = uniform); the student on masked views (fixed random block masks: what
its CLS reads under ``--cls-student-view masked``); and the student once more with the teacher's CLS
standardisation statistics (the student's own come from the views its CLS reads). docs/results.md has what it
found.

    python -m benchmarks.cls_spread -d 990 -p nnUNetPlans_alicebench_long -c 3d_fullres CHECKPOINT [init ...]
"""
from __future__ import annotations

import argparse
import glob
import math
import os

import numpy as np
import torch
from torch.nn import functional as F

from nnunet_alice.checkpoint import load_checkpoint
from nnunet_alice.pretrain.config import PretrainConfig
from nnunet_alice.pretrain.data.cases import load_plans, resolve_dataset_name
from nnunet_alice.pretrain.data.masking import batch_block_masks
from nnunet_alice.pretrain.model import build_planned_network
from nnunet_alice.pretrain.objectives.alice import AliceObjective
from nnunet_alice.pretrain.objectives.losses import probs_entropy, sinkhorn_knopp
from nnunet_alice.pretrain.training.schedules import Schedules


def centre_crops(folder: str, n: int, patch: int, seed: int = 0) -> torch.Tensor:
    """One crop near the centre (±4 voxels) of each of the first ``n`` preprocessed cases of ``folder``."""
    import blosc2

    files = sorted(f for f in glob.glob(os.path.join(folder, "*.b2nd")) if not f.endswith("_seg.b2nd"))[:n]
    rng, half, crops = np.random.default_rng(seed), patch // 2, []
    for f in files:
        a = blosc2.open(f)[:]
        c = np.clip(np.array(a.shape[1:]) // 2 + rng.integers(-4, 5, 3), half, np.array(a.shape[1:]) - half)
        crops.append(a[:, c[0] - half:c[0] + half, c[1] - half:c[1] + half, c[2] - half:c[2] + half])
    return torch.from_numpy(np.stack(crops).astype(np.float32))


def mean_cos(v: torch.Tensor) -> float:
    v = F.normalize(v.float().flatten(1), dim=-1)
    c, n = v @ v.t(), len(v)
    return float((c.sum() - n) / (n * (n - 1)))


def spread(model, x: torch.Tensor, temp: float, masking=None) -> dict:
    """Spread of ``model``'s CLS over the crops ``x``; ``masking`` = (the objective's ``mim``, a (B, 1, *S) mask):
    the masked views the student is trained on, through the sparse encoder."""
    seen = []
    hook = model.head.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        if masking is None:
            logits = model.encode(x, need_tokens=False)["cls"].float()
        else:
            mim, mask = masking
            with mim.masked(mask):
                logits = model.encode(x * (1.0 - mask), need_tokens=False, visible=1.0 - mask)["cls"].float()
        z = F.normalize(model.head.mlp(seen[-1]), dim=-1)
    hook.remove()
    log_k = math.log(logits.shape[-1])
    return {"cos_cls": mean_cos(seen[-1]), "cos_z": mean_cos(z), "logit_sd": float(logits.std(0).mean()),
            "sk_entropy": float(probs_entropy(sinkhorn_knopp(logits, temp, 3))) / log_k,
            "softmax_entropy": float(probs_entropy(F.softmax(logits / temp, dim=-1))) / log_k}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", dest="dataset", required=True)
    p.add_argument("-p", dest="plans", default="nnUNetPlans")
    p.add_argument("-c", dest="configuration", default="3d_fullres")
    p.add_argument("checkpoints", nargs="+", help="checkpoint_latest.pth files (with training state) or 'init'")
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--patch", type=int, default=32)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    name = resolve_dataset_name(args.dataset)
    _, pm, cm, _ = load_plans(name, args.plans, args.configuration)
    folder = os.path.join(os.environ["nnUNet_preprocessed"], name, cm.data_identifier)
    x = centre_crops(folder, args.cases, args.patch)
    print(f"{len(x)} cases, crops {args.patch}^3; entropies as a fraction of ln K")
    print("| checkpoint | step | network | cos(CLS) | cos(z) | logit sd | SK entropy | softmax entropy |")
    print("|---|---|---|---|---|---|---|---|")
    for path in args.checkpoints:
        ckpt = load_checkpoint(path) if path != "init" else None
        # the run's own settings (queue sizes, head widths); defaults for ``init``
        cfg = PretrainConfig.from_dict(ckpt["metadata"]["settings"]) if ckpt is not None else PretrainConfig()
        objective = AliceObjective(build_planned_network(pm, cm, x.shape[1]), cfg, Schedules.from_config(cfg, 2))
        step = 0
        if ckpt is not None:
            objective.network.load_state_dict(ckpt["network_weights"])       # the student network
            missing = objective.load_state_dict(ckpt["training_state"]["objective"], strict=False).missing_keys
            # the student network comes from network_weights; a loss queue a setting did not have is not read here
            assert all(k.startswith(("student.network.", "koleo.")) or "_loss.queue" in k for k in missing), missing[:3]
            step = ckpt["training_state"]["step"]
        objective.eval()
        student, teacher = objective.student, getattr(objective.teacher, "module", objective.teacher)
        rows = [("student", spread(student, x, cfg.teacher_temp)), ("teacher", spread(teacher, x, cfg.teacher_temp))]
        if cfg.masking == "spark":                     # the views the student is trained on: 75 % of blocks masked
            mask = torch.from_numpy(batch_block_masks(len(x), list(x.shape[2:]), cfg.mask_block_size, cfg.mask_ratio,
                                                      np.random.default_rng(0))).float()
            mask = mask if mask.dim() == x.dim() else mask.unsqueeze(1)
            rows.insert(1, ("student, masked views", spread(student, x, cfg.teacher_temp, (objective.mim, mask))))
        # the student's standardisation statistics come from masked views, the teacher's from whole ones
        student.cls_pool.running_mean.copy_(teacher.cls_pool.running_mean)
        student.cls_pool.running_var.copy_(teacher.cls_pool.running_var)
        rows.append(("student, teacher's CLS statistics", spread(student, x, cfg.teacher_temp)))
        for role, s in rows:
            print(f"| {os.path.basename(path)} | {step} | {role} | {s['cos_cls']:.3f} | {s['cos_z']:.3f} | "
                  f"{s['logit_sd']:.4f} | {s['sk_entropy']:.2f} | {s['softmax_entropy']:.2f} |")


if __name__ == "__main__":
    main()
