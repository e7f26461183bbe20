"""Which loss term moves the encoder, and in which direction? Per-term gradients of an Alice checkpoint.

Alice's objective (arXiv 2302.05615, Eq. 3) sums a CLS term (Eq. 1), the CASA token term (Eq. 2) and masked image
reconstruction, plus KoLeo here (DINOv2, arXiv 2304.07193). The encoder is what fine-tuning receives
(``nnUNet_alice_load=encoder``), so this measures, on real training batches of a run, the gradient each weighted
term sends into the planned network's encoder: its norm, and the cosine between the terms' gradients (a term
whose gradient opposes the reconstruction's works against it). Nothing is trained and nothing is written next
to the checkpoint: the run is resumed in a temporary copy of its folder.

    python -m benchmarks.term_gradients CHECKPOINT --batches 8 -- -d 990 -p PLANS -c 3d_fullres [pretrain args]

The arguments after ``--`` are ``alice_pretrain``'s, as the run was started (``--continue`` is added).
"""
from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import tempfile

import torch

WEIGHTS = {"cls": "lambda_cls", "casa": "lambda_casa", "recon": "lambda_recon", "koleo": "koleo_weight"}


def term_gradients(objective, batch: dict, step: int, params) -> dict:
    """{term: flattened gradient of its weighted loss w.r.t. ``params``} for one batch (no optimiser step)."""
    cfg = objective.config
    objective.zero_grad(set_to_none=True)
    _, terms = objective(batch, step)
    present = [k for k in WEIGHTS if k in terms and float(getattr(cfg, WEIGHTS[k])) > 0]
    out = {}
    for i, k in enumerate(present):
        loss = float(getattr(cfg, WEIGHTS[k])) * terms[k]
        grads = torch.autograd.grad(loss, params, retain_graph=i < len(present) - 1, allow_unused=True)
        out[k] = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])
    return out


def summarise(per_batch: list) -> dict:
    """Mean gradient norm per term, and mean pairwise cosine, over batches."""
    names = list(per_batch[0])
    norms = {k: sum(float(g[k].norm()) for g in per_batch) / len(per_batch) for k in names}
    cos = {}
    for a, b in itertools.combinations(names, 2):
        cos[f"{a}~{b}"] = sum(float(torch.nn.functional.cosine_similarity(g[a], g[b], dim=0)) for g in per_batch) \
            / len(per_batch)
    return {"norm": norms, "cos": cos}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint_latest.pth (with training state) of an alice_pretrain run")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--params", choices=("encoder", "head"), default="encoder",
                   help="the planned network's encoder (what fine-tuning loads) or the DINO head the terms share")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, rest = p.parse_args(argv[:cut]), argv[cut + 1:]

    from nnunet_alice.pretrain.cli import build_parser, config_from_args
    from nnunet_alice.pretrain.data.views import make_loader
    from nnunet_alice.pretrain.training.checkpointing import LATEST
    from nnunet_alice.pretrain.training.run import PretrainRun

    config = config_from_args(build_parser().parse_args(rest + ["--continue"]))
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(args.checkpoint, os.path.join(tmp, LATEST))
        run = PretrainRun(config, resume=True, output_folder=tmp, allow_settings_change=True)
        objective = run.objective.train()
        module = objective.student.network.encoder if args.params == "encoder" else objective.student.head
        params = [q for q in module.parameters() if q.requires_grad]
        loader = make_loader(run.sampler, 0, config.seed)
        try:
            per_batch = [term_gradients(objective, next(loader), run.start_step, params)
                         for _ in range(args.batches)]
        finally:
            loader.close()
    s = summarise(per_batch)
    print(f"{args.params} gradients at step {run.start_step}, {args.batches} batches ({config.objective}):")
    print("  norm of the weighted term's gradient: " + ", ".join(f"{k} {v:.3g}" for k, v in s["norm"].items()))
    print("  cosine between terms: " + ", ".join(f"{k} {v:+.3f}" for k, v in s["cos"].items()))


if __name__ == "__main__":
    main()
