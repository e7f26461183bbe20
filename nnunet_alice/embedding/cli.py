"""``alice_embed``: train the anatomical embedding model on a dataset's preprocessed images.

Stage before ``alice_pretrain --matcher embedding`` (the role of SAM's offline training and embedding
script in Alice, docs/method.md "Data and views"). Writes into
``$nnUNet_results/<Dataset>/AliceEmbed__<plans>__<configuration>/``: ``checkpoint_final.pth`` (+ ``.sha256``),
``loss.png`` and ``training_log.txt``; then embeds every case into the cache
``$nnUNet_preprocessed/<Dataset>/alice_embeddings/<model sha256[:16]>/`` (skip with ``--no-precompute``).
"""
from __future__ import annotations

import argparse
import datetime
import os
import time
from typing import List, Optional

from nnunet_alice.errors import AliceError, cli_main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alice_embed", description="Train Alice's anatomical embedding model "
                                "(self-supervised, SAM-style) on the preprocessed images of an nnU-Net dataset.")
    p.add_argument("-d", dest="dataset", required=True, help="dataset id or name (e.g. 501 or Dataset501_X)")
    p.add_argument("-c", dest="configuration", required=True, help="nnU-Net configuration, e.g. 3d_fullres")
    p.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("--steps", type=int, default=1000, help="training steps (default 1000)")
    p.add_argument("-device", dest="device", default="cuda", choices=["cpu", "cuda"],
                   help="device (default cuda)")
    p.add_argument("--unlabeled", nargs="*", default=[], help="extra folders of raw images (nnU-Net naming)")
    p.add_argument("--batch-size", type=int, default=1, help="volumes (view pairs) per step (default 1)")
    p.add_argument("--crop", type=int, default=None,
                   help="crop edge on the embedding grid (default: whole volumes, at most 128)")
    p.add_argument("--target-spacing", type=float, default=4.0,
                   help="embedding-grid spacing in mm, never finer than the data (default 4.0: 4 mm fine cells "
                        "like SAM's, cheap enough for CPU training)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-precompute", action="store_true", help="do not embed the cases after training")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


@cli_main
def main(argv: Optional[List[str]] = None) -> None:
    args = _parser().parse_args(argv)
    import numpy as np
    import torch

    from nnunet_alice.pretrain.data.cases import PretrainData, resolve_dataset_name
    from nnunet_alice.embedding.matcher import EmbeddingMatcher
    from nnunet_alice.embedding.model_file import model_dir, save_model, MODEL_FILE
    from nnunet_alice.embedding.train import TrainConfig, plot_history, train_embedding
    from nnunet_alice.embedding.volume import to_embedding_grid

    for name, value, low in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                             ("--crop", args.crop, 16)):
        if value is not None and value < low:
            raise AliceError(f"{name} must be >= {low}, got {value}")
    if args.target_spacing <= 0:
        raise AliceError(f"--target-spacing must be > 0, got {args.target_spacing}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise AliceError("-device cuda but no CUDA device is available; use -device cpu")
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)

    dataset = resolve_dataset_name(args.dataset)
    data = PretrainData(dataset, args.plans, args.configuration, args.unlabeled)
    out_dir = model_dir(dataset, args.plans, args.configuration)
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, "training_log.txt")

    def log(msg: str) -> None:
        line = f"{datetime.datetime.now().isoformat(timespec='seconds')} {msg}"
        with open(log_path, "a") as f:
            f.write(line + "\n")
        if args.no_progress:
            print(line, flush=True)

    log(f"alice_embed {dataset} {args.plans} {args.configuration}: {len(data.cases)} cases, steps {args.steps}, "
        f"device {args.device}")
    volumes = []
    for ref in data.cases:
        case = data.load(ref)
        volumes.append(to_embedding_grid(case.channel(0), case.spacing, args.target_spacing)[0].astype(np.float32))
    log(f"loaded {len(volumes)} volumes on the {args.target_spacing} mm embedding grid "
        f"(e.g. {volumes[0].shape})")

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    if args.crop is not None:
        cfg.pair.crop = (args.crop,) * 3
    t0 = time.perf_counter()
    net, history = train_embedding(volumes, cfg=cfg, device=args.device, progress=not args.no_progress, log=log)
    seconds = time.perf_counter() - t0
    tail = history[-min(20, len(history)):]
    info = {"target_spacing": float(args.target_spacing), "dataset_name": dataset, "plans": args.plans,
            "configuration": args.configuration,
            "training": {"config": cfg.to_dict(), "seconds": seconds, "steps": len(history),
                         "num_cases": len(volumes), "device": args.device,
                         "final_loss": float(np.mean([h["loss"] for h in tail])),
                         "loss": [float(h["loss"]) for h in history],
                         "loss_coarse": [float(h["coarse"]) for h in history],
                         "loss_fine": [float(h["fine"]) for h in history]}}
    path = os.path.join(out_dir, MODEL_FILE)
    digest = save_model(path, net, info)
    plot_history(history, os.path.join(out_dir, "loss.png"))
    log(f"saved {path} (sha256 {digest[:16]}), trained {seconds:.0f} s, "
        f"final loss {info['training']['final_loss']:.4f}")

    if not args.no_precompute:
        matcher = EmbeddingMatcher.from_model_file(path, cache_root=data.preprocessed_root, device=args.device)
        t1 = time.perf_counter()
        matcher.prepare([data.load(ref) for ref in data.cases])
        log(f"embedded {len(data.cases)} cases into {matcher.store.folder} in {time.perf_counter() - t1:.0f} s")
    print(f"alice_embed: model {path}")


if __name__ == "__main__":
    main()
