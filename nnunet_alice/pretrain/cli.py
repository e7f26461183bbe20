"""``alice_pretrain``: Alice self-supervised pretraining of the network nnU-Net planned for a dataset.

Follows nnU-Net's CLI conventions (``-d`` as ID or name, ``-c``, ``-p``, ``-device``, ``--continue``).
Multi-GPU: ``torchrun --nproc_per_node N $(which alice_pretrain) ...`` (the batch size is global).
"""
from __future__ import annotations

import argparse
from typing import List, Optional

from nnunet_alice.errors import AliceError, cli_main
from nnunet_alice.pretrain.config import (CASA_TARGETS, CENTERINGS, CLS_POOLS, CLS_STUDENT_VIEWS, MASKINGS, MATCHERS,
                                          OBJECTIVES, RECON_REGIONS, PretrainConfig)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` for options that take a value; not for switches or unset (``None``) defaults."""

    def _get_help_string(self, action):
        if action.nargs == 0 or action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alice_pretrain", description=__doc__, formatter_class=DefaultsHelpFormatter)
    d = PretrainConfig()
    p.add_argument("-d", dest="dataset", required=True, help="dataset ID or name (e.g. 501 or Dataset501_X)")
    p.add_argument("-c", dest="configuration", default=d.configuration, help="nnU-Net configuration (3D)")
    p.add_argument("-p", dest="plans", default=d.plans, help="plans identifier")
    p.add_argument("-device", dest="device", default=d.device, choices=["cpu", "cuda"])
    p.add_argument("--continue", dest="resume", action="store_true", help="resume from checkpoint_latest.pth")
    p.add_argument("--allow-settings-change", action="store_true",
                   help="with --continue: accept settings that change the computation (refused otherwise) and "
                        "record the change in the checkpoint (docs/resume.md)")
    p.add_argument("--estimate", type=int, nargs="?", const=3, metavar="N",
                   help="time N steps (default 3) after a warm-up, print step time, volumes/s, peak memory and the "
                        "projected wall time / GPU-hours of the requested run, and exit without writing anything")
    p.add_argument("--unlabeled", action="append", default=[], metavar="DIR",
                   help="extra raw images (nnU-Net naming <case>_0000<ending>); repeatable")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, help="total optimisation steps")
    g.add_argument("--epochs", type=int, help="epochs of --iterations-per-epoch steps (default 100)")
    p.add_argument("--iterations-per-epoch", type=int, default=d.iterations_per_epoch)
    p.add_argument("--batch-size", type=int, help="global batch size (default: the plan's)")
    p.add_argument("--patch-size", type=int, nargs=3, help="override the plan's patch size (must fit the network)")

    o = p.add_argument_group("objective (Alice, Jiang et al. ICCV 2023)")
    o.add_argument("--objective", choices=OBJECTIVES, default=d.objective)
    o.add_argument("--matcher", choices=MATCHERS, default=d.matcher, help="how key views are mined")
    o.add_argument("--no-cls", dest="use_cls", action="store_false", help="drop the DINO CLS term")
    casa = o.add_mutually_exclusive_group()
    casa.add_argument("--casa", dest="use_casa", action="store_true", default=d.use_casa,
                      help="add the CASA alignment term, the paper's third term (off by default: it cost probe Dice "
                           "on the demo, docs/results.md)")
    casa.add_argument("--no-casa", dest="use_casa", action="store_false", default=d.use_casa,
                      help="without CASA (the default)")
    o.add_argument("--no-recon", dest="use_recon", action="store_false", help="drop masked reconstruction")
    o.add_argument("--casa-target", choices=CASA_TARGETS, default=d.casa_target)
    o.add_argument("--lambda-cls", type=float, default=d.lambda_cls)
    o.add_argument("--lambda-casa", type=float, default=d.lambda_casa)
    o.add_argument("--lambda-recon", type=float, default=d.lambda_recon)
    o.add_argument("--recon-region", choices=RECON_REGIONS, default=d.recon_region)
    o.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no view augmentation (the official code's behaviour)")
    o.add_argument("--mask-ratio", type=float, default=d.mask_ratio)
    o.add_argument("--mask-block-size", type=int, default=d.mask_block_size, help="mask block edge in voxels")
    o.add_argument("--masking", choices=MASKINGS, default=d.masking,
                   help="spark: masked blocks stay empty through the encoder (re-masked convs, visible-only norm "
                        "statistics) and are filled by mask tokens + densify convs before the decoder; "
                        "zero: zero-filled input through the dense network")
    o.add_argument("--recon-norm-target", action="store_true",
                   help="reconstruct the target standardised within each mask block")
    o.add_argument("--match-threshold", type=float, default=d.match_threshold,
                   help="accept a match scoring at least this (registration: local NCC; embedding: mean cosine)")
    o.add_argument("--intra-jitter", type=float, default=d.intra_jitter,
                   help="intra matcher: shift of the key view's centre, as a fraction of the patch size")
    o.add_argument("--match-tries", type=int, default=d.match_tries,
                   help="query points tried per sample before falling back to the same volume (intra)")
    o.add_argument("--teacher-temp", type=float, default=d.teacher_temp)
    o.add_argument("--warmup-teacher-temp", type=float, default=d.warmup_teacher_temp)
    o.add_argument("--student-temp", type=float, default=d.student_temp)
    o.add_argument("--momentum-teacher", type=float, default=d.momentum_teacher)
    o.add_argument("--head-out-dim", type=int, default=d.head_out_dim, help="prototypes K")
    o.add_argument("--head-hidden-dim", type=int, default=d.head_hidden_dim)
    o.add_argument("--head-bottleneck-dim", type=int, default=d.head_bottleneck_dim)
    o.add_argument("--centering", choices=CENTERINGS, default=d.centering,
                   help="teacher targets: sinkhorn (Sinkhorn-Knopp, stable at batch 2-8) or center (DINO)")
    o.add_argument("--sinkhorn-iterations", type=int, default=d.sinkhorn_iterations)
    o.add_argument("--cls-queue-size", type=int, default=d.cls_queue_size,
                   help="past CLS teacher rows included in the Sinkhorn-Knopp normalisation (0: none); with fewer "
                        "rows than prototypes no target can be sharper than ln(K / rows)")
    o.add_argument("--casa-queue-size", type=int, default=d.casa_queue_size,
                   help="the same for the CASA token targets (0: none)")
    o.add_argument("--center-momentum", type=float, default=d.center_momentum)
    o.add_argument("--koleo-weight", type=float, default=d.koleo_weight,
                   help="KoLeo spread of the student's CLS embeddings against a memory of earlier ones (0: off)")
    o.add_argument("--koleo-memory", type=int, default=d.koleo_memory)
    o.add_argument("--cls-pool", choices=CLS_POOLS, default=d.cls_pool,
                   help="CLS vector: bottleneck output tokens through a per-token MLP, standardised (mlp); the same "
                        "on the conv output before the bottleneck's norm (prenorm_mlp) or averaged (prenorm_mean); "
                        "mean: plain pool of the bottleneck output")
    o.add_argument("--cls-student-view", choices=CLS_STUDENT_VIEWS, default=d.cls_student_view,
                   help="the student's CLS comes from one more encoder pass on its views unmasked (default; one "
                        "more encoder forward and backward per step) or from its masked views (the paper's)")
    o.add_argument("--warmup-teacher-temp-fraction", type=float, default=d.warmup_teacher_temp_fraction)
    o.add_argument("--warmup-teacher-temp-min-steps", type=int, default=d.warmup_teacher_temp_min_steps)
    o.add_argument("--freeze-last-layer-fraction", type=float, default=d.freeze_last_layer_fraction)
    o.add_argument("--freeze-last-layer-min-steps", type=int, default=d.freeze_last_layer_min_steps)

    t = p.add_argument_group("optimisation")
    t.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    t.add_argument("--min-lr", type=float, default=d.min_lr)
    t.add_argument("--warmup-fraction", type=float, default=d.warmup_fraction)
    t.add_argument("--warmup-min-steps", type=int, default=d.warmup_min_steps,
                   help="LR warm-up floor in steps (capped at half the run)")
    t.add_argument("--weight-decay", type=float, default=d.weight_decay)
    t.add_argument("--weight-decay-end", type=float, default=d.weight_decay_end)
    t.add_argument("--grad-clip", type=float, default=d.grad_clip)
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--init-weights", metavar="FILE", help="start from these initial weights (every tensor but the "
                   "output layers), e.g. the draw a from-scratch baseline starts from (alice_benchmark writes them)")
    t.add_argument("--num-workers", type=int, help="data workers (default: $nnUNet_n_proc_DA or CPUs-1)")
    t.add_argument("--data-timeout", type=float, default=d.data_timeout,
                   help="stop with an error when no batch arrives for this many seconds")
    t.add_argument("--compile", action="store_true", help="torch.compile the network (CUDA only)")
    t.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoint_latest.pth")
    t.add_argument("--log-every", type=int, default=d.log_every)
    return p


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    from nnunet_alice.pretrain.data.cases import resolve_dataset_name

    values = {k: v for k, v in vars(args).items() if k not in ("dataset", "resume", "allow_settings_change")}
    values["dataset_name"] = resolve_dataset_name(args.dataset)
    values["unlabeled"] = list(args.unlabeled)
    return PretrainConfig.from_dict(values).validate()


@cli_main
def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    if args.estimate is not None:
        from nnunet_alice.pretrain.estimate import run_estimate
        run_estimate(config, steps=args.estimate)
        return
    from nnunet_alice.pretrain.training.run import PretrainRun

    try:
        PretrainRun(config, resume=args.resume, allow_settings_change=args.allow_settings_change).run()
    except AliceError:
        raise
    finally:
        from nnunet_alice.pretrain.training import distributed as dist_utils
        import torch.distributed as dist
        if dist_utils.world_size() > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
