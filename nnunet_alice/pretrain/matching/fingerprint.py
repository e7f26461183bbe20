"""Content fingerprints of cases and safe file names: the keys of the matchers' on-disk caches.

A cached result (a registration transform, a per-case embedding) is valid only for the exact voxels it was
computed from. The fingerprint hashes shape, spacing and a strided subsample of channel 0, so a changed or
re-preprocessed case gets a new key and its stale cache entry is recomputed instead of being reused.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Optional

import numpy as np

from nnunet_alice.checkpoint import atomic_write_bytes

#: number of voxels (about) hashed per case: enough to see any real change, cheap for big volumes
_SAMPLES = 48 ** 3


def array_fingerprint(array: np.ndarray, spacing) -> str:
    """sha256 of shape, spacing and a strided float32 subsample of a 3D array (hex)."""
    array = np.asarray(array)
    stride = max(1, int(np.ceil((array.size / _SAMPLES) ** (1.0 / 3.0))))
    sub = np.ascontiguousarray(array[::stride, ::stride, ::stride], dtype=np.float32)
    h = hashlib.sha256()
    h.update(json.dumps({"shape": list(array.shape), "spacing": [round(float(s), 6) for s in spacing],
                         "stride": stride}).encode())
    h.update(sub.tobytes())
    return h.hexdigest()


def case_fingerprint(case, channel: Optional[np.ndarray] = None) -> str:
    """Fingerprint of ``case`` (a :class:`CaseVolume`); pass ``channel`` if channel 0 is already in memory."""
    data = case.channel(0) if channel is None else channel
    return array_fingerprint(data, case.spacing)


def safe_name(case_id: str) -> str:
    """A file-name-safe version of a case id (``alice_unlabeled/x`` -> ``alice_unlabeled__x``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "__", case_id).strip(".") or "case"


def write_json_atomic(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, json.dumps(obj, indent=1).encode())


def read_json_or_none(path: str) -> Optional[Any]:
    """The parsed file, or None when it is missing, unreadable or not JSON (a corrupt cache entry)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def remove_stale(folder: str, prefix: str, keep: str) -> None:
    """Delete files ``<prefix>*`` in ``folder`` other than ``keep`` (older cache entries of the same case)."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.startswith(prefix) and name != keep and not name.startswith("."):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass
