"""Effective rank of the features a short MAE pretraining leaves behind: SparK-style vs zero masking.

For each arm a small planned U-Net (the plan's architecture with ``--features`` per stage) is trained for
``--steps`` MAE steps on the dataset's views (``ViewSampler``, the package defaults otherwise), then features of
un-augmented, unmasked crops are read at the stem (first encoder stage), the bottleneck and the last decoder stage.
Effective rank (Roy & Vetterli, EUSIPCO 2007): exp of the entropy of the normalised singular values of the centred
voxels × channels matrix; a feature map that uses all C channels independently scores C. Reported over all
evaluation crops together (``all_crops``) and as the mean over single crops (``per_crop``).

Arms: ``old`` (zero masking, reconstruction through the network's segmentation layer, the student view as
target: the earlier behaviour), ``zero`` (zero masking, separate head, clean target), ``spark`` (the default).

    alice_demo_data -d 991 --num-train 4 --num-test 1 --num-unlabeled 4 --output $nnUNet_raw
    nnUNetv2_plan_and_preprocess -d 991 -c 3d_fullres -np 1
    python -m benchmarks.mim_rank -d 991 --steps 40 --seeds 0 1
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

FEATURES = (8, 16, 32, 64, 64)


def effective_rank(feat: torch.Tensor) -> float:
    x = feat.detach().double().movedim(1, -1).reshape(-1, feat.shape[1])
    x = x - x.mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(x)
    p = s / s.sum().clamp_min(1e-12)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def build_network(data, features, cls_name=None):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from nnunet_alice.pretrain.model import freeze_unused_output_layers

    arch = data.configuration_manager.network_arch_init_kwargs
    kw = dict(arch)
    n = min(len(features), int(kw["n_stages"]))
    kw["features_per_stage"] = list(features[:n])
    for k in ("kernel_sizes", "strides", "n_conv_per_stage", "n_blocks_per_stage"):
        if k in kw:
            kw[k] = list(kw[k])[:n]
    kw["n_stages"] = n
    if "n_conv_per_stage_decoder" in kw:
        kw["n_conv_per_stage_decoder"] = list(kw["n_conv_per_stage_decoder"])[:n - 1]
    name = cls_name or data.configuration_manager.network_arch_class_name
    c = data.num_input_channels
    net = get_network_from_plans(name, kw, data.configuration_manager.network_arch_init_kwargs_req_import, c, c,
                                 allow_init=True, deep_supervision=False)
    freeze_unused_output_layers(net)
    return net


class OldMae(torch.nn.Module):
    """The earlier objective: zero-masked input, the segmentation layer as head, the student view as target."""

    def __init__(self, network, config):
        super().__init__()
        self.network, self.config = network, config
        network.decoder.seg_layers[-1].requires_grad_(True)

    def student_modules(self):
        return {"network": self.network}

    def forward(self, batch, step):
        from nnunet_alice.pretrain.objectives.losses import reconstruction_loss

        x, mask = batch["student_q"], batch["mask_q"]
        rec = reconstruction_loss(self.network(x * (1 - mask)).float(), x, mask, "masked")
        return rec, {"recon": rec.detach()}

    def before_optimizer_step(self, step):
        pass

    def after_optimizer_step(self, step):
        pass


@torch.no_grad()
def ranks(network, crops):
    store, hooks = {}, []
    targets = {"stem": network.encoder.stages[0], "bottleneck": network.encoder.stages[-1],
               "last_decoder": network.decoder.stages[-1]}
    for k, m in targets.items():
        hooks.append(m.register_forward_hook(lambda mod, i, o, k=k: store.__setitem__(k, o)))
    network.eval()
    network(crops)
    network.train()
    for h in hooks:
        h.remove()
    pooled = {k: round(effective_rank(v), 2) for k, v in store.items()}
    per_crop = {k: round(float(np.mean([effective_rank(v[i:i + 1]) for i in range(v.shape[0])])), 2)
                for k, v in store.items()}
    return {"all_crops": pooled, "per_crop": per_crop}, {k: int(v.shape[1]) for k, v in store.items()}


def run_arm(arm, data, args, seed):
    from nnunet_alice.pretrain.config import PretrainConfig
    from nnunet_alice.pretrain.training.step import parameter_groups, train_step
    from nnunet_alice.pretrain.objectives.mae import MaeObjective
    from nnunet_alice.pretrain.training.schedules import Schedules
    from nnunet_alice.pretrain.data.views import ViewSampler

    patch = [args.patch] * 3
    cfg = PretrainConfig(dataset_name=data.dataset_name, objective="mae", steps=args.steps, patch_size=patch,
                         batch_size=args.batch, seed=seed, masking="zero" if arm in ("old", "zero") else "spark",
                         mask_block_size=args.block).validate()
    torch.manual_seed(seed)
    net = build_network(data, args.features, args.network)
    obj = OldMae(net, cfg) if arm == "old" else MaeObjective(net, cfg)
    eval_sampler = ViewSampler(data, PretrainConfig(objective="mae", augment=False, seed=999, mask_block_size=8),
                               patch, batch_size=4)
    crops = torch.cat([eval_sampler.make_batch(i)["student_q"] for i in range(2)])
    before, channels = ranks(net, crops)
    sampler = ViewSampler(data, cfg, patch, args.batch)
    sch = Schedules.from_config(cfg, cfg.total_steps())
    opt = torch.optim.AdamW(parameter_groups(obj.student_modules()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    t0, losses = time.perf_counter(), []
    for step in range(cfg.total_steps()):
        total, _ = train_step(obj, obj, opt, sampler.make_batch(step), step, float(sch.lr[step]),
                              float(sch.weight_decay[step]), cfg.grad_clip, torch.device("cpu"))
        losses.append(total)
    after, _ = ranks(net, crops)
    return {"arm": arm, "seed": seed, "channels": channels, "before": before, "after": after,
            "loss_first5": float(np.mean(losses[:5])), "loss_last5": float(np.mean(losses[-5:])),
            "seconds": round(time.perf_counter() - t0, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", dest="dataset", required=True)
    p.add_argument("-p", dest="plans", default="nnUNetPlans")
    p.add_argument("-c", dest="configuration", default="3d_fullres")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--patch", type=int, default=48)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--features", type=int, nargs="+", default=list(FEATURES))
    p.add_argument("--network", default=None, help="network class (default: the plan's)")
    p.add_argument("--arms", nargs="+", default=["old", "zero", "spark"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = p.parse_args()
    from nnunet_alice.pretrain.data.cases import PretrainData, resolve_dataset_name

    data = PretrainData(resolve_dataset_name(args.dataset), args.plans, args.configuration, [])
    for seed in args.seeds:
        for arm in args.arms:
            print(json.dumps(run_arm(arm, data, args, seed)), flush=True)


if __name__ == "__main__":
    main()
