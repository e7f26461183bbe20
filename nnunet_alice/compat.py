"""Does a pretrained checkpoint fit a planned network? Lists differences instead of asserting.

Used by ``nnUNetTrainerAlice`` before it loads weights and by ``alice_doctor``. The one difference that is
adapted instead of reported is the number of input channels of a 1-channel checkpoint (:func:`adapt_input_channels`).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

SEG_LAYER_TAG = ".seg_layers."


def _diff(prefix: str, a: Any, b: Any, out: List[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a:
                out.append(f"{prefix}.{k}: missing in checkpoint, plan has {b[k]!r}")
            elif k not in b:
                out.append(f"{prefix}.{k}: checkpoint has {a[k]!r}, missing in plan")
            else:
                _diff(f"{prefix}.{k}", a[k], b[k], out)
        return
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = [list(x) if isinstance(x, tuple) else x for x in a], [list(x) if isinstance(x, tuple) else x for x in b]
    if a != b:
        out.append(f"{prefix}: checkpoint {a!r} vs plan {b!r}")


def architecture_differences(meta: Dict[str, Any], network_class_name: str, arch_kwargs: Dict[str, Any],
                             num_input_channels: int) -> List[str]:
    """Human-readable differences between checkpoint metadata and a target plan (empty list: compatible)."""
    out: List[str] = []
    if meta.get("network_class_name") != network_class_name:
        out.append(f"network_class_name: checkpoint {meta.get('network_class_name')!r} vs plan {network_class_name!r}")
    _diff("arch_kwargs", meta.get("arch_kwargs", {}), arch_kwargs, out)
    if int(meta.get("num_input_channels", -1)) != int(num_input_channels):
        out.append(f"num_input_channels: checkpoint {meta.get('num_input_channels')} vs dataset {num_input_channels}")
    return out


def state_dict_differences(source: Dict[str, torch.Tensor], target: Dict[str, torch.Tensor]
                           ) -> Tuple[List[str], List[str], List[str]]:
    """(missing in source, unexpected in source, shape mismatches) over all keys except segmentation layers."""
    src = {k: v for k, v in source.items() if SEG_LAYER_TAG not in k}
    tgt = {k: v for k, v in target.items() if SEG_LAYER_TAG not in k}
    missing = sorted(set(tgt) - set(src))
    unexpected = sorted(set(src) - set(tgt))
    shapes = [f"{k}: checkpoint {tuple(src[k].shape)} vs network {tuple(tgt[k].shape)}"
              for k in sorted(set(src) & set(tgt)) if tuple(src[k].shape) != tuple(tgt[k].shape)]
    return missing, unexpected, shapes


def summarize(diffs: List[str], limit: int = 6) -> str:
    more = f"; ... and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


# ---------------------------------------------------------------------------------------------- input channels
def in_proj_weight_keys(keys_to_in_proj: Sequence[str], state_keys: Iterable[str]) -> List[str]:
    """State-dict keys of the input projection's weight: ``<key>.weight`` for each ``keys_to_in_proj`` entry,
    also where the module is registered a second time under a prefix (nnU-Net's ``decoder.encoder.*``)."""
    suffixes = [f"{p}.weight" for p in keys_to_in_proj]
    return [k for k in state_keys if any(k == s or k.endswith("." + s) for s in suffixes)]


def checkpoint_input_channels(meta: Optional[Dict[str, Any]], weights: Dict[str, torch.Tensor],
                              keys_to_in_proj: Sequence[str]) -> Optional[int]:
    """Input channels of a checkpoint: its metadata, else the input projection's weight shape."""
    if meta and meta.get("num_input_channels") is not None:
        return int(meta["num_input_channels"])
    keys = in_proj_weight_keys(keys_to_in_proj, weights)
    return int(weights[keys[0]].shape[1]) if keys and weights[keys[0]].ndim >= 2 else None


def channel_adaptation_problem(source_channels: Optional[int], target_channels: int,
                               keys_to_in_proj: Sequence[str]) -> Optional[str]:
    """``None`` if a ``source_channels`` checkpoint can be adapted to ``target_channels`` (1 → n), else why not."""
    if source_channels is None or source_channels == target_channels:
        return None if source_channels is not None else "the checkpoint's number of input channels is unknown"
    if source_channels != 1:
        return (f"only 1-channel checkpoints can be adapted to more channels; this one has {source_channels} "
                f"and the dataset {target_channels}")
    if not keys_to_in_proj:
        return "the network names no input projection (keys_to_in_proj), so its first convolution cannot be adapted"
    return None


def adapt_input_channels(source: Dict[str, torch.Tensor], target: Dict[str, torch.Tensor],
                         keys_to_in_proj: Sequence[str]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Repeat a 1-channel input projection over the target's channels, scaled by 1/n (nnssl-style).

    The sum over the new channels of the adapted filter equals the pretrained filter, so an image repeated over
    all channels gives the pretrained activations. Returns ``(new source dict, adapted keys)``; keys whose
    shapes cannot be adapted (anything but input channels 1 → n) are left for the shape check to report.
    """
    out, adapted = dict(source), []
    for k in in_proj_weight_keys(keys_to_in_proj, source):
        if k not in target:
            continue
        s, t = source[k], target[k]
        if s.ndim < 2 or s.shape[1] != 1 or t.shape[1] == 1 or s.shape[:1] + s.shape[2:] != t.shape[:1] + t.shape[2:]:
            continue
        n = int(t.shape[1])
        out[k] = s.repeat(1, n, *([1] * (s.ndim - 2))) / n
        adapted.append(k)
    return out, adapted
