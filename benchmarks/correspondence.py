"""Correspondence accuracy of the matchers on pairs with known ground truth (docs/correspondence.md).

Every pair (A, B) is two independent random smooth deformations (random affine + smooth elastic field) of one
base volume, so the true partner of a point of A is known exactly: ``p_b = T_B^-1(T_A(p_a))`` (T maps a
deformed volume's voxels to the base; its inverse is found by fixed-point iteration). Base volumes:

* ``mni``: nilearn's bundled MNI152 T1 template at 2 mm (``load_mni152_template(resolution=2)``, offline);
* ``ct_head``: the InVesalius head CT (Debian ``invesalius-examples``), resampled to 2 mm (skipped if absent);
* ``phantom``: a synthetic body phantom (ellipsoid organs, tubes, texture) at 2 mm.

Deformations: ``mild`` (elastic up to 6 mm), ``strong`` (12 mm), ``fov`` (mild, and every volume cropped to
its own field of view, 60-85 % of the extent per axis).

For every matcher (``intra`` = identity, no matching, i.e. the pair's misalignment; ``registration``;
``embedding``), each query point (foreground, sampled as in pretraining) is matched once and the error
``|p_b_est - p_b_true|`` is measured in mm: median, 90th percentile, fraction within 5 mm, the fraction with
score >= 0.7 (accepted by the sampler) and the median error of those, matching time per query point, and the
per-case preparation time (registration / embedding). The embedding network is trained per base on a pool
of *other* random deformations of it (never the test volumes); its training time is reported. The volumes,
deformations and query points come from ``benchmarks/pairs.py``.

From the repository root::

    python -m benchmarks.correspondence [--steps 600] [--out docs/correspondence_benchmark.md]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Dict, List

import numpy as np

from benchmarks.pairs import (SPACING, CroppedDeformation, Deformation, ct_head_base, make_pairs, make_queries,
                              mni_base, phantom_base)
from nnunet_alice.embedding.matcher import CYCLE_TOLERANCE_MM


# ---------------------------------------------------------------------------- scoring
def evaluate(matcher, pairs, queries, threshold: float = 0.7) -> Dict[str, float]:
    """Error in mm of each query's match against its true partner, the share accepted (score >= ``threshold``)
    and the time per ``match()`` call."""
    errors, scores, times = [], [], []
    for (a, b, _, _), (pa, pb) in zip(pairs, queries):
        for p, truth in zip(pa, pb):
            t0 = time.perf_counter()
            est, score = matcher.match(a, p, b)
            times.append(time.perf_counter() - t0)
            errors.append(float(np.linalg.norm((np.asarray(est) - truth) * np.asarray(b.spacing))))
            scores.append(float(score))
    e, s = np.asarray(errors), np.asarray(scores)
    acc = s >= threshold
    return {"n": len(e), "median": float(np.median(e)), "p90": float(np.percentile(e, 90)),
            "within5": float((e <= 5.0).mean()), "accepted": float(acc.mean()),
            "median_accepted": float(np.median(e[acc])) if acc.any() else float("nan"),
            "ms_per_query": 1000 * float(np.mean(times))}


# ---------------------------------------------------------------------------- the matchers
DEFORMATIONS = (("mild", 6.0, False), ("strong", 12.0, False), ("fov", 6.0, True))


def variant_suffix(args, sep: str = " ") -> str:
    """Names a training ablation (``--crop``, ``--num-hard``) in model files and matcher labels."""
    parts = [f"crop{args.crop}"] if args.crop else []
    parts += [f"hard{args.num_hard}"] if args.num_hard is not None else []
    return "".join(sep + p for p in parts)


def trained_embedding(name: str, pool: List[np.ndarray], args):
    """Train the embedding on ``pool`` (or load it from ``--model-dir`` when the same settings trained it)."""
    from nnunet_alice.embedding.model_file import load_model, save_model
    from nnunet_alice.embedding.train import TrainConfig, train_embedding

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    if args.num_hard is not None:
        cfg.num_hard = args.num_hard if args.num_hard > 0 else None
    if args.crop:
        cfg.pair.crop = (args.crop,) * 3
    path = None
    if args.model_dir:
        path = os.path.join(args.model_dir, f"{name}_steps{args.steps}_b{args.batch_size}_v{args.train_volumes}"
                            f"_s{args.seed}_g{args.target_spacing:g}{variant_suffix(args, '_')}.pth")
        if os.path.isfile(path):
            net, ckpt, _ = load_model(path)
            print(f"  embedding loaded from {path}", flush=True)
            args.loaded_models = True
            return net.eval(), float(ckpt["training"]["seconds"])
    t0 = time.perf_counter()
    net, _ = train_embedding(pool, cfg=cfg, device="cpu", progress=False,
                             log=lambda s: print("   ", s, flush=True), log_every=max(1, args.steps // 5))
    train_s = time.perf_counter() - t0
    print(f"  embedding trained in {train_s:.0f} s", flush=True)
    if path:
        save_model(path, net, {"target_spacing": args.target_spacing, "training": {"seconds": train_s}})
    return net, train_s


def training_pool(base: np.ndarray, args) -> List[np.ndarray]:
    """The embedding's training volumes: other random deformations of ``base`` ("subjects"), every other one with
    its own field of view (a crop of 60-100 % per axis), as the scans of a real data set; on the embedding grid."""
    from nnunet_alice.embedding.volume import to_embedding_grid

    rng = np.random.default_rng(args.seed + 100)
    pool = []
    for i in range(args.train_volumes):
        t = Deformation(base.shape, rng, elastic_mm=rng.uniform(4.0, 14.0))
        if i % 2:
            t = CroppedDeformation(t, rng, fraction=(0.6, 1.0))
        pool.append(to_embedding_grid(t.warp(base), SPACING, args.target_spacing)[0])
    return pool


def run_dataset(name: str, base: np.ndarray, args) -> List[Dict]:
    """Every matcher on every deformation of ``DEFORMATIONS`` chosen in ``--deformations``; one row each."""
    import torch

    from nnunet_alice.embedding.cache import EmbeddingStore
    from nnunet_alice.embedding.matcher import EmbeddingMatcher
    from nnunet_alice.pretrain.matching.intra import IntraVolumeMatcher
    from nnunet_alice.pretrain.matching.registration import RegistrationMatcher

    rows = []

    def row(deformation, matcher_name, res, prep_s=float("nan"), train_s=float("nan")):
        r = dict(dataset=name, deformation=deformation, matcher=matcher_name, prepare_s_per_case=prep_s,
                 train_s=train_s, **res)
        rows.append(r)
        print(f"  {deformation:6s} {matcher_name:26s} median {r['median']:6.2f} mm  p90 {r['p90']:6.2f} mm  "
              f"<=5mm {100 * r['within5']:5.1f}%  score>=0.7 {100 * r['accepted']:5.1f}% "
              f"(median {r['median_accepted']:.2f})  {r['ms_per_query']:.1f} ms/query  prep {prep_s:.2f} s/case",
              flush=True)

    net, train_s = trained_embedding(name, training_pool(base, args), args)

    for deformation, elastic_mm, crop in DEFORMATIONS:
        if deformation not in args.deformations:
            continue
        pairs = make_pairs(base, args.pairs, seed=args.seed + int(elastic_mm) + 100 * crop, elastic_mm=elastic_mm,
                           crop=crop)
        queries = make_queries(pairs, args.queries, seed=args.seed + 1)
        cases = [c for a, b, _, _ in pairs for c in (a, b)]

        row(deformation, "intra", evaluate(IntraVolumeMatcher(jitter=0.0), pairs, queries))

        reg = RegistrationMatcher(cache_dir=None)
        t0 = time.perf_counter()
        reg.prepare(cases)
        row(deformation, "registration", evaluate(reg, pairs, queries), (time.perf_counter() - t0) / len(cases))

        emb = EmbeddingMatcher(EmbeddingStore(net, "benchmark", args.target_spacing, root=None))
        t0 = time.perf_counter()
        with torch.no_grad():
            for case in cases:
                emb.store.refresh(case)
        prep_s = (time.perf_counter() - t0) / len(cases)
        label = "embedding" + variant_suffix(args)
        row(deformation, label, evaluate(emb, pairs, queries), prep_s, train_s)
        plain = EmbeddingMatcher(emb.store, cycle_tolerance_mm=None)      # same maps, SAM's plain score
        row(deformation, label + ", no cycle check", evaluate(plain, pairs, queries), prep_s, train_s)
    return rows


def markdown(rows: List[Dict], args, total_s: float) -> str:
    lines = [
        "# Correspondence accuracy of the matchers",
        "",
        f"Generated by `python -m benchmarks.correspondence {' '.join(args.argv)}` (steps {args.steps}, pairs "
        f"{args.pairs}, queries {args.queries}, seed {args.seed}) "
        f"in {total_s / 60:.1f} min on a {os.cpu_count()}-core CPU ({platform.machine()}, torch threads "
        f"{args.threads}), no GPU, on a machine shared with other jobs (timings are upper bounds).",
        "",
        "Each pair is two independent random deformations of one base volume at 2 mm: an affine part "
        "(rotation ±10° per axis, scale ±8 % per axis, translation ±8 mm) and a smooth elastic field "
        "(random nodes every 40 mm, cubic interpolation) with a maximum displacement of 6 mm (*mild*) or "
        "12 mm (*strong*); *fov* is the mild deformation plus a field of view of its own for every volume (a "
        "random box of 60-85 % of the extent per axis, like scans that start and stop at different "
        "levels). The true partner of every query point is known (the inverse is computed by "
        "fixed-point iteration); query points without a partner inside B are not used. Query points are "
        "foreground voxels drawn by the pretraining sampler. "
        "`intra` is the identity (no matching) and shows how far apart the pair is. `registration` is "
        "affine (similarity then affine, Mattes MI) to the first volume, composed A→ref→B. The embedding "
        "network is trained per base volume on other random deformations of it, every other one cropped to "
        "60-100 % per axis (never the test volumes): "
        "it has seen this anatomy but not these deformations, as `alice_embed` sees a dataset's own scans. "
        "`embedding` is the matcher as used in pretraining (its score is capped at 0 when the match, mapped "
        f"back B→A, lands more than {CYCLE_TOLERANCE_MM:g} mm from the query: cycle check); "
        "`embedding, no cycle check` scores the "
        "same matches with the plain mean cosine (SAM). The error columns count every query, accepted or "
        "not; `score ≥ 0.7` is the fraction the sampler would accept at the first try, and the next column "
        "the median error of those.",
        "",
        "| data | deformation | matcher | median error (mm) | p90 (mm) | within 5 mm | score ≥ 0.7 "
        "| median error if ≥ 0.7 (mm) | ms / query | prepare s / case | training s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v, fmt):
        return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, fmt)

    for r in rows:
        lines.append(f"| {r['dataset']} | {r['deformation']} | {r['matcher']} | {f(r['median'], '.2f')} "
                     f"| {f(r['p90'], '.2f')} | {f(100 * r['within5'], '.0f')} % | {f(100 * r['accepted'], '.0f')} % "
                     f"| {f(r['median_accepted'], '.2f')} | {f(r['ms_per_query'], '.1f')} "
                     f"| {f(r['prepare_s_per_case'], '.2f')} | {f(r['train_s'], '.0f')} |")
    lines.append("")
    lines.append(f"Up to {args.pairs} pairs × {args.queries} query points per data set and deformation "
                 f"(n = {', '.join(sorted({str(r['n']) for r in rows}))}). `prepare` is the per-case cost paid "
                 "once (registration to the reference / embedding the volume); `ms / query` is one "
                 "`match()` call. Embedding training: "
                 f"{args.steps} steps, batch {args.batch_size} pair(s) of "
                 f"{f'{args.crop}-cell crops' if args.crop else 'whole-volume views'} on the "
                 f"{args.target_spacing:g} mm embedding grid (the `alice_embed` defaults otherwise), "
                 f"{args.train_volumes} training volumes per base."
                 + (" The embedding models were loaded from `--model-dir`, trained by an earlier run with the "
                    "same settings; `training s` is that run's time." if getattr(args, "loaded_models", False)
                    else ""))
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["mni", "ct_head", "phantom"])
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--steps", type=int, default=600, help="embedding training steps per data set")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--target-spacing", type=float, default=4.0, help="embedding grid (as alice_embed)")
    ap.add_argument("--train-volumes", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    ap.add_argument("--deformations", nargs="+", default=[d[0] for d in DEFORMATIONS],
                    choices=[d[0] for d in DEFORMATIONS])
    ap.add_argument("--crop", type=int, default=None,
                    help="ablation: train on crops of this edge (embedding-grid cells) instead of whole volumes")
    ap.add_argument("--num-hard", type=int, default=None,
                    help="ablation: keep the k hardest fine negatives (0: all) instead of the default 128")
    ap.add_argument("--model-dir", default=None, help="keep trained embedding models here and reuse them")
    ap.add_argument("--out", default="docs/correspondence_benchmark.md")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    import torch
    torch.set_num_threads(args.threads)

    bases = {"mni": mni_base, "ct_head": ct_head_base, "phantom": phantom_base}
    rows, t0 = [], time.perf_counter()
    for name in args.datasets:
        base = bases[name]()
        if base is None:
            print(f"{name}: not available, skipped")
            continue
        print(f"{name}: base {base.shape} at 2 mm", flush=True)
        rows += run_dataset(name, base, args)
    text = markdown(rows, args, time.perf_counter() - t0)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
