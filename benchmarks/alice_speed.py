#!/usr/bin/env python
"""Speed and memory of one Alice step vs. one MAE step vs. one nnU-Net training step (issue 3, docs/gpu.md).

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
CPU: peak RSS of a subprocess per mode, ``ru_maxrss``, which includes the interpreter and libraries, ~0.3-0.5 GiB).
Inputs are synthetic tensors kept on the host (pinned on CUDA) and copied in each step, as a loader's would be.

View sampling (``--sampling``): ``ViewSampler.make_batch`` cost per batch on one CPU thread (= one data worker) for
the same patch and batch, on a preprocessed dataset (``--sampling-dataset``, needs ``nnUNet_preprocessed``) or on
synthetic in-memory volumes of the plan's median shape (``--sampling-synthetic``).

The network comes from the plans JSON alone (``PlansManager`` + ``build_planned_network``, i.e. nnU-Net's own
``get_network_from_plans``); no dataset or preprocessing is needed for the step timings.

Example (CPU, small patch)::

    python benchmarks/alice_speed.py --plans nnUNetResEncUNetMPlans.json --dataset-json dataset.json \
        --device cpu --batch-size 2 --patch-size 64 64 64 --steps 3 --warmup 1
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(HERE))

MODES = ("nnunet", "mae", "alice")


# ---------------------------------------------------------------------------------------------- plans / network
class Plan:
    """Plans JSON + configuration → planned networks, without nnU-Net's dataset or preprocessing."""

    def __init__(self, plans_file: str, configuration: str = "3d_fullres", dataset_json: Optional[str] = None,
                 channels: Optional[int] = None, num_classes: Optional[int] = None):
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        with open(plans_file) as f:
            self.plans = json.load(f)
        self.plans_file = plans_file
        self.plans_name = self.plans.get("plans_name", os.path.splitext(os.path.basename(plans_file))[0])
        self.configuration = configuration
        self.pm = PlansManager(self.plans)
        self.cm = self.pm.get_configuration(configuration)
        ds = {}
        if dataset_json:
            with open(dataset_json) as f:
                ds = json.load(f)
        self.channels = int(channels or len(ds.get("channel_names", ds.get("modality", {}))) or 1)
        self.num_classes = int(num_classes or len(ds.get("labels", {})) or 2)
        self.patch_size = [int(p) for p in self.cm.patch_size]
        self.batch_size = int(self.cm.batch_size)
        self.builder = None

    def pretrain_network(self) -> torch.nn.Module:
        """The student network exactly as ``alice_pretrain`` builds it (output channels = input channels)."""
        try:
            from nnunet_alice.pretrain.model import build_planned_network
            net = build_planned_network(self.pm, self.cm, self.channels)
            self.builder = "nnunet_alice.pretrain.model.build_planned_network"
            return net
        except ImportError as e:  # trainer import chain unavailable: same builder nnU-Net's trainer calls
            from nnunet_alice.pretrain.model import freeze_unused_output_layers
            from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
            net = get_network_from_plans(self.cm.network_arch_class_name, self.cm.network_arch_init_kwargs,
                                         self.cm.network_arch_init_kwargs_req_import, self.channels, self.channels,
                                         allow_init=True, deep_supervision=False)
            freeze_unused_output_layers(net)
            self.builder = f"get_network_from_plans (trainer import failed: {e})"
            return net

    def segmentation_network(self) -> torch.nn.Module:
        """The network nnU-Net trains: num_classes outputs, deep supervision on."""
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
        return get_network_from_plans(self.cm.network_arch_class_name, self.cm.network_arch_init_kwargs,
                                      self.cm.network_arch_init_kwargs_req_import, self.channels, self.num_classes,
                                      allow_init=True, deep_supervision=True)

    def deep_supervision_scales(self) -> List[List[float]]:
        """``nnUNetTrainer._get_deep_supervision_scales``."""
        return [list(s) for s in 1 / np.cumprod(np.vstack(self.cm.pool_op_kernel_sizes), axis=0)][:-1]

    def describe(self) -> dict:
        kw = self.cm.network_arch_init_kwargs
        return {"plans": self.plans_name, "configuration": self.configuration,
                "arch": self.cm.network_arch_class_name.split(".")[-1],
                "features_per_stage": list(kw.get("features_per_stage", [])),
                "n_blocks_per_stage": list(kw.get("n_blocks_per_stage", kw.get("n_conv_per_stage", []))),
                "planned_patch": self.patch_size, "planned_batch": self.batch_size,
                "channels": self.channels, "num_classes": self.num_classes,
                "median_shape": [int(s) for s in self.cm.median_image_size_in_voxels]}


