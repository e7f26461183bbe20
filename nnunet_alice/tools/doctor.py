"""``alice_doctor CHECKPOINT -d ID -c CONFIG [-p PLANS]``: will this checkpoint load into that plan, and how well
does it fit? Prints the report of :mod:`nnunet_alice.doctor`; exit code 0 when it will load, 1 when it will not
(also when the checkpoint cannot be read), 2 for a usage error (unknown dataset, missing plans, ...).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from nnunet_alice.errors import AliceError, cli_main


def load_target(dataset: str, plans_name: str, configuration: str):
    """``(plans dict, dataset.json dict)`` of the target from ``$nnUNet_preprocessed``; one-line errors."""
    from nnunet_alice.pretrain.data import load_plans, resolve_dataset_name

    _, plans_manager, _, dataset_json = load_plans(resolve_dataset_name(dataset), plans_name, configuration)
    return plans_manager.plans, dataset_json


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
