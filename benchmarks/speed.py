"""One training step of nnU-Net, MAE or Alice on the same planned network, timed; the report of such a run.

The library behind ``python -m benchmarks.alice_speed`` and ``python -m benchmarks.gpu_check`` (docs/gpu.md):

* :func:`run_mode` builds one mode's model and optimiser and times ``warmup + steps`` steps on synthetic inputs;
  :func:`run_mode_isolated` does the same in a fresh process, so that the peak RSS is that mode's alone;
* :func:`ratios`, :func:`format_table` and :func:`format_ratios` turn the results into the targets of docs/gpu.md.
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from benchmarks.common import (Plan, PretrainParts, all_finite, count_params, current_rss_gib, format_terms, host,
                               in_child, peak_rss_gib, pretrain_config, synthetic_pretrain_batch, timed)

MODES = ("nnunet", "mae", "alice")

Stepper = Callable[[int], Tuple[float, Dict[str, float]]]


# ---------------------------------------------------------------------------------------------- one mode
def run_mode(mode: str, plan: Plan, device: torch.device, batch: int, patch: Sequence[int], steps: int,
             warmup: int, compile_: bool = False, nnunet_amp: str = "fp16", log=print) -> dict:
    """Build the mode's model and optimiser, run ``warmup + steps`` steps, return timings and memory.

    Memory: on CUDA the peak allocation above what was allocated before (the peak is reset first); always the
    process's peak RSS and that peak above the RSS at the start, which is the mode's own only when the mode
    runs in a process of its own (:func:`run_mode_isolated`).
    """
    torch.manual_seed(0)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base_alloc = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    base_rss = current_rss_gib()
    t_build = time.perf_counter()
    res: dict = {"mode": mode, "batch": batch, "patch": list(patch), "steps": steps, "warmup": warmup,
                 "compile": bool(compile_)}
    if mode == "nnunet":
        step_fn, extra = nnunet_stepper(plan, device, batch, patch, compile_, nnunet_amp)
    else:
        step_fn, extra = pretrain_stepper(mode, plan, device, batch, patch, warmup + steps, compile_)
    res.update(extra)
    res["build_s"] = round(time.perf_counter() - t_build, 3)
    res.update(_time_steps(mode, step_fn, device, batch, steps, warmup, log))
    if device.type == "cuda":
        res["peak_alloc_gib"] = (torch.cuda.max_memory_allocated(device) - base_alloc) / 2 ** 30
        res["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2 ** 30
    res["peak_rss_gib"] = peak_rss_gib()
    res["rss_before_gib"] = base_rss
    res["peak_rss_net_gib"] = res["peak_rss_gib"] - base_rss
    return res


def _time_steps(mode: str, step_fn: Stepper, device: torch.device, batch: int, steps: int, warmup: int,
                log) -> dict:
    """Median ms/step over the ``steps`` after ``warmup``, volumes/s, every step's losses."""
    times, warm_times, losses = [], [], []
    total = warmup + steps
    for i in range(total):
        (loss, terms), dt = timed(lambda: step_fn(i), device)
        losses.append({"step": i, "loss": loss, **terms})
        (times if i >= warmup else warm_times).append(dt)
        log(f"  [{mode}] step {i + 1}/{total}{' (warm-up)' if i < warmup else ''}: {dt * 1e3:.1f} ms, "
            + format_terms(loss, terms))
    med = statistics.median(times) if times else float("nan")
    return {"ms_per_step": med * 1e3, "ms_all": [round(t * 1e3, 2) for t in times],
            "vol_per_s": batch / med if times else float("nan"),
            "warmup_ms": [round(t * 1e3, 1) for t in warm_times], "losses": losses, "finite": all_finite(losses)}


def run_mode_safely(mode: str, plan: Plan, device: torch.device, batch: int, patch: Sequence[int], steps: int,
                    warmup: int, compile_: bool = False, nnunet_amp: str = "fp16", log=print) -> dict:
    """:func:`run_mode`, with a failure reported as ``{"error": ...}`` so that the next mode still runs."""
    try:
        return run_mode(mode, plan, device, batch, patch, steps, warmup, compile_, nnunet_amp, log=log)
    except Exception as e:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        error = f"{type(e).__name__}: {e}"
        log(f"  [{mode}] FAILED: {error}")
        return {"mode": mode, "batch": batch, "patch": list(patch), "error": error}
    finally:
        gc.collect()


def _mode_in_child(mode: str, plan_spec: dict, device: str, batch: int, patch: Sequence[int], steps: int,
                   warmup: int, compile_: bool, nnunet_amp: str) -> dict:
    """Body of :func:`run_mode_isolated`: runs in the child, rebuilds the plan there."""
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnU-Net
    return run_mode_safely(mode, Plan(**plan_spec), torch.device(device), batch, patch, steps, warmup, compile_,
                           nnunet_amp, log=lambda s: print(s, flush=True))


