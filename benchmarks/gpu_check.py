"""One short, prepared run on a lent GPU (results and how it was run: docs/gpu.md).

Sections, in this order (each one's results are written to ``<out>/gpu_check.json`` as soon as it ends, so a
run stopped by its time limit still returns what it finished):

1. speed: the nnU-Net step, MAE step and Alice step of ``benchmarks/speed.py`` at the plan's patch and batch
   (ms/step, volumes/s, peak ``torch.cuda.max_memory_allocated``), cuDNN benchmark on as in nnU-Net;
2. bf16: the MAE and Alice steps of (1) ran under bf16 autocast through ``train_step``; every per-term loss of
   every step must be finite (printed per step);
3. view sampling on this machine's CPU (a child process with one thread = one data worker), synthetic in-memory
   volumes of the plan's median shape, same patch and batch, with and without nnU-Net's augmentation;
3b. pipeline: Alice steps fed by the real loader (``views.make_loader``, ``--pipeline-workers`` processes): the
   time spent waiting for data as a share of the step;
4. compile: a fresh Alice objective compiled as the runner does (``enable_compile``), a few bf16 steps (first one
   includes compilation), then a checkpoint written with ``network_state_dict`` + ``save_checkpoint`` from the
   compiled network, checked for ``_orig_mod`` and loaded into an uncompiled planned network with strict=True.

usage (device, from the repository root; see benchmarks/gpu_wheels.sh and docs/gpu.md)::

    PYTHONPATH=/tmp/pylibs:.gpu_wheels/stubs:. python3 -m benchmarks.gpu_check \
        --plans .gpu_wheels/plans/nnUNetResEncUNetMPlans.json --dataset-json .gpu_wheels/plans/dataset.json --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

from benchmarks import sampling, speed
from benchmarks.common import (Plan, PretrainParts, all_finite, format_terms, pretrain_config,
                               synthetic_pretrain_batch, timed)

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def elapsed() -> float:
    return time.perf_counter() - T0


class Report:
    """``<out>/gpu_check.json``, rewritten whenever a section stores its results."""

    def __init__(self, out_dir: str):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "gpu_check.json")
        self.data: dict = {}

    def __setitem__(self, key, value):
        self.data[key] = value
        self.data["elapsed_s"] = round(elapsed(), 1)
        with open(self.path, "w") as f:
            json.dump(self.data, f, indent=1, default=float)


def env_info(device: torch.device) -> dict:
    """Card, CUDA, cuDNN and the versions of the packages that matter, for the report's header."""
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
            "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update({"device_name": p.name, "capability": f"{p.major}.{p.minor}", "sm_count": p.multi_processor_count,
                     "total_memory_gib": round(p.total_memory / 2 ** 30, 1), "cudnn": torch.backends.cudnn.version()})
    else:
        info["device_name"] = "cpu"
    try:
        import nnunetv2  # noqa: F401
        from importlib.metadata import version
        info["nnunetv2"] = version("nnunetv2")
        info["dynamic_network_architectures"] = version("dynamic_network_architectures")
    except Exception as e:  # informative only
        info["nnunetv2"] = f"unavailable: {e}"
    try:
        import SimpleITK
        info["SimpleITK"] = getattr(SimpleITK, "__version__", "?")
    except ImportError:
        info["SimpleITK"] = "absent"
    return info


