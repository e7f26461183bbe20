"""Speed and memory of one Alice step vs. one MAE step vs. one nnU-Net training step (docs/gpu.md).

Same planned network, same per-view batch ``B``, measured side by side in one run:

* ``nnunet``: the planned network with deep supervision, nnU-Net's ``DC_and_CE_loss`` in its
  ``DeepSupervisionWrapper`` (weights as ``nnUNetTrainer._build_loss``), SGD (lr 1e-2, momentum 0.99, Nesterov,
  wd 3e-5), gradient clipping at 12; on CUDA autocast with nnU-Net's own AMP (float16 + ``GradScaler``;
  ``--nnunet-amp bf16`` switches to bfloat16 without a scaler);
* ``mae``: :class:`MaeObjective` through :func:`nnunet_alice.pretrain.training.step.train_step` (AdamW, bf16 on CUDA);
* ``alice``: :class:`AliceObjective` (default head 2048/256/512, CASA on) through the same ``train_step``:
  student on 2·B masked views, EMA teacher on 2·B views.

Each mode: median ms/step after ``--warmup`` steps, volumes/s (= B / step time; for Alice a "volume" is one
query/key pair, as in the run log), peak memory (CUDA: ``torch.cuda.max_memory_allocated``, reset between modes;
CPU: peak RSS, ``VmHWM``, of a fresh process per mode, shown above that process's RSS after imports, i.e.
without the interpreter and libraries, ~0.3-0.5 GiB). Inputs are synthetic tensors kept on the host (pinned on CUDA) and
copied in each step, as a loader's would be.

View sampling (``--sampling``): ``ViewSampler.make_batch`` cost per batch on one CPU thread (= one data worker) for
the same patch and batch, on a preprocessed dataset (``--sampling-dataset``, needs ``nnUNet_preprocessed``) or on
synthetic in-memory volumes of the plan's median shape (``--sampling-synthetic``).

The network comes from the plans JSON alone (``PlansManager`` + ``build_planned_network``, i.e. nnU-Net's own
``get_network_from_plans``); no dataset or preprocessing is needed for the step timings. The measurements live in
``benchmarks/speed.py`` and ``benchmarks/sampling.py``; this module is the command line.

Example (CPU, small patch; from the repository root)::

    python -m benchmarks.alice_speed --plans nnUNetResEncUNetMPlans.json --dataset-json dataset.json \
        --device cpu --batch-size 2 --patch-size 64 64 64 --steps 3 --warmup 1
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, Optional

import torch

from benchmarks.common import Plan
from benchmarks.sampling import pipeline_runs, run_sampling_isolated, sampling_data
from benchmarks.speed import (MODES, default_workers, format_pipeline, format_ratios, format_table, ratios,
                              run_mode_isolated, run_mode_safely)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--plans", required=True, help="plans JSON (e.g. nnUNetResEncUNetMPlans.json)")
    p.add_argument("--configuration", default="3d_fullres")
    p.add_argument("--dataset-json", help="dataset.json (channel count, number of labels)")
    p.add_argument("--channels", type=int, help="input channels (overrides --dataset-json)")
    p.add_argument("--num-classes", type=int, help="segmentation classes for the nnU-Net step (default from labels)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--batch-size", type=int, help="per-view batch (default: the plan's)")
    p.add_argument("--patch-size", type=int, nargs=3, help="default: the plan's patch")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--compile", action="store_true", help="torch.compile the networks")
    p.add_argument("--nnunet-amp", choices=("fp16", "bf16"), default="fp16",
                   help="CUDA autocast of the nnU-Net step (nnU-Net 2.8 uses fp16 + GradScaler)")
    p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                   help="one fresh process per mode (auto: on CPU, where peak RSS is the only memory measure)")
    p.add_argument("--sampling-dataset", help="preprocessed dataset name/id for the view-sampling timing")
    p.add_argument("--sampling-plans", help="plans identifier of that dataset (default: --plans' name)")
    p.add_argument("--sampling-synthetic", action="store_true",
                   help="time view sampling on synthetic in-memory volumes of the plan's median shape")
    p.add_argument("--sampling-batches", type=int, default=10)
    p.add_argument("--sampling-noaug", action="store_true",
                   help="also time Alice view sampling without augmentation (crops + matching + masks only)")
    p.add_argument("--pipeline-workers", default="",
                   help="comma-separated worker counts: time Alice steps fed by the real loader (synthetic volumes "
                        "unless --sampling-dataset)")
    p.add_argument("--pipeline-steps", type=int, default=12)
    p.add_argument("--matcher", default="intra")
    p.add_argument("--workers", type=int, help="data workers for the sampling share (default: the runner's default)")
    p.add_argument("--threads", type=int, help="torch CPU threads for the step timings")
    p.add_argument("--json-out", help="write all results here")
    return p.parse_args(argv)


class Results:
    """Everything one run measured, written to ``--json-out`` after each part, so that a run stopped by a time
    limit still leaves what it finished (``"partial": true`` until the end)."""

    def __init__(self, path: Optional[str], info: dict):
        self.path, self.info = path, info
        self.results: Dict[str, dict] = {}
        self.sampling: Optional[Dict[str, dict]] = None
        self.pipeline: Optional[Dict[str, dict]] = None

    def as_dict(self) -> dict:
        return {"info": self.info, "results": self.results, "sampling": self.sampling, "pipeline": self.pipeline}

    def dump(self, final: Optional[dict] = None) -> None:
        if self.path:
            out = {**self.as_dict(), **final} if final is not None else {**self.as_dict(), "partial": True}
            with open(self.path, "w") as f:
                json.dump(out, f, indent=1, default=float)


def run_steps(args, plan: Plan, device: torch.device, batch: int, patch, out: Results) -> None:
    """The step modes of ``--modes``, each in a fresh process with ``--isolate`` (default on the CPU)."""
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    isolate = args.isolate == "yes" or (args.isolate == "auto" and device.type == "cpu")
    for mode in modes:
        if isolate:
            out.results[mode] = run_mode_isolated(mode, plan, device, batch, patch, args.steps, args.warmup,
                                                  args.compile, args.nnunet_amp, threads=args.threads)
        else:
            out.results[mode] = run_mode_safely(mode, plan, device, batch, patch, args.steps, args.warmup,
                                                args.compile, args.nnunet_amp, log=lambda s: print(s, flush=True))
        out.dump()


def run_data_side(args, plan: Plan, device: torch.device, batch: int, patch, out: Results) -> None:
    """View sampling (one-thread child process) and loader-fed Alice steps, when asked for."""
    if args.sampling_dataset or args.sampling_synthetic:
        out.sampling = run_sampling_isolated(plan, patch, batch, args.sampling_batches, args.matcher,
                                             args.sampling_noaug, args.sampling_dataset, args.sampling_plans)
        out.dump()
    workers = [int(x) for x in args.pipeline_workers.split(",") if x.strip()]
    if workers:
        data, _ = sampling_data(plan, args.sampling_dataset, args.sampling_plans)
        out.pipeline = {}

        def keep(partial):
            out.pipeline = partial
            out.dump()

        pipeline_runs(plan, device, batch, patch, data, workers, args.pipeline_steps, args.warmup, args.matcher,
                      log=lambda s: print(s, flush=True), on_result=keep)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnU-Net
    plan = Plan(args.plans, args.configuration, args.dataset_json, args.channels, args.num_classes)
    batch = args.batch_size or plan.batch_size
    patch = list(args.patch_size or plan.patch_size)
    info = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
            "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "plan": plan.describe(), "batch": batch, "patch": patch, "steps": args.steps, "warmup": args.warmup}
    print(f"alice_speed: {info['plan']['plans']} {args.configuration} ({info['plan']['arch']}), patch {patch}, "
          f"per-view batch {batch}, device {info['device_name']}, torch {torch.__version__}, "
          f"{info['threads']} threads, {args.warmup} warm-up + {args.steps} timed steps", flush=True)
    out = Results(args.json_out, info)
    run_steps(args, plan, device, batch, patch, out)
    run_data_side(args, plan, device, batch, patch, out)
    rat = ratios(out.results, out.sampling, args.workers or default_workers())
    print()
    print(format_table(out.results, out.sampling))
    print()
    print(format_ratios(rat))
    if format_pipeline(out.pipeline):
        print(format_pipeline(out.pipeline))
    out.dump({"ratios": rat})
    return {**out.as_dict(), "ratios": rat}


if __name__ == "__main__":
    main()
