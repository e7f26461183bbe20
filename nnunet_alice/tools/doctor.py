"""``alice_doctor CHECKPOINT -d ID -c CONFIG [-p PLANS]``: will this checkpoint load into that plan, and how well
does it fit? Prints the report of :mod:`nnunet_alice.doctor`; exit code 0 when it will load, 1 when it will not
(also when the checkpoint cannot be read), 2 for a usage error (unknown dataset, missing plans, ...).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from nnunet_alice.errors import AliceError, cli_main


def load_target(dataset: str, plans_name: str, configuration: str):
    """``(plans dict, dataset.json dict)`` of the target from ``$nnUNet_preprocessed``; one-line errors."""
    from nnunet_alice.pretrain.data import _nnunet_path, resolve_dataset_name

    name = resolve_dataset_name(dataset)
    root = os.path.join(_nnunet_path("nnUNet_preprocessed"), name)
    plans_file = os.path.join(root, plans_name + ".json")
    ds_file = os.path.join(root, "dataset.json")
    for f, what in ((plans_file, "plans"), (ds_file, "dataset.json")):
        if not os.path.isfile(f):
            raise AliceError(f"{f}: {what} not found; run nnUNetv2_plan_and_preprocess -d {name} (or pass the right -p)")
    try:
        with open(plans_file) as f:
            plans = json.load(f)
        with open(ds_file) as f:
            dataset_json = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise AliceError(f"{plans_file}: unreadable ({e})") from None
    available = list(plans.get("configurations", {}))
    if configuration not in available:
        raise AliceError(f"{plans_file}: unknown configuration {configuration!r} (available: {', '.join(available)})")
    return plans, dataset_json


@cli_main
def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="alice_doctor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="an alice_pretrain checkpoint (or any file with 'network_weights')")
    p.add_argument("-d", dest="dataset", required=True, help="target dataset ID or name")
    p.add_argument("-c", dest="configuration", required=True, help="target configuration, e.g. 3d_fullres")
    p.add_argument("-p", dest="plans", default="nnUNetPlans", help="target plans identifier")
    a = p.parse_args(argv)
    plans, dataset_json = load_target(a.dataset, a.plans, a.configuration)

    from nnunet_alice.checkpoint import load_checkpoint
    from nnunet_alice.doctor import diagnose

    try:
        ckpt = load_checkpoint(a.checkpoint)
    except AliceError as e:
        print(f"alice_doctor: WILL NOT LOAD: {e}")
        sys.exit(1)
    report = diagnose(ckpt, a.checkpoint, plans, a.configuration, dataset_json)
    print(report.render())
    sys.exit(0 if report.will_load else 1)


if __name__ == "__main__":
    main()