def run_mode_isolated(mode: str, plan: Plan, device: torch.device, batch: int, patch: Sequence[int], steps: int,
                      warmup: int, compile_: bool = False, nnunet_amp: str = "fp16",
                      threads: Optional[int] = None) -> dict:
    """:func:`run_mode_safely` in a fresh process: ``peak_rss_net_gib`` is then this mode's own memory."""
    try:
        return in_child(_mode_in_child, mode, plan.spec, device.type, batch, list(patch), steps, warmup,
                        compile_, nnunet_amp, threads=threads)
    except RuntimeError as e:
        print(f"  [{mode}] FAILED: {e}", flush=True)
        return {"mode": mode, "batch": batch, "patch": list(patch), "error": str(e)}


# ---------------------------------------------------------------------------------------------- the steps
def pretrain_stepper(mode: str, plan: Plan, device: torch.device, batch: int, patch: Sequence[int],
                     total_steps: int, compile_: bool) -> Tuple[Stepper, dict]:
    """MAE or Alice through ``train_step`` on one synthetic batch, copied to the device every step."""
    cfg = pretrain_config(mode, patch, batch, device.type, compile_)
    network = plan.pretrain_network()
    parts = PretrainParts(network, cfg, device, total_steps, compile_=compile_)
    extra = {"builder": plan.builder, "params_network": count_params(network),
             "params_trained": parts.params_trained,
             "autocast": "bf16" if device.type == "cuda" else "none (fp32)"}
    if compile_:
        extra["compile_how"] = parts.compile_how
    data = synthetic_pretrain_batch(mode, plan.channels, patch, batch, cfg, device)
    return (lambda i: parts.step(data, i)), extra


