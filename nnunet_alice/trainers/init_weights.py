"""Initial weights shared by a from-scratch run and a pretraining run, so that the two start from one draw.

A pretrained network and a network trained from scratch differ in two ways: the pretraining, and the random
draw each started from. Comparing them fairly needs the same draw for both (an init-matched design):
``initial_network_weights`` builds the fine-tuning network exactly as ``nnUNetTrainer.initialize`` does
(nnU-Net's ``build_network_architecture``, deep supervision on, the dataset's number of segmentation heads)
right after ``torch.manual_seed(seed)``; ``write_init_weights`` stores its state dict in this package's
checkpoint format (``network_weights`` in nnU-Net's key layout, loadable with ``weights_only=True``);
``load_init_weights`` puts it into a network. The fine-tuning run loads every tensor; ``alice_pretrain
--init-weights`` loads every tensor but the segmentation layers (its output layers reconstruct images and have
another shape).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from nnunet_alice.compat import SEG_LAYER_TAG, summarize
from nnunet_alice.errors import AliceError

INIT_FORMAT = "nnunet_alice.init_weights"


def initial_network_weights(plans: dict, configuration: str, dataset_json: dict, seed: int) -> Dict[str, torch.Tensor]:
    """State dict of the planned fine-tuning network drawn right after ``torch.manual_seed(seed)``."""
    import copy

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(copy.deepcopy(plans))
    cm = pm.get_configuration(configuration)
    heads = pm.get_label_manager(dataset_json).num_segmentation_heads
    channels = determine_num_input_channels(pm, cm, dataset_json)
    torch.manual_seed(int(seed))
    net = nnUNetTrainer.build_network_architecture(pm, cm, channels, heads, enable_deep_supervision=True)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def write_init_weights(path: str, weights: Dict[str, torch.Tensor], seed: int, plans_name: str,
                       configuration: str) -> str:
    from nnunet_alice.checkpoint import save_checkpoint

    return save_checkpoint(path, {"format": INIT_FORMAT, "network_weights": weights,
                                  "init": {"seed": int(seed), "plans_name": plans_name,
                                           "configuration": configuration}})


def load_init_weights(network: torch.nn.Module, path: str, include_seg_layers: bool = True,
                      log: Optional[Callable[[str], None]] = None) -> int:
    """Copy the stored initial weights into ``network`` (every tensor, or every tensor but the segmentation
    layers). Anything missing or of another shape is an error and nothing is loaded. Returns the tensor count."""
    from nnunet_alice.checkpoint import load_checkpoint
    from nnunet_alice.pretrain.model import unwrap

    ckpt = load_checkpoint(path)
    source = ckpt["network_weights"]
    net = unwrap(network)
    target = net.state_dict()
    keys = [k for k in target if include_seg_layers or SEG_LAYER_TAG not in k]
    problems = [f"missing {k}" for k in keys if k not in source]
    problems += [f"{k}: {tuple(source[k].shape)} vs {tuple(target[k].shape)}" for k in keys
                 if k in source and source[k].shape != target[k].shape]
    if problems:
        raise AliceError(f"{path}: initial weights do not fit the network: {summarize(problems)}")
    with torch.no_grad():
        for k in keys:
            target[k].copy_(source[k])
    if log is not None:
        seed = (ckpt.get("init") or {}).get("seed")
        log(f"Alice: initial weights: {len(keys)} of {len(target)} tensors from {path} (seed {seed})")
    return len(keys)
