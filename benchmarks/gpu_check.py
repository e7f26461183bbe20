#!/usr/bin/env python
"""One short, prepared run on a lent GPU (issue 3, "On a lent GPU"; results in docs/gpu.md).

Sections, in this order (each one's results are written to ``<out>/gpu_check.json`` as soon as it ends, so a
run stopped by its time limit still returns what it finished):

1. speed: ``benchmarks/alice_speed.py``'s nnU-Net step, MAE step and Alice step at the plan's patch and batch
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

usage (device; see benchmarks/gpu_wheels.sh and docs/gpu.md)::

    PYTHONPATH=/tmp/pylibs:.gpu_wheels/stubs:. python3 benchmarks/gpu_check.py \
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

import alice_speed as bench  # noqa: E402

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def elapsed() -> float:
    return time.perf_counter() - T0


class Report:
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
    except Exception as e:  # pragma: no cover - informative only
        info["nnunetv2"] = f"unavailable: {e}"
    try:
        import SimpleITK
        info["SimpleITK"] = getattr(SimpleITK, "__version__", "?")
    except ImportError:
        info["SimpleITK"] = "absent"
    return info


def section_speed(plan, device, batch, patch, args) -> dict:
    results = {}
    for mode in ("nnunet", "mae", "alice"):
        log(f"speed: {mode}")
        try:
            results[mode] = bench.run_mode(mode, plan, device, batch, patch, args.steps, args.warmup, False,
                                           args.nnunet_amp, log=log)
        except Exception as e:
            results[mode] = {"mode": mode, "batch": batch, "patch": patch, "error": f"{type(e).__name__}: {e}",
                             "traceback": traceback.format_exc()[-3000:]}
            log(f"speed: {mode} FAILED: {results[mode]['error']}")
        torch.cuda.empty_cache() if device.type == "cuda" else None
    return results


def section_bf16(speed: dict) -> dict:
    out = {}
    for mode in ("mae", "alice"):
        r = speed.get(mode, {})
        if "losses" not in r:
            out[mode] = {"finite": False, "error": r.get("error", "not run")}
            continue
        bad = [(l["step"], k) for l in r["losses"] for k, v in l.items() if k != "step" and not np.isfinite(v)]
        out[mode] = {"autocast": r.get("autocast"), "steps": len(r["losses"]), "finite": not bad, "non_finite": bad,
                     "first": r["losses"][0], "last": r["losses"][-1]}
        log(f"bf16 {mode}: {len(r['losses'])} steps, all per-term losses finite: {not bad}; last: "
            + ", ".join(f"{k} {v:.4g}" for k, v in r["losses"][-1].items() if k != "step"))
    return out


def section_sampling(plan, batch, patch, args, speed) -> dict:
    """In a child process with one torch thread (one data worker), see ``alice_speed.sampling_subprocess``."""
    argv = ["--plans", args.plans, "--configuration", args.configuration, "--device", "cpu",
            "--batch-size", str(batch), "--patch-size", *map(str, patch), "--sampling-synthetic",
            "--sampling-batches", str(args.sampling_batches), "--sampling-noaug"]
    if args.dataset_json:
        argv += ["--dataset-json", args.dataset_json]
    out = dict(bench.sampling_subprocess(argv))
    workers = args.workers or bench.default_workers()
    out["ratios"] = bench.ratios(speed, {k: v for k, v in out.items() if k in ("mae", "alice")}, workers)
    return out


def section_pipeline(plan, device, batch, patch, args) -> dict:
    """Alice steps fed by the real loader (forked workers; run before anything compiles)."""
    data = bench.InMemoryData(plan.describe()["median_shape"], channels=plan.channels)
    out = {}
    for w in [int(x) for x in args.pipeline_workers.split(",") if x.strip()]:
        try:
            out[str(w)] = bench.measure_pipeline(plan, device, batch, patch, data, w, args.pipeline_steps, args.warmup,
                                                 log=log)
        except Exception as e:
            out[str(w)] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            log(f"pipeline {w} FAILED: {out[str(w)]['error']}")
    return out


def section_compile(plan, device, batch, patch, args) -> dict:
    from nnunet_alice.checkpoint import load_checkpoint, network_state_dict, save_checkpoint
    from nnunet_alice.pretrain.training.step import parameter_groups, train_step
    from nnunet_alice.pretrain.training.run import build_objective
    from nnunet_alice.pretrain.training.schedules import Schedules

    out: dict = {}
    cfg = bench._pretrain_config("alice", patch, batch, device.type, True)
    total = args.compile_steps
    network = plan.pretrain_network()
    schedules = Schedules.from_config(cfg, total)
    objective = build_objective(network, cfg, schedules).to(device)
    objective.train()
    out["how"] = bench._compile_objective(objective)
    log(f"compile: {out['how']}")
    optimizer = torch.optim.AdamW(parameter_groups(objective.student_modules()), lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    data = bench.synthetic_pretrain_batch("alice", plan.channels, patch, batch, cfg, device, seed=1)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    times, losses = [], []
    try:
        for i in range(total):
            bench._sync(device)
            t0 = time.perf_counter()
            loss, terms = train_step(objective, objective, optimizer, data, i, float(schedules.lr[i]),
                                     float(schedules.weight_decay[i]), cfg.grad_clip, device, autocast_dtype=autocast)
            bench._sync(device)
            times.append(time.perf_counter() - t0)
            losses.append({"step": i, "loss": loss, **terms})
            log(f"compile: step {i + 1}/{total}: {times[-1] * 1e3:.0f} ms, loss {loss:.4g}"
                + "".join(f", {k} {v:.4g}" for k, v in terms.items()))
            if elapsed() > args.budget_s:
                log("compile: time budget reached, stopping the compiled steps")
                break
        out.update({"ok": True, "first_step_s": times[0], "step_ms_after_first": [round(t * 1e3, 1) for t in times[1:]],
                    "ms_per_step": float(np.median(times[1:])) * 1e3 if len(times) > 1 else None,
                    "losses": losses,
                    "finite": bool(all(np.isfinite(v) for l in losses for k, v in l.items() if k != "step"))})
        if out["ms_per_step"]:
            out["vol_per_s"] = batch / (out["ms_per_step"] / 1e3)
        try:
            import torch._dynamo as dynamo
            counters = dynamo.utils.counters
            out["graph_breaks"] = int(sum(counters["graph_break"].values()))
            out["unique_graphs"] = int(counters["stats"].get("unique_graphs", 0))
        except Exception:
            pass
    except Exception as e:
        out.update({"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]})
        log(f"compile FAILED: {out['error']}")

    # checkpoint from the compiled network: the runner's way and an explicit torch.compile wrapper
    ck: dict = {}
    try:
        compiled_wrapper = getattr(getattr(objective.student, "_features", None), "_run", None)
        if compiled_wrapper is None or not hasattr(compiled_wrapper, "_orig_mod"):
            compiled_wrapper = torch.compile(objective.network)
        wrapped_keys = list(compiled_wrapper.state_dict().keys())
        ck["wrapper_state_dict_has_orig_mod"] = any("_orig_mod" in k for k in wrapped_keys)
        sd_runner = network_state_dict(objective.network)
        sd = network_state_dict(compiled_wrapper)
        ck["orig_mod_in_checkpoint_keys"] = any("_orig_mod" in k for k in list(sd) + list(sd_runner))
        ck["same_keys_runner_vs_wrapper"] = sorted(sd) == sorted(sd_runner)
        ck["n_keys"] = len(sd)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "checkpoint_compiled.pth")
            save_checkpoint(path, {"network_weights": sd, "metadata": {"what": "gpu_check compiled checkpoint"}})
            ckpt = load_checkpoint(path)
            fresh = plan.pretrain_network()  # uncompiled, on the CPU
            res = fresh.load_state_dict(ckpt["network_weights"], strict=True)
            ck["strict_load"] = "ok" if not (res.missing_keys or res.unexpected_keys) else str(res)
            ref = {k: v.detach().float().cpu() for k, v in bench_unwrap(objective.network).state_dict().items()}
            ck["max_abs_diff_after_load"] = float(max((fresh.state_dict()[k].float() - ref[k]).abs().max()
                                                      for k in ref)) if ref else None
            ck["size_mb"] = round(os.path.getsize(path) / 2 ** 20, 2)
        ck["ok"] = (not ck["orig_mod_in_checkpoint_keys"]) and ck["strict_load"] == "ok" and \
            ck["max_abs_diff_after_load"] == 0.0
    except Exception as e:
        ck.update({"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]})
    log(f"checkpoint from compiled network: {ck}")
    out["checkpoint"] = ck
    return out


def bench_unwrap(m):
    from nnunet_alice.pretrain.model import unwrap
    return unwrap(m)


def main(argv=None):
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
    args = p.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rep = Report(args.out)
    rep["env"] = env_info(device)
    log(f"env: {rep.data['env']}")
    plan = bench.Plan(args.plans, args.configuration, args.dataset_json)
    batch = args.batch_size or plan.batch_size
    patch = list(args.patch_size or plan.patch_size)
    rep["plan"] = {**plan.describe(), "batch": batch, "patch": patch}
    log(f"plan: {rep.data['plan']}")

    speed = {}
    if "speed" not in skip:
        speed = section_speed(plan, device, batch, patch, args)
        rep["speed"] = speed
        rep["builder"] = plan.builder
        print("\n" + bench.format_table(speed) + "\n", flush=True)
        rep["bf16"] = section_bf16(speed)
        rep["ratios"] = bench.ratios(speed, None, 1)
    if "sampling" not in skip and elapsed() < args.budget_s:
        log("sampling (CPU, 1 thread per worker)")
        rep["sampling"] = section_sampling(plan, batch, patch, args, speed)
        rep["ratios"] = rep.data["sampling"]["ratios"]
    if "pipeline" not in skip and args.pipeline_workers and elapsed() < args.budget_s:
        log("pipeline: Alice steps fed by the loader")
        rep["pipeline"] = section_pipeline(plan, device, batch, patch, args)
    if "compile" not in skip and elapsed() < args.budget_s:
        log("compile + checkpoint")
        rep["compile"] = section_compile(plan, device, batch, patch, args)

    print("\n===== summary =====", flush=True)
    env = rep.data["env"]
    print(f"card: {env.get('device_name')} (torch {env['torch']}, CUDA {env.get('cuda')}), plan "
          f"{plan.plans_name} {plan.describe()['arch']}, patch {patch}, batch {batch}")
    if speed:
        print(bench.format_table(speed, {k: v for k, v in rep.data.get("sampling", {}).items()
                                         if k in ("mae", "alice")}))
        print(bench.format_ratios(rep.data.get("ratios", {})))
        print("bf16 finite:", {k: v.get("finite") for k, v in rep.data.get("bf16", {}).items()})
    for w, r in rep.data.get("pipeline", {}).items():
        if "error" not in r:
            print(f"Alice steps fed by the loader ({w} workers): {r['ms_per_step_with_data']:.0f} ms/step, waiting "
                  f"for data {r['ms_data_wait']:.1f} ms = {100 * r['data_wait_share']:.1f} % of a step")
    c = rep.data.get("compile")
    if c:
        ms = c.get("ms_per_step")
        print(f"compile: ok={c.get('ok')} first step {c.get('first_step_s', float('nan')):.1f} s, then "
              f"{'n/a' if ms is None else f'{ms:.1f}'} ms/step, graph breaks {c.get('graph_breaks')}; "
              f"error: {c.get('error')}")
        print(f"checkpoint from compiled net: {c.get('checkpoint')}")
    log(f"done; JSON: {rep.path}")


if __name__ == "__main__":
    main()
