"""Steps of ``alice_benchmark`` that run in their own process (like every other step, so the harness can print,
log and resume them): ``init`` writes a seed's initial weights, ``probe`` runs the linear probe of a checkpoint.

    python -m nnunet_alice.harness.steps init  -d ID -p PLANS -c CONFIG --seed S -o FILE
    python -m nnunet_alice.harness.steps probe -d ID -p PLANS -c CONFIG --checkpoint FILE --labels N --seed S \
        [--features decoder|encoder] -o FILE

Both read ``$nnUNet_preprocessed`` (the benchmark's own). ``probe`` needs ``nnunet_alice.probe.cli``.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import List, Optional

from nnunet_alice.errors import AliceError, cli_main

PROBE_MODULE = "nnunet_alice.probe.cli"


def probe_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(PROBE_MODULE) is not None
    except (ImportError, ValueError):
        return False


def _plans_and_dataset_json(dataset: str, plans: str):
    from nnunet_alice.pretrain.data.cases import resolve_dataset_name

    root = os.environ.get("nnUNet_preprocessed", "")
    folder = os.path.join(root, resolve_dataset_name(dataset))
    out = []
    for path in (os.path.join(folder, f"{plans}.json"), os.path.join(folder, "dataset.json")):
        try:
            with open(path) as f:
                out.append(json.load(f))
        except (OSError, ValueError) as e:
            raise AliceError(f"{path}: cannot read ({type(e).__name__})") from None
    return out


def write_init(dataset: str, plans: str, configuration: str, seed: int, output: str) -> str:
    from nnunet_alice.trainers.init_weights import initial_network_weights, write_init_weights

    plans_dict, dataset_json = _plans_and_dataset_json(dataset, plans)
    weights = initial_network_weights(plans_dict, configuration, dataset_json, seed)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    write_init_weights(output, weights, seed, plans, configuration)
    print(f"wrote {len(weights)} initial tensors (seed {seed}) to {output}")
    return output


def run_probe(dataset: str, plans: str, configuration: str, checkpoint: str, labels: int, seed: int,
              output: str, features: str = "decoder") -> dict:
    if not probe_available():
        raise AliceError(f"{PROBE_MODULE} is not installed")
    from nnunet_alice.probe.cli import probe_checkpoint

    result = probe_checkpoint(dataset, configuration, plans, checkpoint, labels, seed, features=features, write=False,
                              log=print)
    keep = {k: v for k, v in result.items() if isinstance(v, (int, float, str, list, dict, type(None)))}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output + ".tmp", "w") as f:
        json.dump(keep, f, indent=1, default=float)
    os.replace(output + ".tmp", output)
    print(f"probe mean Dice {result['mean_dice']:.4f} -> {output}")
    return keep


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nnunet_alice.harness.steps", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    for name in ("init", "probe"):
        s = sub.add_parser(name)
        s.add_argument("-d", dest="dataset", required=True)
        s.add_argument("-p", dest="plans", required=True)
        s.add_argument("-c", dest="configuration", required=True)
        s.add_argument("--seed", type=int, required=True)
        s.add_argument("-o", dest="output", required=True)
        if name == "probe":
            s.add_argument("--checkpoint", required=True)
            s.add_argument("--labels", type=int, required=True)
            s.add_argument("--features", choices=("decoder", "encoder"), default="decoder")
    return p


@cli_main
def main(argv: Optional[List[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    if a.step == "init":
        write_init(a.dataset, a.plans, a.configuration, a.seed, a.output)
    else:
        run_probe(a.dataset, a.plans, a.configuration, a.checkpoint, a.labels, a.seed, a.output, a.features)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
