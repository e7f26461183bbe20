"""What a checkpoint says about the network and data it was pretrained on (docs/checkpoint.md)."""
from __future__ import annotations

import copy
from typing import Any, Dict, List

from nnunet_alice.checkpoint import sha256_of_json


def configuration_digest(plans: dict, configuration: str) -> str:
    """sha256 of the *resolved* configuration (``inherits_from`` applied) of a plans dict."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cm = PlansManager(copy.deepcopy(plans)).get_configuration(configuration)
    return sha256_of_json(cm.configuration)


def architecture_of(configuration_manager) -> Dict[str, Any]:
    return {
        "network_class_name": configuration_manager.network_arch_class_name,
        "arch_kwargs": copy.deepcopy(configuration_manager.network_arch_init_kwargs),
        "arch_kwargs_requires_import": list(configuration_manager.network_arch_init_kwargs_req_import),
    }


def build_metadata(data, case_keys: List[str], config_dict: dict, step: int, total_steps: int,
                   matcher_stats: dict | None = None) -> Dict[str, Any]:
    pm, cm = data.plans_manager, data.configuration_manager
    plans = pm.plans
    meta = {
        "dataset_name": data.dataset_name,
        "plans_name": pm.plans_name,
        "configuration": data.configuration,
        "configuration_sha256": configuration_digest(plans, data.configuration),
        **architecture_of(cm),
        "num_input_channels": int(data.num_input_channels),
        "channel_names": dict(data.dataset_json.get("channel_names", {})),
        "patch_size": [int(p) for p in cm.patch_size],
        "spacing": [float(s) for s in cm.spacing],
        "normalization_schemes": list(cm.normalization_schemes),
        "use_mask_for_norm": [bool(b) for b in cm.use_mask_for_norm],
        "foreground_intensity_properties_per_channel": copy.deepcopy(
            plans.get("foreground_intensity_properties_per_channel", {})),
        "transpose_forward": [int(i) for i in plans.get("transpose_forward", [0, 1, 2])],
        "data_identifier": cm.data_identifier,
        "case_ids": list(case_keys),
        "num_cases": len(case_keys),
        "step": int(step),
        "total_steps": int(total_steps),
        "epoch": int(step) // max(1, int(config_dict.get("iterations_per_epoch", 250))),
        "objective": config_dict.get("objective"),
        "settings": config_dict,
        "matcher_stats": matcher_stats or {},
    }
    return meta
