"""Where does fine-tuning move the network, and does the pretrained start survive it? Stage by stage.

A linear probe reads the frozen pretrained encoder; fine-tuning then moves every weight. This compares, for each
stage of the encoder (and the decoder as a whole), four relative distances ``||a - b|| / ||b||`` over the
stage's convolution weights:

- ``scratch moved``: the scratch arm's final weights against its initial weights (``--init``);
- ``pretrained moved``: the pretrained arm's final weights against its start, i.e. ``--init`` with the
  checkpoint's load scope copied on top (what ``nnUNetTrainerAlice_bench`` does);
- ``pretraining moved``: that start against ``--init`` (pretraining began from the same draw in the harness);
- ``end gap``: the two final networks against each other, relative to the scratch arm's final weights.

If ``end gap`` stays close to ``pretraining moved``, fine-tuning kept what pretraining put there; if a stage's
``moved`` columns dwarf ``pretraining moved``, fine-tuning rewrote that stage whatever it started from.
docs/results.md has what it found on the CPU demo.

    python -m benchmarks.finetune_drift --init init_s0.pth --pretrained step1000.pth \
        --scratch SCRATCH/fold_0/checkpoint_final.pth --finetuned ALICE/fold_0/checkpoint_final.pth
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Sequence, Tuple

import torch

Weights = Dict[str, torch.Tensor]


def stage_of(key: str) -> str:
    """``encoder.stages.3.0.convs.1.conv.weight`` -> ``encoder.stages.3``; ``encoder.stem...`` ->
    ``encoder.stem``; anything in the decoder -> ``decoder``."""
    parts = key.split(".")
    if parts[0] == "encoder" and len(parts) > 2 and parts[1] == "stages":
        return ".".join(parts[:3])
    if parts[0] == "encoder" and len(parts) > 1:
        return "encoder." + parts[1]
    return parts[0]


def conv_weights(weights: Weights) -> List[str]:
    """Keys of convolution (and transposed-convolution) kernels, each tensor once: ``decoder.encoder.*`` is the
    encoder seen again through the decoder's reference to it."""
    return [k for k, v in weights.items()
            if v.is_floating_point() and v.dim() >= 3 and not k.startswith("decoder.encoder.")]


def relative_distance(a: Weights, b: Weights, keys: Sequence[str]) -> float:
    """``||a - b|| / ||b||`` over the concatenation of ``keys`` (0 when ``b`` is all zeros and ``a == b``)."""
    num = sum(float(((a[k].float() - b[k].float()) ** 2).sum()) for k in keys) ** 0.5
    den = sum(float((b[k].float() ** 2).sum()) for k in keys) ** 0.5
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def start_of_pretrained_arm(init: Weights, pretrained: Weights, scope: str) -> Weights:
    """``init`` with the checkpoint's tensors of ``scope`` copied on top, as the fine-tuning trainer loads them."""
    from nnunet_alice.trainers.pretrained import in_load_scope

    return {k: (pretrained[k] if k in pretrained and in_load_scope(k, scope) else v) for k, v in init.items()}


def drift_table(init: Weights, start: Weights, scratch: Weights, finetuned: Weights) -> List[Tuple[str, ...]]:
    """Rows ``(stage, scratch moved, pretrained moved, pretraining moved, end gap)``, stages in network order."""
    groups: Dict[str, List[str]] = {}
    for k in conv_weights(init):
        groups.setdefault(stage_of(k), []).append(k)
    missing = [k for ks in groups.values() for k in ks
               if any(k not in w for w in (start, scratch, finetuned))]
    if missing:
        raise ValueError(f"weights do not match the initial weights: {len(missing)} tensor(s) missing, e.g. "
                         f"{missing[0]}")
    return [(g, relative_distance(scratch, init, ks), relative_distance(finetuned, start, ks),
             relative_distance(start, init, ks), relative_distance(finetuned, scratch, ks))
            for g, ks in groups.items()]


def format_table(rows: Sequence[Tuple]) -> str:
    head = ("stage", "scratch moved", "pretrained moved", "pretraining moved", "end gap")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([r[0]] + [f"{x:.3f}" for x in r[1:]]) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    from nnunet_alice.checkpoint import load_checkpoint, safe_torch_load
    from nnunet_alice.errors import AliceError
    from nnunet_alice.trainers.pretrained import load_training_checkpoint

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--init", required=True, help="initial weights of the seed (nnunet_alice.trainers.init_weights)")
    p.add_argument("--pretrained", required=True, help="the alice_pretrain checkpoint the pretrained arm loaded")
    p.add_argument("--scope", default="encoder", choices=["encoder", "all"], help="its load scope")
    p.add_argument("--scratch", required=True, help="nnU-Net checkpoint_final.pth of the scratch arm")
    p.add_argument("--finetuned", required=True, help="nnU-Net checkpoint_final.pth of the pretrained arm")
    a = p.parse_args(argv)

    def weights(path: str, load) -> Weights:
        ckpt = load(path)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("network_weights"), dict):
            raise AliceError(f"{path}: no network_weights in this file")
        return ckpt["network_weights"]

    try:
        init = weights(a.init, safe_torch_load)
        start = start_of_pretrained_arm(init, weights(a.pretrained, load_checkpoint), a.scope)
        on_cpu = lambda path: load_training_checkpoint(path, "cpu")  # noqa: E731 (checkpoints trained on a GPU)
        scratch, finetuned = weights(a.scratch, on_cpu), weights(a.finetuned, on_cpu)
        rows = drift_table(init, start, scratch, finetuned)
    except (AliceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
