"""What the data side costs: ``ViewSampler.make_batch`` on one thread, and Alice steps fed by the real loader.

Used by ``python -m benchmarks.alice_speed`` (``--sampling-*``, ``--pipeline-workers``) and
``python -m benchmarks.gpu_check`` (docs/gpu.md). The sampler is timed in a fresh process whose torch uses one
thread, as one data-loading worker does (:func:`run_sampling_isolated`).
"""
from __future__ import annotations

import statistics
import tempfile
import time
import traceback
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from benchmarks.common import Plan, PretrainParts, in_child, pretrain_config, sync


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


def sampling_data(plan: Plan, dataset: Optional[str] = None, plans_name: Optional[str] = None):
    """``(data, description)``: the preprocessed ``dataset`` (needs ``nnUNet_preprocessed``) when given, else
    synthetic in-memory volumes of the plan's median shape."""
    if dataset:
        from nnunet_alice.pretrain.data.cases import PretrainData, resolve_dataset_name
        data = PretrainData(resolve_dataset_name(dataset), plans_name or plan.plans_name, plan.configuration, [])
        return data, f"preprocessed {data.dataset_name} ({len(data.cases)} cases)"
    data = InMemoryData(plan.median_shape, channels=plan.channels)
    return data, f"synthetic in-memory volumes {plan.median_shape} ({len(data.cases)} cases)"


def _prepared_matcher(name: str, cfg, data):
    """The matcher ``alice_pretrain`` would use, prepared on every case; ``(matcher, seconds to prepare)``."""
    from nnunet_alice.pretrain.matching import build_matcher

    matcher = build_matcher(name, cfg, cache_dir=tempfile.mkdtemp(prefix="alice_match_"))
    t0 = time.perf_counter()
    matcher.prepare([data.load(c) for c in data.cases])
    return matcher, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- view sampling
def measure_sampling(objective: str, data, patch: Sequence[int], batch: int, batches: int, matcher_name: str = "intra",
                     augment: bool = True, log=print) -> dict:
    """Mean (= throughput) and median ms per ``make_batch`` after one warm-up batch. nnU-Net's augmentations fire
    with probabilities, so batches vary: use enough ``batches``.

    Call it in a process whose torch uses one thread (= one data-loading worker): :func:`run_sampling_isolated`.
    """
    from nnunet_alice.pretrain.config import PretrainConfig
    from nnunet_alice.pretrain.data.views import ViewSampler

    cfg = PretrainConfig(objective=objective, matcher=matcher_name, patch_size=list(patch), batch_size=batch,
                         augment=augment).validate()
    matcher, t_prep = _prepared_matcher(matcher_name, cfg, data) if objective == "alice" else (None, 0.0)
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
    return {"objective": objective, "matcher": matcher_name, "augment": augment, "batch": batch, "patch": list(patch),
            "ms_per_batch": statistics.fmean(times) * 1e3, "ms_median": statistics.median(times) * 1e3,
            "ms_all": [round(t * 1e3, 1) for t in times], "matcher_prepare_s": round(t_prep, 3),
            "crop_size": list(sampler.crop_size), "view_shape": list(b["student_q"].shape)}


def sampling_jobs(plan: Plan, patch: Sequence[int], batch: int, batches: int, matcher: str = "intra",
                  noaug: bool = False, dataset: Optional[str] = None, plans_name: Optional[str] = None,
                  log=print) -> Dict[str, dict]:
    """MAE and Alice sampling (and Alice without augmentation with ``noaug``), each failure kept as an error."""
    data, source = sampling_data(plan, dataset, plans_name)
    jobs = [("mae", "mae", True), ("alice", "alice", True)] + ([("alice_noaug", "alice", False)] if noaug else [])
    out: Dict[str, dict] = {}
    for name, objective, augment in jobs:
        try:
            out[name] = measure_sampling(objective, data, patch, batch, batches, matcher, augment=augment, log=log)
            out[name]["source"] = source
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"}
            log(f"  [sampling {name}] FAILED: {out[name]['error']}")
    return out


def _sampling_in_child(plan_spec: dict, patch, batch, batches, matcher, noaug, dataset, plans_name) -> dict:
    return sampling_jobs(Plan(**plan_spec), patch, batch, batches, matcher, noaug, dataset, plans_name,
                         log=lambda s: print(s, flush=True))


def run_sampling_isolated(plan: Plan, patch: Sequence[int], batch: int, batches: int, matcher: str = "intra",
                          noaug: bool = False, dataset: Optional[str] = None,
                          plans_name: Optional[str] = None) -> Dict[str, dict]:
    """:func:`sampling_jobs` in a fresh process with one torch thread (one data worker).

    A child that dies is reported as ``{"error": {"error": ...}}``: one table row, as a failed job would be.
    """
    try:
        return in_child(_sampling_in_child, plan.spec, list(patch), batch, batches, matcher, noaug, dataset,
                        plans_name, threads=1)
    except RuntimeError as e:
        print(f"  [sampling] FAILED: {e}", flush=True)
        return {"error": {"error": str(e)}}


# ---------------------------------------------------------------------------------------------- loader-fed steps
def measure_pipeline(plan: Plan, device: torch.device, batch: int, patch: Sequence[int], data, workers: int,
                     steps: int, warmup: int, matcher_name: str = "intra", log=print) -> dict:
    """Alice training steps fed by the real loader (``views.make_loader``: ViewSampler in ``workers`` processes).

    Returns the time the loop waits in ``next(loader)`` as a share of the whole step (what ``data_s`` in the run
    log measures), after ``warmup`` steps, and the step time with data loading included.
    """
    from nnunet_alice.pretrain.data.views import ViewSampler, make_loader

    total = warmup + steps
    cfg = pretrain_config("alice", patch, batch, device.type, matcher=matcher_name)
    matcher, _ = _prepared_matcher(matcher_name, cfg, data)
    sampler = ViewSampler(data, cfg, patch, batch, matcher)
    parts = PretrainParts(plan.pretrain_network(), cfg, device, total)
    loader = make_loader(sampler, workers, cfg.seed)
    waits, totals = [], []
    try:
        for i in range(total):
            sync(device)
            t0 = time.perf_counter()
            b = next(loader)
            t_data = time.perf_counter() - t0
            parts.step(b, i)
            sync(device)
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


def pipeline_runs(plan: Plan, device: torch.device, batch: int, patch: Sequence[int], data, workers: Sequence[int],
                  steps: int, warmup: int, matcher: str = "intra", log=print, on_result=None) -> Dict[str, dict]:
    """:func:`measure_pipeline` for each worker count (keys: the count as text); failures kept as errors.

    ``on_result(results_so_far)`` after each count lets a caller write partial results.
    """
    out: Dict[str, dict] = {}
    for w in workers:
        try:
            out[str(w)] = measure_pipeline(plan, device, batch, patch, data, w, steps, warmup, matcher, log=log)
        except Exception as e:
            out[str(w)] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            log(f"  [pipeline {w}] FAILED: {out[str(w)]['error']}")
        if on_result:
            on_result(out)
    return out
