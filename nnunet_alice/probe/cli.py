"""``alice_probe``: did pretraining learn anatomy? A linear probe on the frozen planned network, in minutes on a CPU.

``alice_probe -d ID -c CONFIG [-p PLANS] --checkpoint FILE|random --labels K|all [--seed S]`` builds the network
nnU-Net plans for the dataset, initialises it from a checkpoint (``network_weights``; segmentation layers are not
used) or with nnU-Net's random initialisation (``random``, seeded by ``--seed``), freezes it and fits only a
linear 1×1×1 head (multinomial logistic regression, class-balanced, L-BFGS) on its per-voxel features, from
voxels sampled in K labelled training cases. It then segments the test cases by argmax and reports the mean
foreground Dice. This is the linear evaluation protocol of self-supervised learning (e.g. DINO,
arXiv 2104.14294) made dense: frozen features, a linear classifier, nothing else trained.

Features (``--features``): ``decoder`` = output of the last decoder stage (full resolution, default);
``encoder`` = all encoder stages upsampled to full resolution and concatenated. Test cases: ``imagesTs``/
``labelsTs`` preprocessed with the plan's preprocessor, else held-out training cases (see ``nnunet_alice.probe.cases``).
Prints one JSON line and writes it next to the checkpoint as ``probe_K<k>_seed<s>.json`` (for ``random``:
``$nnUNet_results/<Dataset>/AliceProbe__<plans>__<config>/``). Deterministic given the seed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_alice.errors import AliceError, cli_main
from nnunet_alice.probe.features import RANDOM, VARIANTS, WindowFeatures, build_probe_network

DEFAULT_VOXELS = 24000     # training voxels sampled in all (class-balanced, split over the K cases)
DEFAULT_STEPS = 200        # L-BFGS iterations
DEFAULT_L2 = 1e-2          # weight decay on the standardised features' weights (measured: docs/probe.md)
DEFAULT_STEP_SIZE = 1.0    # sliding-window step as a fraction of the patch: the fewest windows (nnU-Net: 0.5)
BALANCE = ("uniform", "prior")   # class prior of the head's decisions: uniform, or the K cases' frequencies
DEFAULT_BALANCE = "uniform"
RESULTS_FOLDER = "AliceProbe__{plans}__{configuration}"


# ---------------------------------------------------------------------------------------------- the head
def fit_linear_head(x: torch.Tensor, y: torch.Tensor, n_classes: int, steps: int = DEFAULT_STEPS,
                    l2: float = DEFAULT_L2, prior: Optional[torch.Tensor] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """Multinomial logistic regression on standardised features, each class weighted by 1 / its voxel count.

    The balanced fit estimates class posteriors under a uniform prior; ``prior`` (class frequencies, e.g. of the
    whole training volumes) moves them to that prior by adding ``log prior`` to the bias (Bayes' rule).
    Returns ``(weight (n_classes, C), bias (n_classes,), final loss)`` acting on the *raw* features (the
    standardisation is folded in). Zero initialisation and full-batch L-BFGS make it deterministic.
    """
    x = x.float()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    counts = torch.bincount(y, minlength=n_classes).float()
    present = counts > 0
    cw = torch.where(present, counts.sum() / (present.sum() * counts.clamp_min(1)), torch.zeros_like(counts))
    w = torch.zeros((n_classes, z.shape[1]), requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=int(steps), history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, y, weight=cw) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
        final = float(closure().detach())
    weight = (w / std).detach()
    bias = (b - (weight * mean).sum(1)).detach()
    if prior is not None:
        bias = bias + torch.log(prior.float().clamp_min(1e-12))
    return weight, bias, final


def balanced_accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Mean recall over the classes present in ``y``."""
    return float(np.mean([float((pred[y == c] == c).float().mean()) for c in torch.unique(y)]))


def dice_per_class(pred: np.ndarray, ref: np.ndarray, n_classes: int) -> List[float]:
    """Dice of foreground classes 1..n-1 (NaN where the class is absent from both); ``ref`` -1 voxels ignored."""
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

    ignore = ref < 0
    out = []
    for c in range(1, n_classes):
        tp, fp, fn, _ = compute_tp_fp_fn_tn(ref == c, pred == c, ignore)
        out.append(float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn > 0 else math.nan)
    return out


def _mean(values: Sequence[float]) -> Optional[float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else None


# ---------------------------------------------------------------------------------------------- the probe
def output_path(data, checkpoint: str, k: int, seed: int, variant: str) -> str:
    """Where the JSON goes: next to the checkpoint, or under ``$nnUNet_results`` for ``random``."""
    name = f"probe_K{k}_seed{seed}" + ("" if variant == "decoder" else f"_{variant}") + ".json"
    if checkpoint != RANDOM:
        return os.path.join(os.path.dirname(os.path.abspath(checkpoint)), name)
    root = os.environ.get("nnUNet_results")
    if not root:
        raise AliceError("environment variable nnUNet_results is not set (the random-init probe writes its result "
                         "under $nnUNet_results/<Dataset>/AliceProbe__<plans>__<config>/)")
    folder = RESULTS_FOLDER.format(plans=data.plans_name, configuration=data.configuration)
    return os.path.join(root, data.dataset_name, folder, name)


def probe_checkpoint(dataset_name: Union[str, int], configuration: str, plans: str, checkpoint: str,
                     labels: Union[int, str], seed: int = 0, features: str = "decoder",
                     voxels: int = DEFAULT_VOXELS, steps: int = DEFAULT_STEPS, step_size: float = DEFAULT_STEP_SIZE,
                     balance: str = DEFAULT_BALANCE, l2: float = DEFAULT_L2, device: str = "cpu",
                     write: bool = True, log: Optional[Callable[[str], None]] = None) -> Dict:
    """Linear-probe Dice of ``checkpoint`` (a path or ``"random"``) with ``labels`` (K or ``"all"``) labelled cases.

    Returns the result dict (``mean_dice``, per-class ``dice``, ``labels``, ``seed``, ``checkpoint``, ``sha256``,
    ``features``, cases, ...) and, with ``write``, stores it as JSON (path in ``result["output"]``). Every input
    problem raises a one-line :class:`AliceError` and leaves nothing written (the JSON is written last); those
    that need no feature (dataset, labels, K, test cases, checkpoint fit) are raised before any is computed.
    """
    from nnunet_alice import __version__
    from nnunet_alice.checkpoint import atomic_write_bytes, load_checkpoint, sha256_of_file
    from nnunet_alice.pretrain.data.cases import resolve_dataset_name
    from nnunet_alice.probe.cases import ProbeData, sample_voxels

    say = log or (lambda msg: None)
    t0 = time.time()
    if features not in VARIANTS:
        raise AliceError(f"--features: expected one of {', '.join(VARIANTS)}, got {features!r}")
    if balance not in BALANCE:
        raise AliceError(f"--balance: expected one of {', '.join(BALANCE)}, got {balance!r}")
    if voxels < 1 or steps < 1 or not 0 < step_size <= 1 or l2 < 0:
        raise AliceError(f"probe settings out of range: voxels {voxels}, steps {steps}, step size {step_size}, "
                         f"l2 {l2}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise AliceError(f"-device {device}: CUDA is not available on this machine")
    seed = int(seed)
    data = ProbeData(resolve_dataset_name(dataset_name), plans, configuration)
    k = data.resolve_k(labels)
    out_file = output_path(data, checkpoint, k, seed, features) if write else None
    loaded, sha = None, None
    if checkpoint != RANDOM:
        loaded = load_checkpoint(checkpoint)
        sha = sha256_of_file(checkpoint)
    network = build_probe_network(data.plans_manager, data.configuration_manager, data.dataset_json, checkpoint,
                                  seed, log=say, loaded=loaded)
    tap = WindowFeatures(network, features, data.configuration_manager.patch_size, step_size, device)
    n_cls = len(data.labels)
    train_cases = data.training_cases(k, seed)
    say(f"alice_probe: {data.dataset_name} {plans} {configuration}: {features} features ({tap.num_features} "
        f"channels), K={k} {train_cases}, {len(data.tests)} test cases ({data.test_source})")

    # training voxels: class-balanced per case, features Gaussian-averaged over the windows holding each voxel
    rng = np.random.default_rng(seed)
    per_class = max(1, math.ceil(voxels / (k * n_cls)))
    xs, ys = [], []
    frequency = np.zeros(n_cls)
    for case in train_cases:
        image, seg = data.load_training(case)
        classes = data.class_index(seg)
        frequency += np.bincount(classes[classes >= 0].ravel(), minlength=n_cls)[:n_cls]
        coords, y = sample_voxels(classes, per_class, rng)
        if len(y):
            xs.append(tap.gather(image, coords))
            ys.append(torch.from_numpy(y))
    y_all = torch.cat(ys) if ys else torch.zeros(0, dtype=torch.int64)
    if not bool((y_all > 0).any()):
        raise AliceError(f"{data.folder}: the {k} training case(s) {train_cases} contain no foreground voxels; "
                         f"choose more labelled cases (--labels) or another --seed")
    x_all = torch.cat(xs)
    prior = torch.from_numpy(frequency / frequency.sum()) if balance == "prior" else None
    weight, bias, loss = fit_linear_head(x_all, y_all, n_cls, steps, l2, prior=prior)
    train_acc = balanced_accuracy(torch.argmax(x_all @ weight.T + bias, 1), y_all)
    say(f"alice_probe: head fitted on {len(y_all)} voxels, loss {loss:.4f}, balanced training accuracy "
        f"{train_acc:.3f}")

    per_case: Dict[str, Dict[str, Optional[float]]] = {}
    scores = []
    for case in data.tests:
        image, seg = data.load_test(case)
        pred = torch.argmax(tap.predict(image, weight, bias), 0).numpy()
        d = dice_per_class(pred, data.class_index(seg), n_cls)
        scores.append(d)
        per_case[case.case_id] = {n: (None if math.isnan(v) else v) for n, v in zip(data.label_names[1:], d)}
        say(f"alice_probe: {case.case_id}: " + ", ".join(f"{n} {v:.3f}" for n, v in zip(data.label_names[1:], d)))
    by_class = {n: _mean([s[i] for s in scores]) for i, n in enumerate(data.label_names[1:])}
    result = {
        "mean_dice": _mean(list(by_class.values())),
        "dice": by_class,
        "labels": k,
        "seed": seed,
        "checkpoint": checkpoint if checkpoint == RANDOM else os.path.abspath(checkpoint),
        "sha256": sha,
        "features": features,
        "num_features": tap.num_features,
        "dataset": data.dataset_name,
        "plans": plans,
        "configuration": configuration,
        "train_cases": list(train_cases),
        "test_cases": [c.case_id for c in data.tests],
        "test_source": data.test_source,
        "per_case": per_case,
        "voxels": int(len(y_all)),
        "head_steps": int(steps),
        "head_loss": loss,
        "train_balanced_accuracy": train_acc,
        "balance": balance,
        "l2": float(l2),
        "step_size": float(step_size),
        "seconds": round(time.time() - t0, 1),
        "version": __version__,
        "output": out_file,
    }
    if out_file:
        os.makedirs(os.path.dirname(out_file), exist_ok=True)
        atomic_write_bytes(out_file, (json.dumps(result, sort_keys=True) + "\n").encode())
    return result


# ---------------------------------------------------------------------------------------------- CLI
@cli_main
def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="alice_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", dest="dataset", required=True, help="dataset ID or name")
    p.add_argument("-c", dest="configuration", required=True, help="configuration, e.g. 3d_fullres")
    p.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("--checkpoint", required=True, help="an alice_pretrain checkpoint, or 'random' (nnU-Net's init)")
    p.add_argument("--labels", required=True, help="number of labelled training cases K, or 'all'")
    p.add_argument("--seed", type=int, default=0, help="chooses the K cases, the voxels and the random init")
    p.add_argument("--features", choices=VARIANTS, default="decoder",
                   help="decoder: last decoder stage (default); encoder: all encoder stages upsampled")
    p.add_argument("--voxels", type=int, default=DEFAULT_VOXELS, help="training voxels sampled in all")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="L-BFGS iterations of the head")
    p.add_argument("--step-size", type=float, default=DEFAULT_STEP_SIZE, help="sliding-window step (patch fraction)")
    p.add_argument("--balance", choices=BALANCE, default=DEFAULT_BALANCE,
                   help="uniform: every class equally likely a priori, the class-balanced fit as it is (default); "
                        "prior: decide with the class frequencies of the K cases (fewer false positives of small "
                        "classes)")
    p.add_argument("--l2", type=float, default=DEFAULT_L2, help="weight decay of the head (standardised features)")
    p.add_argument("-device", dest="device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--no-write", action="store_true", help="print the JSON line only")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    a = p.parse_args(argv)
    log = None if a.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    result = probe_checkpoint(a.dataset, a.configuration, a.plans, a.checkpoint, a.labels, a.seed, a.features,
                              a.voxels, a.steps, a.step_size, a.balance, a.l2, a.device, write=not a.no_write, log=log)
    print(json.dumps(result, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
