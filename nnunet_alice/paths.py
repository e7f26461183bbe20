"""Every results folder of the package, in nnU-Net's layout: ``$nnUNet_results/<Dataset>/<Prefix>__<plans>__<config>/``.

nnU-Net names a trainer's output ``<Trainer>__<plans>__<configuration>``; the package's own outputs follow the same
pattern with these prefixes, so they sit next to nnU-Net's and are found by the same three identifiers.
"""
from __future__ import annotations

import os
from typing import Optional

from nnunet_alice.errors import AliceError

PRETRAIN = "AlicePretrain"  # alice_pretrain checkpoints, log, progress.png
EMBEDDING = "AliceEmbed"    # alice_embed's anatomical embedding model
PROBE = "AliceProbe"        # alice_probe results of the random-init baseline


def results_root(required_for: str = "") -> str:
    root = os.environ.get("nnUNet_results")
    if not root:
        why = f" ({required_for})" if required_for else ""
        raise AliceError(f"environment variable nnUNet_results is not set{why}")
    return root


def results_folder(prefix: str, dataset_name: str, plans: str, configuration: str,
                   root: Optional[str] = None) -> str:
    """``<root>/<dataset_name>/<prefix>__<plans>__<configuration>``; ``root`` defaults to ``$nnUNet_results``."""
    if root is None:
        root = results_root(f"outputs go to $nnUNet_results/<Dataset>/{prefix}__<plans>__<configuration>/")
    return os.path.join(root, dataset_name, f"{prefix}__{plans}__{configuration}")