# ---------------------------------------------------------------------------------------------- helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _host(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.pin_memory() if device.type == "cuda" else t


def _count_params(module: torch.nn.Module) -> int:
    seen, n = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def _pretrain_config(objective: str, patch: Sequence[int], batch: int, device: str, compile_: bool):
    from nnunet_alice.pretrain.config import PretrainConfig
    return PretrainConfig(objective=objective, patch_size=list(patch), batch_size=batch, device=device,
                          compile=compile_).validate()


def _compile_objective(objective) -> str:
    """Compile the way the runner does (``enable_compile``) if the objective offers it, else the network."""
    if hasattr(objective, "enable_compile"):
        objective.enable_compile()
        return "objective.enable_compile()"
    compiled = torch.compile(objective.network)  # objectives without enable_compile: swap the network in
    if hasattr(objective, "student"):
        objective.student._features.network = compiled  # hooks stay on the original modules
    else:
        objective.network = compiled
    return "torch.compile(network) swapped in by the benchmark"


def synthetic_pretrain_batch(objective: str, channels: int, patch: Sequence[int], batch: int, config,
                             device: torch.device, seed: int = 0) -> Dict[str, torch.Tensor]:
    from nnunet_alice.pretrain.data.masking import batch_block_masks

    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    shape = (batch, channels, *patch)

    def view():
        return _host(torch.randn(shape, generator=g), device)

    def mask():
        m = batch_block_masks(batch, list(patch), config.mask_block_size, config.mask_ratio, rng)
        return _host(torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32)), device)

    out = {"student_q": view(), "mask_q": mask()}
    if objective == "alice":
        out.update({"student_k": view(), "teacher_q": view(), "teacher_k": view(), "mask_k": mask()})
    return out


