"""Does the CLS vector tell volumes apart at initialisation? (docs/method.md, "The CLS vector")

For each CLS pooling (``--cls-pool``) and network type (PlainConvUNet, ResidualEncoderUNet, nnU-Net's He
initialisation), over 8 crops of the MNI152 template (nilearn's bundled copy; 8 other crops set the
standardisation): the mean pairwise cosine of the CLS vectors the head receives, of the head's normalised
bottleneck z, and the teacher's target entropy / ln K at step 0 for Sinkhorn-Knopp and DINO centring at two
teacher temperatures. Also the cosine between a crop and the same crop shifted by 4 voxels with noise (a
positive pair) against that between different crops.

    python -m benchmarks.cls_init [--patch 48] [--features 8 16 32 64 64]
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from nnunet_alice.pretrain.config import CLS_POOLS, PretrainConfig
from nnunet_alice.pretrain.objectives.losses import probs_entropy, sinkhorn_knopp
from nnunet_alice.pretrain.objectives.alice import AliceStudent


def mni_crops(n: int, size: int, rng: np.random.Generator, shift: int = 4):
    from nilearn.datasets import load_mni152_template

    img = load_mni152_template(resolution=1).get_fdata().astype(np.float32)
    fg = img > 0.2 * img.max()
    img = (img - img[fg].mean()) / img[fg].std()
    idx = np.argwhere(fg)
    a, b = [], []
    while len(a) < n:
        lo = idx[rng.integers(len(idx))] - size // 2
        if (lo - shift < 0).any() or (lo + size + shift > np.array(img.shape)).any():
            continue
        a.append(img[tuple(slice(l0, l0 + size) for l0 in lo)])
        lo2 = lo + rng.integers(-shift, shift + 1, 3)
        b.append(img[tuple(slice(l0, l0 + size) for l0 in lo2)] + rng.normal(0, 0.1, (size,) * 3))
    as_tensor = lambda xs: torch.from_numpy(np.stack(xs)[:, None].astype(np.float32))  # noqa: E731
    return as_tensor(a), as_tensor(b)


def build(kind: str, features, seed: int = 0) -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He

    torch.manual_seed(seed)
    n = len(features)
    kw = dict(conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
              nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    strides = [1] + [2] * (n - 1)
    if kind == "PlainConvUNet":
        net = PlainConvUNet(1, n, features, nn.Conv3d, 3, strides, 2, 1, [2] * (n - 1), **kw)
    else:
        net = ResidualEncoderUNet(1, n, features, nn.Conv3d, 3, strides, [1, 3, 4, 6, 6, 6][:n], 1, [1] * (n - 1),
                                  **kw)
    net.apply(InitWeights_He(1e-2))
    return net.eval()


def mean_cos(v: torch.Tensor) -> float:
    v = F.normalize(v.float(), dim=-1)
    c = v @ v.t()
    return float((c.sum() - len(c)) / (len(c) * (len(c) - 1)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patch", type=int, default=48)
    p.add_argument("--features", type=int, nargs="+", default=[8, 16, 32, 64, 64])
    args = p.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    calib, _ = mni_crops(8, args.patch, rng)
    xa, xb = mni_crops(8, args.patch, rng)
    k = 512
    print(f"patch {args.patch}^3, features {args.features}, K = {k}; entropies as a fraction of ln K")
    print("| network | --cls-pool | cos(CLS) | cos(z) | positive-pair cos | SK 0.008 | centre 0.008 | SK 0.04 "
          "| centre 0.04 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind in ("PlainConvUNet", "ResidualEncoderUNet"):
        for mode in CLS_POOLS:
            cfg = PretrainConfig(cls_pool=mode)
            torch.manual_seed(1)
            model = AliceStudent(build(kind, args.features), cfg).eval()
            seen = []
            model.head.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
            with torch.no_grad():
                model.encode(calib, need_tokens=False)
                out = model.encode(torch.cat([xa, xb]), need_tokens=False)
            v, logits = seen[-1], out["cls"].float()
            va, vb = v[:8], v[8:]
            with torch.no_grad():
                z = F.normalize(model.head.mlp(va), dim=-1)
            cells = []
            for temp in (0.008, 0.04):
                rows = logits[:8]
                cells.append(float(probs_entropy(sinkhorn_knopp(rows, temp, 3))) / math.log(k))
                cells.append(float(probs_entropy(F.softmax(rows / temp, dim=-1))) / math.log(k))
            print(f"| {kind} | {mode} | {mean_cos(va):.3f} | {mean_cos(z):.3f} | "
                  f"{float(F.cosine_similarity(va, vb).mean()):.3f} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
