"""Does a pretrained checkpoint fit a planned network? Lists differences instead of asserting.

Used by ``nnUNetTrainerAlice`` before it loads weights and by ``alice_doctor``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

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