def nnunet_loss(plan: Plan, compile_: bool):
    """``nnUNetTrainer._build_loss``: Dice + CE in the deep-supervision wrapper, lowest output weighted 0."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss = DC_and_CE_loss({"batch_dice": plan.cm.batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    if compile_:  # as nnUNetTrainer with compile on (its default on CUDA): network and loss.dc
        loss.dc = torch.compile(loss.dc)
    weights = np.array([1 / (2 ** i) for i in range(len(plan.deep_supervision_scales()))])
    weights[-1] = 0
    return DeepSupervisionWrapper(loss, weights / weights.sum())


def nnunet_stepper(plan: Plan, device: torch.device, batch: int, patch: Sequence[int], compile_: bool,
                   amp: str) -> Tuple[Stepper, dict]:
    """``nnUNetTrainer.train_step``: SGD (Nesterov), clipping at 12, CUDA autocast (fp16 + GradScaler or bf16)."""
    network = plan.segmentation_network().to(device)
    network.train()
    loss = nnunet_loss(plan, compile_)
    scales = plan.deep_supervision_scales()
    run_net = torch.compile(network) if compile_ else network
    optimizer = torch.optim.SGD(network.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    use_amp = device.type == "cuda"
    amp_dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if use_amp and amp == "fp16" else None
    g = torch.Generator().manual_seed(0)
    data = host(torch.randn((batch, plan.channels, *patch), generator=g), device)
    target = [host(torch.randint(0, plan.num_classes, (batch, 1, *[int(round(p * s)) for p, s in zip(patch, sc)]),
                                 generator=g).float(), device) for sc in scales]

    def step(i):
        x = data.to(device, non_blocking=True)
        t = [y.to(device, non_blocking=True) for y in target]
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            value = loss(run_net(x), t)
        if scaler is not None:
            scaler.scale(value).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
            scaler.step(optimizer)
            scaler.update()
        else:
            value.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
            optimizer.step()
        return float(value.detach()), {}

    extra = {"builder": "get_network_from_plans (deep_supervision=True)", "params_network": count_params(network),
             "num_classes": plan.num_classes, "ds_outputs": len(scales),
             "autocast": ({"fp16": "fp16 + GradScaler (nnU-Net)", "bf16": "bf16"}[amp] if use_amp else "none (fp32)")}
    return step, extra


# ---------------------------------------------------------------------------------------------- report
def ratios(results: Dict[str, dict], sampling: Optional[Dict[str, dict]], workers: int) -> dict:
    """The three targets of docs/gpu.md: Alice vs 2 x MAE time, sampling share of a step, Alice vs nnU-Net memory."""
    out: dict = {}
    ok = {k: v for k, v in results.items() if "error" not in v}
    mae, alice, nn = ok.get("mae"), ok.get("alice"), ok.get("nnunet")
    sampling = {k: v for k, v in (sampling or {}).items() if "error" not in v}
    if mae and alice:
        out["alice_over_2mae_time"] = alice["ms_per_step"] / (2 * mae["ms_per_step"])
    if alice and nn:
        key = "peak_alloc_gib" if "peak_alloc_gib" in alice and "peak_alloc_gib" in nn else "peak_rss_net_gib"
        out["alice_over_nnunet_peak_mem"] = alice[key] / nn[key]
        out["peak_mem_measure"] = key
    if sampling and alice and "alice" in sampling:
        s = sampling["alice"]["ms_per_batch"]
        out["sampling_ms_per_batch_alice"] = s
        out["sampling_share_1_worker"] = s / (s + alice["ms_per_step"])
        out["workers"] = workers
        # with W workers in parallel one batch costs s / W of wall time; the step waits only if s / W > step
        out["sampling_share_workers"] = (s / workers) / alice["ms_per_step"]
        out["workers_needed_for_10pct"] = int(np.ceil(s / (0.10 * alice["ms_per_step"])))
    if sampling and mae and "mae" in sampling:
        out["sampling_ms_per_batch_mae"] = sampling["mae"]["ms_per_batch"]
    return out


def format_table(results: Dict[str, dict], sampling: Optional[Dict[str, dict]] = None) -> str:
    """A markdown table: one row per step mode, then one per sampling timing."""
    lines = ["| mode | batch | patch | ms/step (median) | vol/s | peak mem (GiB) | finite |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for mode in MODES:
        r = results.get(mode)
        if r:
            lines.append(_mode_row(mode, r))
    for k, s in (sampling or {}).items():
        if "error" in s:
            lines.append(f"| sampling {k} | | | error: {s['error'][:60]} | | | |")
        else:
            lines.append(f"| sampling {k} ({s['matcher']}, 1 thread, {len(s['ms_all'])} batches) | {s['batch']} | "
                         f"{'x'.join(map(str, s['patch']))} | {s['ms_per_batch']:.1f} ms/batch (mean; median "
                         f"{s['ms_median']:.1f}) | | | |")
    return "\n".join(lines)


def _mode_row(mode: str, r: dict) -> str:
    if "error" in r:
        return f"| {mode} | {r.get('batch')} | {r.get('patch')} | error: {r['error'][:60]} | | | |"
    mem = r.get("peak_alloc_gib")
    mem_s = (f"{mem:.2f} (CUDA alloc)" if mem is not None else
             f"{r['peak_rss_net_gib']:.2f} (RSS above {r['rss_before_gib']:.2f} at start)")
    return (f"| {mode} | {r['batch']} | {'x'.join(map(str, r['patch']))} | {r['ms_per_step']:.1f} | "
            f"{r['vol_per_s']:.2f} | {mem_s} | {r['finite']} |")


def format_ratios(r: dict) -> str:
    """The ratios of :func:`ratios` against their targets, one line each."""
    out = []
    if "alice_over_2mae_time" in r:
        v = r["alice_over_2mae_time"]
        out.append(f"Alice / (2 x MAE) step time: {v:.2f}  (target <= 1.3: {'met' if v <= 1.3 else 'NOT met'})")
    if "sampling_share_workers" in r:
        v = r["sampling_share_workers"]
        out.append(f"view sampling per batch {r['sampling_ms_per_batch_alice']:.0f} ms on 1 worker; share of a step "
                   f"with {r['workers']} worker(s): {100 * v:.1f} %  "
                   f"(target <= 10 %: {'met' if v <= 0.10 else 'NOT met'}; "
                   f"workers needed: {r['workers_needed_for_10pct']}; serial share with 1 worker "
                   f"{100 * r['sampling_share_1_worker']:.0f} %)")
    if "alice_over_nnunet_peak_mem" in r:
        v = r["alice_over_nnunet_peak_mem"]
        out.append(f"Alice / nnU-Net peak memory ({r['peak_mem_measure']}): {v:.2f}  "
                   f"(target <= 2.5: {'met' if v <= 2.5 else 'NOT met'})")
    return "\n".join(out)


def format_pipeline(pipeline: Optional[Dict[str, dict]]) -> str:
    """One line per worker count of the loader-fed Alice steps (failed counts left out)."""
    return "\n".join(f"Alice steps fed by the loader ({w} workers): {r['ms_per_step_with_data']:.0f} ms/step, "
                     f"waiting for data {r['ms_data_wait']:.1f} ms = {100 * r['data_wait_share']:.1f} % of a step"
                     for w, r in (pipeline or {}).items() if "error" not in r)


def default_workers() -> int:
    """The data workers ``alice_pretrain`` would start here (at least 1)."""
    from nnunet_alice.pretrain.training.run import default_num_workers
    return max(1, default_num_workers())
