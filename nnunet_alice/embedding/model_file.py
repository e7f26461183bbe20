"""Where the embedding model lives and its versioned checkpoint format (through ``nnunet_alice.checkpoint``).

``$nnUNet_results/<Dataset>/AliceEmbed__<plans>__<configuration>/checkpoint_final.pth`` holds::

    {"format": "nnunet_alice.embedding", "format_version": 1, "package_version": ...,
     "network_weights": state_dict, "arch": {...}, "target_spacing": mm,
     "dataset_name", "plans", "configuration", "training": {steps, seconds, final losses, ...}}

plus the ``.sha256`` sidecar written by :func:`nnunet_alice.checkpoint.save_checkpoint`; that digest is part
of the embedding-cache key, so a retrained model never reuses old embeddings.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Tuple

import torch

from nnunet_alice import __version__
from nnunet_alice.checkpoint import load_checkpoint, network_state_dict, save_checkpoint, sha256_of_file
from nnunet_alice.errors import AliceError
from nnunet_alice.paths import EMBEDDING, results_folder
from nnunet_alice.embedding.network import AnatomicalEmbeddingNet

FORMAT_NAME = "nnunet_alice.embedding"
FORMAT_VERSION = 1
MODEL_DIR_PREFIX = EMBEDDING
MODEL_FILE = "checkpoint_final.pth"


def model_dir(dataset_name: str, plans: str, configuration: str, results_root: str | None = None) -> str:
    return results_folder(MODEL_DIR_PREFIX, dataset_name, plans, configuration, results_root)


def model_path(dataset_name: str, plans: str, configuration: str, results_root: str | None = None) -> str:
    return os.path.join(model_dir(dataset_name, plans, configuration, results_root), MODEL_FILE)


def save_model(path: str, net: AnatomicalEmbeddingNet, info: Dict[str, Any]) -> str:
    """Write the versioned embedding checkpoint atomically; returns its sha256."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "package_version": __version__,
               "network_weights": network_state_dict(net), "arch": dict(net.arch)}
    payload.update(info)
    return save_checkpoint(path, payload)


def model_digest(path: str) -> str:
    """sha256 of the model file (from its sidecar when present, else computed)."""
    side = path + ".sha256"
    if os.path.isfile(side):
        with open(side) as f:
            parts = f.read().split()
        if parts:
            return parts[0]
    return sha256_of_file(path)


def load_model(path: str, device: str | torch.device = "cpu") -> Tuple[AnatomicalEmbeddingNet, Dict[str, Any], str]:
    """Load ``(network in eval mode, checkpoint dict, sha256)``; one-line AliceError on any mismatch."""
    ckpt = load_checkpoint(path, map_location="cpu")
    if ckpt.get("format") != FORMAT_NAME:
        raise AliceError(f"{path}: not an Alice embedding model (format {ckpt.get('format')!r})")
    if int(ckpt.get("format_version", -1)) > FORMAT_VERSION:
        raise AliceError(f"{path}: embedding model format version {ckpt.get('format_version')} is newer than "
                         f"this nnunet-alice ({FORMAT_VERSION}); upgrade the package")
    net = AnatomicalEmbeddingNet(ckpt["arch"])
    try:
        net.load_state_dict(ckpt["network_weights"])
    except RuntimeError as e:
        raise AliceError(f"{path}: weights do not fit the recorded architecture "
                         f"({str(e).splitlines()[0][:120]})") from None
    net.to(device).eval()
    return net, ckpt, model_digest(path)
