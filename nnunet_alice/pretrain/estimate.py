"""``alice_pretrain ... --estimate [N]``: the cost of a pretraining run before spending it.

Builds exactly what the run would build (the planned network, the objective, the optimiser, the view sampler
behind the real data loader with the run's number of workers) on the chosen device, runs one warm-up step and
``N`` timed optimisation steps (default 3), and prints

* the step time (median of the timed steps, with the share spent waiting for data),
* volumes per second as the run log counts them (for Alice one "volume" is one query/key pair),
* peak memory: ``torch.cuda.max_memory_allocated`` over the steps on CUDA, the peak resident set size of the
  process on the CPU,
* the projected wall time of the requested run (``--steps`` or ``--epochs`` x ``--iterations-per-epoch``) and,
  on CUDA, its GPU-hours (wall time x number of processes),

then exits without writing a checkpoint, a log or the output folder. The last line is machine-readable
(``estimate: key=value ...``) for scripts that choose step counts from it. Start-up (imports, preprocessing of
``--unlabeled`` images, which is cached next to the preprocessed data, and loader start) is not part of the
projection.
"""
from __future__ import annotations

import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict

import torch

from nnunet_alice.errors import AliceError

DEFAULT_STEPS = 3
WARMUP_STEPS = 1


def _peak_rss_gib() -> float:
    """Peak resident set size of this process in GiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 30 if sys.platform == "darwin" else rss / 2 ** 20


def format_duration(seconds: float) -> str:
    """``1 h 44 min``, ``12 min 5 s`` or ``41.2 s``."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(round(seconds % 3600 / 60))} min"
    if seconds >= 60:
        return f"{int(seconds // 60)} min {int(round(seconds % 60))} s"
    return f"{seconds:.1f} s"


def time_steps(run, steps: int, warmup: int = WARMUP_STEPS) -> Dict[str, float]:
    """Run ``warmup + steps`` optimisation steps of ``run`` (a ``PretrainRun``) with its real loader; timings."""
    from nnunet_alice.pretrain.training.step import train_step
    from nnunet_alice.pretrain.data.views import make_loader

    cfg, sch, device = run.config, run.schedules, run.device
    kwargs = {"timeout": cfg.data_timeout} if getattr(cfg, "data_timeout", None) else {}
    loader = make_loader(run.sampler, run.num_workers, cfg.seed, **kwargs)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run.objective.train()
    step_s, data_s = [], []
    try:
        for i in range(warmup + steps):
            s = min(i, run.total_steps - 1)  # the schedules' values at the run's first steps
            t0 = time.perf_counter()
            batch = next(loader)
            t_data = time.perf_counter() - t0
            train_step(run.objective, run.ddp_objective, run.optimizer, batch, i, float(sch.lr[s]),
                       float(sch.weight_decay[s]), cfg.grad_clip, device, run.autocast_dtype, None)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                step_s.append(time.perf_counter() - t0)
                data_s.append(t_data)
    finally:
        for name in ("close", "_finish"):
            if hasattr(loader, name):
                getattr(loader, name)()
                break
    out = {"step_s": statistics.median(step_s), "step_min_s": min(step_s), "step_max_s": max(step_s),
           "data_s": statistics.median(data_s)}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2 ** 30
    else:
        out["peak_mem_gib"] = _peak_rss_gib()
    return out


def run_estimate(config, steps: int = DEFAULT_STEPS, echo: Callable[[str], None] = print) -> Dict[str, float]:
    """Build the run of ``config``, time ``steps`` steps after a warm-up, print the estimate; nothing is written."""
    if steps < 1:
        raise AliceError(f"--estimate takes the number of timed steps (>= 1), got {steps}")
    from nnunet_alice.pretrain.training import distributed as dist_utils
    from nnunet_alice.pretrain.training.run import PretrainRun

    # the run is built for a folder that is never created, so that neither the real output folder nor the lock
    # of a run that may be training in it right now is touched
    scratch = tempfile.mkdtemp(prefix="alice_estimate_")
    try:
        run = PretrainRun(config, resume=False, output_folder=os.path.join(scratch, "never_created"))
        t = time_steps(run, steps)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if dist_utils.world_size() > 1:
            torch.distributed.destroy_process_group()
    world, batch = run.world, config.batch_size
    vol_s = batch / t["step_s"]
    wall_s = run.total_steps * t["step_s"]
    gpu_h = wall_s / 3600 * world if run.device.type == "cuda" else 0.0
    result = {"objective": config.objective, "device": run.device.type, "steps_timed": steps, "step_s": t["step_s"],
              "data_s": t["data_s"], "vol_s": vol_s, "peak_mem_gib": t["peak_mem_gib"], "total_steps": run.total_steps,
              "wall_s": wall_s, "gpu_h": gpu_h, "batch": batch, "world": world}
    if not dist_utils.is_main_process():
        return result
    card = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "CPU"
    unit = " (query/key pairs)" if config.objective == "alice" else ""
    memory = (f"{t['peak_mem_gib']:.2f} GiB (CUDA max allocated; reserved {t['peak_reserved_gib']:.2f} GiB)"
              if run.device.type == "cuda" else f"{t['peak_mem_gib']:.2f} GiB (peak RSS of the main process)")
    cost = f"{run.total_steps} steps -> {format_duration(wall_s)} wall"
    if run.device.type == "cuda":
        cost += f", {gpu_h:.3f} GPU-hours ({world} GPU{'s' if world > 1 else ''})"
    echo(f"alice_pretrain --estimate: {config.objective} on {config.dataset_name} {config.plans} "
         f"{config.configuration}, {len(run.data.cases)} cases, patch {list(config.patch_size)}, batch {batch} "
         f"({world} process(es)), device {run.device} ({card}), {run.num_workers} data worker(s)")
    echo(f"  timed steps     {steps} after {WARMUP_STEPS} warm-up")
    echo(f"  step time       {t['step_s']:.4f} s (median; min {t['step_min_s']:.4f}, max {t['step_max_s']:.4f}; "
         f"waiting for data {t['data_s']:.4f} s)")
    echo(f"  volumes/s       {vol_s:.3f}{unit}")
    echo(f"  peak memory     {memory}")
    echo(f"  requested run   {cost} (start-up not included)")
    echo("  nothing written: no checkpoint, log or output folder")
    echo("estimate: " + " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in result.items()))
    return result