def section_speed(plan: Plan, device: torch.device, batch: int, patch, args) -> dict:
    """The three step modes in this process (CUDA memory is reset between modes)."""
    results = {}
    for mode in speed.MODES:
        log(f"speed: {mode}")
        try:
            results[mode] = speed.run_mode(mode, plan, device, batch, patch, args.steps, args.warmup, False,
                                           args.nnunet_amp, log=log)
        except Exception as e:
            results[mode] = {"mode": mode, "batch": batch, "patch": patch, "error": f"{type(e).__name__}: {e}",
                             "traceback": traceback.format_exc()[-3000:]}
            log(f"speed: {mode} FAILED: {results[mode]['error']}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def section_bf16(results: dict) -> dict:
    """Whether every per-term loss of the bf16 MAE and Alice steps of :func:`section_speed` was finite."""
    out = {}
    for mode in ("mae", "alice"):
        r = results.get(mode, {})
        if "losses" not in r:
            out[mode] = {"finite": False, "error": r.get("error", "not run")}
            continue
        bad = [(l["step"], k) for l in r["losses"] for k, v in l.items() if k != "step" and not np.isfinite(v)]
        out[mode] = {"autocast": r.get("autocast"), "steps": len(r["losses"]), "finite": not bad, "non_finite": bad,
                     "first": r["losses"][0], "last": r["losses"][-1]}
        last = {k: v for k, v in r["losses"][-1].items() if k not in ("step", "loss")}
        log(f"bf16 {mode}: {len(r['losses'])} steps, all per-term losses finite: {not bad}; last: "
            + format_terms(r["losses"][-1]["loss"], last))
    return out


def section_sampling(plan: Plan, batch: int, patch, args, results: dict) -> dict:
    """View sampling in a one-thread child process, with the sampling share ratios against the speed results."""
    out = dict(sampling.run_sampling_isolated(plan, patch, batch, args.sampling_batches, noaug=True))
    workers = args.workers or speed.default_workers()
    out["ratios"] = speed.ratios(results, {k: v for k, v in out.items() if k in ("mae", "alice")}, workers)
    return out


def section_pipeline(plan: Plan, device: torch.device, batch: int, patch, args) -> dict:
    """Alice steps fed by the real loader (forked workers; run before anything compiles)."""
    data, _ = sampling.sampling_data(plan)
    workers = [int(x) for x in args.pipeline_workers.split(",") if x.strip()]
    return sampling.pipeline_runs(plan, device, batch, patch, data, workers, args.pipeline_steps, args.warmup,
                                  log=log)


def compiled_steps(parts: PretrainParts, plan: Plan, batch: int, patch, args) -> dict:
    """A few bf16 Alice steps of the compiled objective; the first one includes compilation."""
    data = synthetic_pretrain_batch("alice", plan.channels, patch, batch, parts.cfg, parts.device, seed=1)
    total = args.compile_steps
    times, losses = [], []
    for i in range(total):
        (loss, terms), dt = timed(lambda: parts.step(data, i), parts.device)
        times.append(dt)
        losses.append({"step": i, "loss": loss, **terms})
        log(f"compile: step {i + 1}/{total}: {dt * 1e3:.0f} ms, " + format_terms(loss, terms))
        if elapsed() > args.budget_s:
            log("compile: time budget reached, stopping the compiled steps")
            break
    out = {"ok": True, "first_step_s": times[0], "step_ms_after_first": [round(t * 1e3, 1) for t in times[1:]],
           "ms_per_step": float(np.median(times[1:])) * 1e3 if len(times) > 1 else None, "losses": losses,
           "finite": all_finite(losses)}
    if out["ms_per_step"]:
        out["vol_per_s"] = batch / (out["ms_per_step"] / 1e3)
    try:
        import torch._dynamo as dynamo
        counters = dynamo.utils.counters
        out["graph_breaks"] = int(sum(counters["graph_break"].values()))
        out["unique_graphs"] = int(counters["stats"].get("unique_graphs", 0))
    except Exception:
        pass
    return out


def checkpoint_round_trip(objective, plan: Plan) -> dict:
    """A checkpoint from the compiled network (the runner's way and an explicit ``torch.compile`` wrapper) has no
    ``_orig_mod`` keys and loads with strict=True into an uncompiled planned network, weights unchanged.

    What was checked before a failure stays in the result, next to the error."""
    ck: dict = {}
    try:
        _round_trip(objective, plan, ck)
    except Exception as e:
        ck.update({"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]})
    return ck


def _round_trip(objective, plan: Plan, ck: dict) -> None:
    from nnunet_alice.checkpoint import load_checkpoint, network_state_dict, save_checkpoint
    from nnunet_alice.pretrain.model import unwrap

    compiled_wrapper = getattr(getattr(objective.student, "_features", None), "_run", None)
    if compiled_wrapper is None or not hasattr(compiled_wrapper, "_orig_mod"):
        compiled_wrapper = torch.compile(objective.network)
    ck["wrapper_state_dict_has_orig_mod"] = any("_orig_mod" in k for k in compiled_wrapper.state_dict())
    sd_runner = network_state_dict(objective.network)
    sd = network_state_dict(compiled_wrapper)
    ck["orig_mod_in_checkpoint_keys"] = any("_orig_mod" in k for k in list(sd) + list(sd_runner))
    ck["same_keys_runner_vs_wrapper"] = sorted(sd) == sorted(sd_runner)
    ck["n_keys"] = len(sd)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "checkpoint_compiled.pth")
        save_checkpoint(path, {"network_weights": sd, "metadata": {"what": "gpu_check compiled checkpoint"}})
        fresh = plan.pretrain_network()  # uncompiled, on the CPU
        res = fresh.load_state_dict(load_checkpoint(path)["network_weights"], strict=True)
        ck["strict_load"] = "ok" if not (res.missing_keys or res.unexpected_keys) else str(res)
        ref = {k: v.detach().float().cpu() for k, v in unwrap(objective.network).state_dict().items()}
        ck["max_abs_diff_after_load"] = float(max((fresh.state_dict()[k].float() - ref[k]).abs().max()
                                                  for k in ref)) if ref else None
        ck["size_mb"] = round(os.path.getsize(path) / 2 ** 20, 2)
    ck["ok"] = (not ck["orig_mod_in_checkpoint_keys"]) and ck["strict_load"] == "ok" and \
        ck["max_abs_diff_after_load"] == 0.0


def section_compile(plan: Plan, device: torch.device, batch: int, patch, args) -> dict:
    """Compiled Alice steps, then the checkpoint round trip from the compiled network."""
    cfg = pretrain_config("alice", patch, batch, device.type, True)
    parts = PretrainParts(plan.pretrain_network(), cfg, device, args.compile_steps, compile_=True)
    out: dict = {"how": parts.compile_how}
    log(f"compile: {out['how']}")
    try:
        out.update(compiled_steps(parts, plan, batch, patch, args))
    except Exception as e:
        out.update({"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]})
        log(f"compile FAILED: {out['error']}")
    out["checkpoint"] = checkpoint_round_trip(parts.objective, plan)
    log(f"checkpoint from compiled network: {out['checkpoint']}")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plans", required=True)
    p.add_argument("--dataset-json")
    p.add_argument("--configuration", default="3d_fullres")
    p.add_argument("--batch-size", type=int, help="default: the plan's")
    p.add_argument("--patch-size", type=int, nargs=3, help="default: the plan's")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile-steps", type=int, default=4)
    p.add_argument("--sampling-batches", type=int, default=6)
    p.add_argument("--workers", type=int, help="data workers for the sampling share (default: the runner's)")
    p.add_argument("--pipeline-workers", default="8", help="comma-separated worker counts for loader-fed Alice steps")
    p.add_argument("--pipeline-steps", type=int, default=10)
    p.add_argument("--nnunet-amp", choices=("fp16", "bf16"), default="fp16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: speed,sampling,pipeline,compile")
    p.add_argument("--budget-s", type=float, default=330.0, help="stop starting new work after this many seconds")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    return p.parse_args(argv)


def print_summary(rep: Report, plan: Plan, batch: int, patch) -> None:
    print("\n===== summary =====", flush=True)
    env = rep.data["env"]
    print(f"card: {env.get('device_name')} (torch {env['torch']}, CUDA {env.get('cuda')}), plan "
          f"{plan.plans_name} {plan.describe()['arch']}, patch {patch}, batch {batch}")
    if rep.data.get("speed"):
        print(speed.format_table(rep.data["speed"], {k: v for k, v in rep.data.get("sampling", {}).items()
                                                     if k in ("mae", "alice")}))
        print(speed.format_ratios(rep.data.get("ratios", {})))
        print("bf16 finite:", {k: v.get("finite") for k, v in rep.data.get("bf16", {}).items()})
    if speed.format_pipeline(rep.data.get("pipeline")):
        print(speed.format_pipeline(rep.data.get("pipeline")))
    c = rep.data.get("compile")
    if c:
        ms = c.get("ms_per_step")
        print(f"compile: ok={c.get('ok')} first step {c.get('first_step_s', float('nan')):.1f} s, then "
              f"{'n/a' if ms is None else f'{ms:.1f}'} ms/step, graph breaks {c.get('graph_breaks')}; "
              f"error: {c.get('error')}")
        print(f"checkpoint from compiled net: {c.get('checkpoint')}")


def main(argv=None) -> None:
    args = parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rep = Report(args.out)
    rep["env"] = env_info(device)
    log(f"env: {rep.data['env']}")
    plan = Plan(args.plans, args.configuration, args.dataset_json)
    batch = args.batch_size or plan.batch_size
    patch = list(args.patch_size or plan.patch_size)
    rep["plan"] = {**plan.describe(), "batch": batch, "patch": patch}
    log(f"plan: {rep.data['plan']}")

    results = {}
    if "speed" not in skip:
        results = section_speed(plan, device, batch, patch, args)
        rep["speed"] = results
        rep["builder"] = plan.builder
        print("\n" + speed.format_table(results) + "\n", flush=True)
        rep["bf16"] = section_bf16(results)
        rep["ratios"] = speed.ratios(results, None, 1)
    if "sampling" not in skip and elapsed() < args.budget_s:
        log("sampling (CPU, 1 thread per worker)")
        rep["sampling"] = section_sampling(plan, batch, patch, args, results)
        rep["ratios"] = rep.data["sampling"]["ratios"]
    if "pipeline" not in skip and args.pipeline_workers and elapsed() < args.budget_s:
        log("pipeline: Alice steps fed by the loader")
        rep["pipeline"] = section_pipeline(plan, device, batch, patch, args)
    if "compile" not in skip and elapsed() < args.budget_s:
        log("compile + checkpoint")
        rep["compile"] = section_compile(plan, device, batch, patch, args)
    print_summary(rep, plan, batch, patch)
    log(f"done; JSON: {rep.path}")


if __name__ == "__main__":
    main()
