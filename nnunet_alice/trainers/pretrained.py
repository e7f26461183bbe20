"""Find the Alice checkpoint for a trainer and load it into nnU-Net's network (encoder, or encoder + decoder).

Which checkpoint (first match wins):
1. environment variable ``nnUNet_alice_pretrained``: a file path, or ``none`` to train from scratch with the
   same schedule (a fair baseline);
2. a top-level plans entry ``"alice_pretrained_checkpoint"`` (e.g. a checkpoint pretrained on another
   dataset with the same plans);
3. the convention ``$nnUNet_results/<Dataset>/AlicePretrain__<plans>__<configuration>/checkpoint_final.pth``.

What is loaded (the *load scope*): ``encoder`` = the stem and the encoder, as nnU-Net's trainer for pretrained
weights does (https://github.com/MIC-DKFZ/nnUNet/blob/master/nnunetv2/training/nnUNetTrainer/pretraining/
pretrainedTrainer.py, "the decoder is initialized from scratch"); ``all`` = encoder and decoder. The
segmentation layers are never loaded.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from nnunet_alice.compat import architecture_differences, state_dict_differences, summarize, SEG_LAYER_TAG
from nnunet_alice.errors import AliceError

ENV_VAR = "nnUNet_alice_pretrained"
PLANS_KEY = "alice_pretrained_checkpoint"
#: state-dict prefixes of the stem + encoder in dynamic-network-architectures U-Nets (the decoder holds the
#: encoder as ``decoder.encoder``: the same tensors under a second name)
ENCODER_PREFIXES = ("encoder.", "decoder.encoder.")


def in_load_scope(key: str, scope: str) -> bool:
    """Whether a state-dict key is loaded under ``scope`` (``encoder`` or ``all``); never a segmentation layer."""
    if SEG_LAYER_TAG in key:
        return False
    if scope == "all":
        return True
    if scope == "encoder":
        return key.startswith(ENCODER_PREFIXES)
    raise AliceError(f"unknown load scope {scope!r} (encoder or all)")


def convention_path(dataset_name: str, plans_name: str, configuration: str) -> str:
    from nnunet_alice.paths import PRETRAIN, results_folder

    root = os.environ.get("nnUNet_results", "")
    return os.path.join(results_folder(PRETRAIN, dataset_name, plans_name, configuration, root), "checkpoint_final.pth")


def find_pretrained_checkpoint(plans: dict, configuration: str) -> Optional[str]:
    """Path to load, or ``None`` when the user asked for no pretraining (``nnUNet_alice_pretrained=none``)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return None if env.strip().lower() == "none" else env
    if plans.get(PLANS_KEY):
        return plans[PLANS_KEY]
    path = convention_path(plans["dataset_name"], plans["plans_name"], configuration)
    if not os.path.isfile(path):
        raise AliceError(f"no Alice checkpoint at {path}; run alice_pretrain -d {plans['dataset_name']} "
                         f"-c {configuration} -p {plans['plans_name']} first, or set {ENV_VAR}=FILE "
                         f"(or {ENV_VAR}=none to train from scratch)")
    return path


def load_pretrained_into(network: torch.nn.Module, path: str, network_class_name: str, arch_kwargs: dict,
                         num_input_channels: int, log: Callable[[str], None] = print,
                         adapt_input_channels: bool = False, checkpoint: Optional[dict] = None,
                         scope: str = "all") -> int:
    """Check compatibility, then copy the tensors of ``scope`` (see :func:`in_load_scope`). Returns their number.

    The whole non-segmentation part of the checkpoint must fit the network (also under scope ``encoder``), so a
    checkpoint of another architecture is refused whatever is loaded.

    ``adapt_input_channels``: a 1-channel checkpoint may be loaded into a network with more input channels; the
    first convolution (the network's ``keys_to_in_proj``) is repeated over the channels and scaled by 1/n. Every
    other difference stays an error. ``checkpoint``: the already loaded file (else it is loaded from ``path``).
    """
    from nnunet_alice.checkpoint import load_checkpoint, sha256_of_file
    from nnunet_alice.compat import (adapt_input_channels as adapt, channel_adaptation_problem,
                                     checkpoint_input_channels)
    from nnunet_alice.pretrain.model import unwrap

    ckpt = checkpoint if checkpoint is not None else load_checkpoint(path)
    meta = ckpt.get("metadata")
    net = unwrap(network)
    in_proj = list(getattr(net, "keys_to_in_proj", None) or [])
    src_ch = checkpoint_input_channels(meta, ckpt["network_weights"], in_proj)
    adapting = (adapt_input_channels and src_ch is not None and src_ch != int(num_input_channels)
                and channel_adaptation_problem(src_ch, int(num_input_channels), in_proj) is None)
    if meta is not None:
        diffs = architecture_differences(meta, network_class_name, arch_kwargs, num_input_channels)
        if adapting:
            diffs = [d for d in diffs if not d.startswith("num_input_channels:")]
        elif adapt_input_channels and src_ch is not None and src_ch != int(num_input_channels):
            diffs = [d if not d.startswith("num_input_channels:") else
                     f"{d} ({channel_adaptation_problem(src_ch, int(num_input_channels), in_proj)})" for d in diffs]
        if diffs:
            raise AliceError(f"{path}: checkpoint does not fit this plan: {summarize(diffs)}")
    target = net.state_dict()
    source, adapted = ckpt["network_weights"], []  # type: ignore[var-annotated]
    if adapting:
        source, adapted = adapt(source, target, in_proj)
    missing, unexpected, shapes = state_dict_differences(source, target)
    if missing or unexpected or shapes:
        diffs = [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected] + shapes
        raise AliceError(f"{path}: weights do not fit the network: {summarize(diffs)}")
    weights = {k: v for k, v in source.items() if in_load_scope(k, scope)}
    result = net.load_state_dict(weights, strict=False)
    not_loaded = [k for k in result.missing_keys if in_load_scope(k, scope)]
    if not_loaded or result.unexpected_keys:
        raise AliceError(f"{path}: load left {summarize(not_loaded + list(result.unexpected_keys))}")
    if adapted:
        n = int(num_input_channels)
        log(f"Alice: input channels adapted {src_ch} -> {n}: the first convolution ({adapted[0]}"
            f"{f' and {len(adapted) - 1} alias(es)' if len(adapted) > 1 else ''}) was repeated over the {n} "
            f"channels and scaled by 1/{n} (nnssl-style); all other tensors are loaded unchanged")
    kept = "segmentation layers" if scope == "all" else "decoder and segmentation layers"
    log(f"Alice: loaded {len(weights)} of {len(target)} tensors (load scope {scope}; {kept} keep their "
        f"initial weights) from {path} (sha256 {sha256_of_file(path)})")
    if meta is not None:
        log(f"Alice: checkpoint pretrained with objective {meta.get('objective')} for {meta.get('step')} steps on "
            f"{meta.get('num_cases')} cases of {meta.get('dataset_name')}")
    return len(weights)


def load_training_checkpoint(path: str, map_location=None) -> dict:
    """Load an nnU-Net *training* checkpoint (``--c``) with ``weights_only=True``.

    nnU-Net stores numpy scalars in its logging lists and ``_best_ema``; exactly those numpy types are allowed,
    nothing else (a pickled object that would run code is refused with a one-line error).
    """
    import numpy as np

    from nnunet_alice.checkpoint import safe_torch_load

    allowed = [np.dtype, type(np.dtype("float64")), type(np.dtype("float32")), type(np.dtype("int64"))]
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    allowed.append(scalar)
    return safe_torch_load(path, map_location, allowed_globals=allowed)
