"""Pretraining step time (MAE objective) vs an nnU-Net training step, same plans, patch and batch, one process.

Both sides run their real step function on the network nnU-Net planned:

* Alice: ``nnunet_alice.pretrain.training.step.train_step`` with ``MaeObjective`` (masked input → planned U-Net with a
  reconstruction head → MSE), AdamW, gradient clipping; batches from ``ViewSampler.make_batch`` (real
  preprocessed cases, per-sample block masks);
* nnU-Net: ``nnUNetTrainer.train_step`` on a trainer instantiated directly (fold ``all``), i.e. deep
  supervision, Dice+CE, SGD; batches from the trainer's own training dataloader.

Batches are produced before timing (a few per side, reused cyclically), so only forward, backward and the
optimiser step are timed. The two steps alternate (A, B, A, B, ...) so that load changes on a shared machine
hit both alike; the first ``--warmup`` iterations of each are dropped. Prints the median ms/step of each and the
ratio pretrain / nnU-Net (expected ≈ 1: same network, one forward/backward each).

    python -m benchmarks.step_time -d 987 [-c 3d_fullres] [-p nnUNetPlans] [--steps 20] [--device cpu]

Needs ``nnUNet_preprocessed`` (plans + preprocessed data). ``nnUNet_results`` is pointed at a temporary folder
(the nnU-Net trainer creates its output folder and log there on construction) and ``nnUNet_n_proc_DA=0``.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

from benchmarks.common import sync


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-d", dest="dataset", required=True, help="dataset ID or name")
    p.add_argument("-c", dest="configuration", default="3d_fullres")
    p.add_argument("-p", dest="plans", default="nnUNetPlans")
    p.add_argument("--steps", type=int, default=20, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side before --steps")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: all CPUs, as -device cpu does)")
    p.add_argument("--distinct-batches", type=int, default=4, help="batches prepared per side, reused cyclically")
    return p.parse_args(argv)


def alice_side(data, device, n_batches):
    """Return ``step(i)`` running one MAE pretraining step on the planned network."""
    import torch

    from nnunet_alice.pretrain.config import PretrainConfig
    from nnunet_alice.pretrain.training.step import parameter_groups, train_step
    from nnunet_alice.pretrain.model import build_planned_network
    from nnunet_alice.pretrain.objectives.mae import MaeObjective
    from nnunet_alice.pretrain.data.views import ViewSampler

    cm = data.configuration_manager
    patch, batch_size = [int(p) for p in cm.patch_size], int(cm.batch_size)
    cfg = PretrainConfig(dataset_name=data.dataset_name, plans=data.plans_name, configuration=data.configuration,
                         objective="mae", device=device.type, patch_size=patch, batch_size=batch_size).validate()
    network = build_planned_network(data.plans_manager, cm, data.num_input_channels)
    objective = MaeObjective(network, cfg).to(device).train()
    optimizer = torch.optim.AdamW(parameter_groups(objective.student_modules()), lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    sampler = ViewSampler(data, cfg, patch, batch_size)
    batches = [sampler.make_batch(i) for i in range(n_batches)]
    autocast = torch.bfloat16 if device.type == "cuda" else None  # as PretrainRun does

    def step(i):
        train_step(objective, objective, optimizer, batches[i % n_batches], i, cfg.lr, cfg.weight_decay,
                   cfg.grad_clip, device, autocast)

    n_params = sum(p.numel() for p in network.parameters())
    return step, {"patch": patch, "batch": batch_size, "network": type(network).__name__, "params": n_params,
                  "input": tuple(batches[0]["student_q"].shape)}


def nnunet_side(dataset_name, plans_name, configuration, device, n_batches):
    """Return ``step(i)`` running ``nnUNetTrainer.train_step`` on a directly instantiated trainer."""
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    root = join(os.environ["nnUNet_preprocessed"], dataset_name)
    plans = load_json(join(root, plans_name + ".json"))
    plans["continue_training"] = False  # nnunetv2 >= 2.7 pops this key in the constructor
    trainer = nnUNetTrainer(plans, configuration, "all", load_json(join(root, "dataset.json")), device)
    trainer.initialize()
    loader_train, loader_val = trainer.get_dataloaders()
    batches = [next(loader_train) for _ in range(n_batches)]
    for loader in (loader_train, loader_val):
        if hasattr(loader, "close"):  # nnUNet_n_proc_DA=0 gives a SingleThreadedAugmenter: nothing to close
            loader.close()
    trainer.network.train()

    def step(i):
        trainer.train_step(batches[i % n_batches])

    data = batches[0]["data"]
    return step, {"patch": list(trainer.configuration_manager.patch_size), "batch": int(trainer.batch_size),
                  "network": type(trainer.network).__name__, "input": tuple(data.shape),
                  "params": sum(p.numel() for p in trainer.network.parameters())}


def main(argv=None) -> None:
    args = parse_args(argv)
    results = tempfile.mkdtemp(prefix="alice_bench_results_")
    os.environ["nnUNet_results"] = results
    try:
        run(args)
    finally:
        shutil.rmtree(results, ignore_errors=True)


def run(args) -> None:
    os.environ["nnUNet_n_proc_DA"] = "0"
    os.environ.setdefault("nnUNet_compile", "0")  # the pretraining side is not compiled either

    import torch

    from nnunet_alice.pretrain.data.cases import PretrainData, resolve_dataset_name

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))  # all CPUs: what -device cpu does
    elif not torch.cuda.is_available():
        sys.exit("error: --device cuda requested but no CUDA device is available")
    else:
        torch.backends.cudnn.benchmark = True  # as nnUNetv2_train sets it
    torch.manual_seed(0)
    name = resolve_dataset_name(args.dataset)
    data = PretrainData(name, args.plans, args.configuration)
    n = max(1, args.distinct_batches)
    alice_step, a_info = alice_side(data, device, n)
    nnunet_step, b_info = nnunet_side(name, args.plans, args.configuration, device, n)
    assert a_info["patch"] == b_info["patch"] and a_info["batch"] == b_info["batch"], (a_info, b_info)

    times = {"alice": [], "nnunet": []}
    for i in range(args.warmup + args.steps):
        for key, step in (("alice", alice_step), ("nnunet", nnunet_step)):
            sync(device)
            t0 = time.perf_counter()
            step(i)
            sync(device)
            if i >= args.warmup:
                times[key].append((time.perf_counter() - t0) * 1000)

    def summary(ms):
        q = statistics.quantiles(ms, n=10) if len(ms) >= 2 else [ms[0]] * 9
        return f"median {statistics.median(ms):9.1f}  p10 {q[0]:9.1f}  p90 {q[-1]:9.1f}"

    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}"
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    print(f"{name} {args.plans} {args.configuration}: {a_info['network']} ({a_info['params'] / 1e6:.2f} M params), "
          f"patch {a_info['patch']}, batch {a_info['batch']}")
    print(f"device {device} ({dev}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {load[0]:.2f}; {args.warmup} warm-up + {args.steps} timed steps each")
    print(f"alice_pretrain MAE train_step   ms/step: {summary(times['alice'])}")
    print(f"nnUNetTrainer   train_step      ms/step: {summary(times['nnunet'])}")
    ratio = statistics.median(times["alice"]) / statistics.median(times["nnunet"])
    print(f"ratio pretrain / nnU-Net (medians): {ratio:.2f}")


if __name__ == "__main__":
    main()