# ---------------------------------------------------------------------------------------------- one mode
def run_mode(mode: str, plan: Plan, device: torch.device, batch: int, patch: Sequence[int], steps: int,
             warmup: int, compile_: bool = False, nnunet_amp: str = "fp16", log=print) -> dict:
    """Build the mode's model and optimiser, run ``warmup + steps`` steps, return timings and memory."""
    torch.manual_seed(0)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base_alloc = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    base_rss = _current_rss_gib()
    t_build = time.perf_counter()
    res: dict = {"mode": mode, "batch": batch, "patch": list(patch), "steps": steps, "warmup": warmup,
                 "compile": bool(compile_)}
    total = warmup + steps
    if mode == "nnunet":
        step_fn, extra = _nnunet_stepper(plan, device, batch, patch, compile_, nnunet_amp)
    else:
        step_fn, extra = _pretrain_stepper(mode, plan, device, batch, patch, total, compile_)
    res.update(extra)
    res["build_s"] = round(time.perf_counter() - t_build, 3)
    times, warm_times, losses = [], [], []
    for i in range(total):
        _sync(device)
        t0 = time.perf_counter()
        loss, terms = step_fn(i)
        _sync(device)
        dt = time.perf_counter() - t0
        losses.append({"step": i, "loss": loss, **terms})
        (times if i >= warmup else warm_times).append(dt)
        log(f"  [{mode}] step {i + 1}/{total}{' (warm-up)' if i < warmup else ''}: {dt * 1e3:.1f} ms, "
            f"loss {loss:.4g}" + "".join(f", {k} {v:.4g}" for k, v in terms.items()))
    med = statistics.median(times) if times else float("nan")
    res.update({"ms_per_step": med * 1e3, "ms_all": [round(t * 1e3, 2) for t in times],
                "vol_per_s": batch / med if times else float("nan"),
                "warmup_ms": [round(t * 1e3, 1) for t in warm_times], "losses": losses,
                "finite": bool(all(np.isfinite(v) for l in losses for k, v in l.items() if k != "step"))})
    if device.type == "cuda":
        res["peak_alloc_gib"] = (torch.cuda.max_memory_allocated(device) - base_alloc) / 2 ** 30
        res["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2 ** 30
    res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    res["rss_before_gib"] = base_rss
    res["peak_rss_net_gib"] = res["peak_rss_gib"] - base_rss  # meaningful when the mode runs in its own process
    return res


def _current_rss_gib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return 0.0


def _pretrain_stepper(mode, plan: Plan, device, batch, patch, total_steps, compile_):
    from nnunet_alice.pretrain.training.step import parameter_groups, train_step
    from nnunet_alice.pretrain.training.run import build_objective
    from nnunet_alice.pretrain.training.schedules import Schedules

    cfg = _pretrain_config(mode, patch, batch, device.type, compile_)
    network = plan.pretrain_network()
    schedules = Schedules.from_config(cfg, total_steps)
    objective = build_objective(network, cfg, schedules).to(device)
    objective.train()
    extra = {"builder": plan.builder, "params_network": _count_params(network),
             "params_trained": sum(p.numel() for g in parameter_groups(objective.student_modules())
                                   for p in g["params"]),
             "autocast": "bf16" if device.type == "cuda" else "none (fp32)"}
    if compile_:
        extra["compile_how"] = _compile_objective(objective)
    optimizer = torch.optim.AdamW(parameter_groups(objective.student_modules()), lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    data = synthetic_pretrain_batch(mode, plan.channels, patch, batch, cfg, device)
    autocast = torch.bfloat16 if device.type == "cuda" else None

    def step(i):
        return train_step(objective, objective, optimizer, data, i, float(schedules.lr[i]),
                          float(schedules.weight_decay[i]), cfg.grad_clip, device, autocast_dtype=autocast)

    return step, extra


def _nnunet_stepper(plan: Plan, device, batch, patch, compile_, amp: str):
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    network = plan.segmentation_network().to(device)
    network.train()
    loss = DC_and_CE_loss({"batch_dice": plan.cm.batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    if compile_:  # as nnUNetTrainer with compile on (its default on CUDA): network and loss.dc
        loss.dc = torch.compile(loss.dc)
    scales = plan.deep_supervision_scales()
    weights = np.array([1 / (2 ** i) for i in range(len(scales))])
    weights[-1] = 0
    weights = weights / weights.sum()
    loss = DeepSupervisionWrapper(loss, weights)
    run_net = torch.compile(network) if compile_ else network
    optimizer = torch.optim.SGD(network.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    use_amp = device.type == "cuda"
    amp_dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if use_amp and amp == "fp16" else None
    g = torch.Generator().manual_seed(0)
    data = _host(torch.randn((batch, plan.channels, *patch), generator=g), device)
    target = [_host(torch.randint(0, plan.num_classes, (batch, 1, *[int(round(p * s)) for p, s in zip(patch, sc)]),
                                  generator=g).float(), device) for sc in scales]

    def step(i):
        x = data.to(device, non_blocking=True)
        t = [y.to(device, non_blocking=True) for y in target]
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            out = run_net(x)
            l = loss(out, t)
        if scaler is not None:
            scaler.scale(l).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
            scaler.step(optimizer)
            scaler.update()
        else:
            l.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
            optimizer.step()
        return float(l.detach()), {}

    extra = {"builder": "get_network_from_plans (deep_supervision=True)", "params_network": _count_params(network),
             "num_classes": plan.num_classes, "ds_outputs": len(scales),
             "autocast": ({"fp16": "fp16 + GradScaler (nnU-Net)", "bf16": "bf16"}[amp] if use_amp else "none (fp32)")}
    return step, extra


# ---------------------------------------------------------------------------------------------- view sampling
class InMemoryData:
    """The part of ``PretrainData`` that ``ViewSampler`` uses, over synthetic CT-like volumes in memory."""

    class Ref:
        def __init__(self, key):
            self.key = key

    def __init__(self, shape: Sequence[int], n_cases: int = 4, channels: int = 1, seed: int = 0):
        from nnunet_alice.pretrain.matching.base import CaseVolume

        rng = np.random.default_rng(seed)
        self.cases = [self.Ref(f"synth_{i:03d}") for i in range(n_cases)]
        self._vols = {}
        grids = np.ogrid[tuple(slice(0, s) for s in shape)]
        for ref in self.cases:
            c = np.asarray(shape) / 2 + rng.uniform(-3, 3, 3)
            r = np.asarray(shape) * rng.uniform(0.38, 0.46, 3)
            body = sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grids, c, r)) <= 1
            img = np.where(body, 0.5, -2.0).astype(np.float32)
            img = img[None].repeat(channels, 0) + rng.standard_normal((channels, *shape), dtype=np.float32) * 0.1
            self._vols[ref.key] = CaseVolume(ref.key, img, (1.0, 1.0, 1.0))

    def load(self, ref):
        return self._vols[ref.key]


def measure_sampling(objective: str, data, patch: Sequence[int], batch: int, batches: int, matcher_name: str = "intra",
                     augment: bool = True, log=print) -> dict:
    """Mean (= throughput) and median ms per ``make_batch`` after one warm-up batch. nnU-Net's augmentations fire
    with probabilities, so batches vary: use enough ``batches``.

    Call it in a process whose torch uses one thread (= one data-loading worker): :func:`sampling_subprocess`.
    Do not toggle ``torch.set_num_threads`` 1 -> N in a process that later forks loader workers: the forked
    worker hangs in libgomp (seen here with torch 2.14 on CPU).
    """
    from nnunet_alice.pretrain.config import PretrainConfig
    from nnunet_alice.pretrain.data.views import ViewSampler

    cfg = PretrainConfig(objective=objective, matcher=matcher_name, patch_size=list(patch), batch_size=batch,
                         augment=augment).validate()
    matcher = None
    t_prep = 0.0
    if objective == "alice":
        from nnunet_alice.pretrain.matching import build_matcher
        matcher = build_matcher(matcher_name, cfg, cache_dir=tempfile.mkdtemp(prefix="alice_match_"))
        t0 = time.perf_counter()
        matcher.prepare([data.load(c) for c in data.cases])
        t_prep = time.perf_counter() - t0
    sampler = ViewSampler(data, cfg, patch, batch, matcher)
    times = []
    for i in range(batches + 1):
        t0 = time.perf_counter()
        b = sampler.make_batch(i)
        dt = time.perf_counter() - t0
        if i:
            times.append(dt)
        log(f"  [sampling {objective}{'' if augment else ' no-aug'}] batch {i}{' (warm-up)' if not i else ''}: "
            f"{dt * 1e3:.0f} ms")
    shape = list(b["student_q"].shape)
    return {"objective": objective, "matcher": matcher_name, "augment": augment, "batch": batch, "patch": list(patch),
            "ms_per_batch": statistics.fmean(times) * 1e3, "ms_median": statistics.median(times) * 1e3,
            "ms_all": [round(t * 1e3, 1) for t in times],
            "matcher_prepare_s": round(t_prep, 3), "crop_size": list(sampler.crop_size), "view_shape": shape}


def measure_pipeline(plan: Plan, device: torch.device, batch: int, patch: Sequence[int], data, workers: int,
                     steps: int, warmup: int, matcher_name: str = "intra", log=print) -> dict:
    """Alice training steps fed by the real loader (``views.make_loader``: ViewSampler in ``workers`` processes).

    Returns the time the loop waits in ``next(loader)`` as a share of the whole step (what ``data_s`` in the run
    log measures), after ``warmup`` steps, and the step time with data loading included.
    """
    from nnunet_alice.pretrain.config import PretrainConfig
    from nnunet_alice.pretrain.training.step import parameter_groups, train_step
    from nnunet_alice.pretrain.matching import build_matcher
    from nnunet_alice.pretrain.training.run import build_objective
    from nnunet_alice.pretrain.training.schedules import Schedules
    from nnunet_alice.pretrain.data.views import ViewSampler, make_loader

    total = warmup + steps
    cfg = PretrainConfig(objective="alice", matcher=matcher_name, patch_size=list(patch), batch_size=batch,
                         device=device.type).validate()
    matcher = build_matcher(matcher_name, cfg, cache_dir=tempfile.mkdtemp(prefix="alice_match_"))
    matcher.prepare([data.load(c) for c in data.cases])
    sampler = ViewSampler(data, cfg, patch, batch, matcher)
    schedules = Schedules.from_config(cfg, total)
    objective = build_objective(plan.pretrain_network(), cfg, schedules).to(device)
    objective.train()
    optimizer = torch.optim.AdamW(parameter_groups(objective.student_modules()), lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    loader = make_loader(sampler, workers, cfg.seed)
    waits, totals = [], []
    try:
        for i in range(total):
            _sync(device)
            t0 = time.perf_counter()
            b = next(loader)
            t_data = time.perf_counter() - t0
            train_step(objective, objective, optimizer, b, i, float(schedules.lr[i]), float(schedules.weight_decay[i]),
                       cfg.grad_clip, device, autocast_dtype=autocast)
            _sync(device)
            dt = time.perf_counter() - t0
            if i >= warmup:
                waits.append(t_data)
                totals.append(dt)
            log(f"  [pipeline {workers} workers] step {i + 1}/{total}{' (warm-up)' if i < warmup else ''}: "
                f"{dt * 1e3:.0f} ms, waited for data {t_data * 1e3:.0f} ms")
    finally:
        loader.close()
    return {"workers": workers, "batch": batch, "patch": list(patch), "steps": steps, "warmup": warmup,
            "matcher": matcher_name, "ms_per_step_with_data": statistics.fmean(totals) * 1e3,
            "ms_data_wait": statistics.fmean(waits) * 1e3, "data_wait_share": sum(waits) / sum(totals),
            "wait_ms_all": [round(w * 1e3, 1) for w in waits]}


# ---------------------------------------------------------------------------------------------- report
def ratios(results: Dict[str, dict], sampling: Optional[Dict[str, dict]], workers: int) -> dict:
    out = {}
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
    lines = ["| mode | batch | patch | ms/step (median) | vol/s | peak mem (GiB) | finite |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for mode in MODES:
        r = results.get(mode)
        if not r:
            continue
        if "error" in r:
            lines.append(f"| {mode} | {r.get('batch')} | {r.get('patch')} | error: {r['error'][:60]} | | | |")
            continue
        mem = r.get("peak_alloc_gib")
        mem_s = (f"{mem:.2f} (CUDA alloc)" if mem is not None else
                 f"{r['peak_rss_net_gib']:.2f} (RSS above {r['rss_before_gib']:.2f} at start)")
        lines.append(f"| {mode} | {r['batch']} | {'x'.join(map(str, r['patch']))} | {r['ms_per_step']:.1f} | "
                     f"{r['vol_per_s']:.2f} | {mem_s} | {r['finite']} |")
    for k, s in (sampling or {}).items():
        if "error" in s:
            lines.append(f"| sampling {k} | | | error: {s['error'][:60]} | | | |")
        else:
            lines.append(f"| sampling {k} ({s['matcher']}, 1 thread, {len(s['ms_all'])} batches) | {s['batch']} | "
                         f"{'x'.join(map(str, s['patch']))} | {s['ms_per_batch']:.1f} ms/batch (mean; median "
                         f"{s['ms_median']:.1f}) | | | |")
    return "\n".join(lines)


def format_ratios(r: dict) -> str:
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


def default_workers() -> int:
    from nnunet_alice.pretrain.training.run import default_num_workers
    return max(1, default_num_workers())


# ---------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
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
                   help="one subprocess per mode (auto: on CPU, where peak RSS is the only memory measure)")
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
    p.add_argument("--_one-mode", dest="one_mode", help=argparse.SUPPRESS)
    p.add_argument("--_sampling-child", dest="sampling_child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def sampling_subprocess(argv: List[str]) -> dict:
    """Run the view-sampling timings of ``argv`` in a child process with one torch thread (one data worker)."""
    fd, path = tempfile.mkstemp(suffix=".json", prefix="alice_speed_sampling_")
    os.close(fd)
    try:
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--modes", "", "--pipeline-workers", "",
               "--_sampling-child", "--json-out", path, "--isolate", "no"]
        proc = subprocess.run(cmd, stdout=sys.stdout, stderr=sys.stderr)
        if proc.returncode != 0:
            return {"error": {"error": f"sampling subprocess exited with {proc.returncode}"}}
        with open(path) as f:
            return json.load(f)["sampling"] or {}
    finally:
        os.remove(path)


def _run_isolated(mode: str, argv: List[str]) -> dict:
    fd, path = tempfile.mkstemp(suffix=".json", prefix=f"alice_speed_{mode}_")
    os.close(fd)
    try:
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--_one-mode", mode, "--json-out", path,
               "--isolate", "no"]
        proc = subprocess.run(cmd, stdout=sys.stdout, stderr=sys.stderr)
        if proc.returncode != 0:
            return {"mode": mode, "error": f"subprocess exited with {proc.returncode}"}
        with open(path) as f:
            return json.load(f)["results"][mode]
    finally:
        os.remove(path)


def _dump(path, info, results, sampling, pipeline) -> None:
    """Partial results, so that a run stopped by a time limit still leaves what it finished."""
    if path:
        with open(path, "w") as f:
            json.dump({"info": info, "results": results, "sampling": sampling, "pipeline": pipeline, "partial": True},
                      f, indent=1, default=float)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.sampling_child:
        torch.set_num_threads(1)  # one data-loading worker; set once, before any parallel work
    elif args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnU-Net
    plan = Plan(args.plans, args.configuration, args.dataset_json, args.channels, args.num_classes)
    batch = args.batch_size or plan.batch_size
    patch = list(args.patch_size or plan.patch_size)
    modes = [args.one_mode] if args.one_mode else [m.strip() for m in args.modes.split(",") if m.strip()]
    isolate = args.isolate == "yes" or (args.isolate == "auto" and device.type == "cpu")
    info = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
            "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "plan": plan.describe(), "batch": batch, "patch": patch, "steps": args.steps, "warmup": args.warmup}
    if not args.one_mode and not args.sampling_child:
        print(f"alice_speed: {info['plan']['plans']} {args.configuration} ({info['plan']['arch']}), patch {patch}, "
              f"per-view batch {batch}, device {info['device_name']}, torch {torch.__version__}, "
              f"{info['threads']} threads, {args.warmup} warm-up + {args.steps} timed steps", flush=True)
    results: Dict[str, dict] = {}
    for mode in modes:
        if isolate and not args.one_mode:
            results[mode] = _run_isolated(mode, [a for a in argv])
            continue
        try:
            results[mode] = run_mode(mode, plan, device, batch, patch, args.steps, args.warmup, args.compile,
                                     args.nnunet_amp, log=lambda s: print(s, flush=True))
        except Exception as e:  # report and go on with the next mode
            if device.type == "cuda":
                torch.cuda.empty_cache()
            results[mode] = {"mode": mode, "batch": batch, "patch": patch, "error": f"{type(e).__name__}: {e}"}
            print(f"  [{mode}] FAILED: {results[mode]['error']}", flush=True)
        finally:
            gc.collect()
        if not args.one_mode:
            _dump(args.json_out, info, results, None, None)
    sampling = None
    if not args.one_mode and not args.sampling_child and (args.sampling_dataset or args.sampling_synthetic):
        sampling = sampling_subprocess(argv)
        _dump(args.json_out, info, results, sampling, None)
    if args.sampling_child:
        sampling = {}
        if args.sampling_dataset:
            from nnunet_alice.pretrain.data.cases import PretrainData, resolve_dataset_name
            data = PretrainData(resolve_dataset_name(args.sampling_dataset), args.sampling_plans or plan.plans_name,
                                args.configuration, [])
            source = f"preprocessed {data.dataset_name} ({len(data.cases)} cases)"
        else:
            data = InMemoryData(plan.describe()["median_shape"], channels=plan.channels)
            source = f"synthetic in-memory volumes {plan.describe()['median_shape']} ({len(data.cases)} cases)"
        jobs = [("mae", "mae", True), ("alice", "alice", True)]
        if args.sampling_noaug:
            jobs.append(("alice_noaug", "alice", False))
        for name, obj, aug in jobs:
            try:
                sampling[name] = measure_sampling(obj, data, patch, batch, args.sampling_batches, args.matcher,
                                                  augment=aug, log=lambda s: print(s, flush=True))
                sampling[name]["source"] = source
            except Exception as e:
                sampling[name] = {"error": f"{type(e).__name__}: {e}"}
                print(f"  [sampling {name}] FAILED: {sampling[name]['error']}", flush=True)
            _dump(args.json_out, info, results, sampling, None)
    pipeline = None
    if not args.one_mode and args.pipeline_workers:
        pipeline = {}
        if args.sampling_dataset:
            from nnunet_alice.pretrain.data.cases import PretrainData, resolve_dataset_name
            pdata = PretrainData(resolve_dataset_name(args.sampling_dataset), args.sampling_plans or plan.plans_name,
                                 args.configuration, [])
        else:
            pdata = InMemoryData(plan.describe()["median_shape"], channels=plan.channels)
        for w in [int(x) for x in args.pipeline_workers.split(",") if x.strip()]:
            try:
                pipeline[str(w)] = measure_pipeline(plan, device, batch, patch, pdata, w, args.pipeline_steps,
                                                    args.warmup, args.matcher, log=lambda s: print(s, flush=True))
            except Exception as e:
                pipeline[str(w)] = {"error": f"{type(e).__name__}: {e}"}
                print(f"  [pipeline {w}] FAILED: {pipeline[str(w)]['error']}", flush=True)
            _dump(args.json_out, info, results, sampling, pipeline)
    workers = args.workers or default_workers()
    rat = ratios(results, sampling, workers)
    out = {"info": info, "results": results, "sampling": sampling, "pipeline": pipeline, "ratios": rat}
    if not args.one_mode and not args.sampling_child:
        print()
        print(format_table(results, sampling))
        print()
        print(format_ratios(rat))
        for w, r in (pipeline or {}).items():
            if "error" not in r:
                print(f"Alice steps fed by the loader ({w} workers): {r['ms_per_step_with_data']:.0f} ms/step, "
                      f"waiting for data {r['ms_data_wait']:.1f} ms = {100 * r['data_wait_share']:.1f} % of a step")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=1, default=float)
    return out


if __name__ == "__main__":
    main()
