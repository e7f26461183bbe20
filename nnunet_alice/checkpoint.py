"""Checkpoint files: atomic save, safe load, metadata. The only module that calls ``torch.save``/``torch.load``.

Format (see ``docs/checkpoint.md``): a dict of tensors and plain Python values, so that
``torch.load(path, weights_only=True)`` loads it. ``network_weights`` holds the whole planned network in
nnU-Net's own key layout, which makes the file usable with stock ``nnUNetv2_train -pretrained_weights``.
Next to every checkpoint a ``.sha256`` file records the digest of the bytes written; a file whose digest
does not match is reported as corrupt instead of being loaded.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tempfile
import warnings
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from nnunet_alice import __version__
from nnunet_alice.errors import AliceError, os_error_message

FORMAT_NAME = "nnunet_alice.checkpoint"
FORMAT_VERSION = 1


def sha256_of_json(obj: Any) -> str:
    """Digest of a JSON-serialisable object in canonical form (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sha256_of_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the mode a plain open() would
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def to_plain(obj: Any) -> Any:
    """Tensors stay; numpy scalars/arrays become Python numbers/lists; containers are converted recursively.

    This keeps every checkpoint loadable with ``weights_only=True`` (numpy objects are not allow-listed).
    """
    import numpy as np

    if isinstance(obj, np.generic):  # before the str check: np.str_ is a str subclass
        return obj.item()
    if isinstance(obj, torch.Tensor) or obj is None or type(obj) in (bool, int, float, str):
        return obj
    for plain in (bool, str, int, float):  # subclasses (enums, numpy strings) become the plain type
        if isinstance(obj, plain):
            return plain(obj)
    if isinstance(obj, dict):
        return {to_plain(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot store {type(obj).__name__} in a weights-only checkpoint")


def serialise_checkpoint(payload: Dict[str, Any]) -> bytes:
    """``payload`` as the bytes of a weights-only loadable ``.pth`` file (nothing is written)."""
    buf = io.BytesIO()
    torch.save(to_plain(payload), buf)
    return buf.getvalue()


def save_checkpoint(path: str, payload: Dict[str, Any]) -> str:
    """Serialise ``payload`` and write it atomically, then its ``.sha256`` sidecar. Returns the digest."""
    return write_checkpoint_bytes(path, serialise_checkpoint(payload))


def write_checkpoint_bytes(path: str, data: bytes) -> str:
    """Write the bytes of :func:`serialise_checkpoint` atomically, then the ``.sha256`` sidecar. Returns the digest."""
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(path, data)
    write_sidecar(path, digest)
    return digest


def write_sidecar(path: str, digest: str) -> None:
    """``<path>.sha256`` in the ``sha256sum`` format (``sha256sum -c`` works in the file's folder)."""
    atomic_write_bytes(path + ".sha256", f"{digest}  {os.path.basename(path)}\n".encode())


def sidecar_digest(path: str) -> Optional[str]:
    """The digest recorded in ``<path>.sha256``, or ``None`` when there is no sidecar."""
    side = path + ".sha256"
    if not os.path.isfile(side):
        return None
    with open(side) as f:
        parts = f.read().split()
    return parts[0] if parts else None


def _blocked_global(message: str) -> Optional[str]:
    """The line of torch's weights-only error that names a refused global, if the refusal is about one."""
    for line in (ln.strip() for ln in message.splitlines()):
        if "GLOBAL" in line or "Unsupported global" in line:
            return line
    return None


def safe_torch_load(path: str, map_location: Any = "cpu", allowed_globals: Sequence[Any] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` with every failure as a one-line :class:`AliceError` naming ``path``.

    The one place that reads ``.pth`` files. A pickle that asks for a global outside PyTorch's allow-list (plus
    ``allowed_globals``) is refused and nothing in it runs; any other unreadable content (random bytes, a cut
    archive) is reported as corrupted. Weights-only loading: https://pytorch.org/docs/stable/notes/serialization.html
    """
    if os.path.isdir(path):
        raise AliceError(f"{path}: is a directory, not a checkpoint file")
    if not os.path.lexists(path):
        raise AliceError(f"{path}: checkpoint file not found")
    try:
        with open(path, "rb") as f:  # permission, a symlink loop, I/O: said as such, not as a corrupted file
            f.read(1)
    except OSError as e:
        raise AliceError(os_error_message(e, path, "reading the checkpoint")) from None
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # the unpickler raises many types for garbage: IndexError, KeyError, ValueError, ...
        text = str(e).strip()
        blocked = _blocked_global(text) if isinstance(e, pickle.UnpicklingError) else None
        if blocked:
            raise AliceError(f"{path}: refused to load, the file contains pickled objects that are not plain "
                             f"tensors or containers ({blocked[:160]})") from None
        if isinstance(e, pickle.UnpicklingError):
            first = next((ln.strip() for ln in text.splitlines() if "nsupported" in ln), type(e).__name__)
        else:
            first = text.splitlines()[0] if text else type(e).__name__
        raise AliceError(f"{path}: not a readable checkpoint, truncated or corrupted ({first[:160]})") from None


def load_checkpoint(path: str, map_location: str | torch.device = "cpu", verify: bool = True,
                    note: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; every failure becomes a one-line :class:`AliceError`.

    With ``verify``, the bytes are checked against the ``.sha256`` sidecar; a file without one is loaded
    unverified and ``note`` (default: a Python warning) is told so.
    """
    if os.path.isdir(path):
        raise AliceError(f"{path}: is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise AliceError(f"{path}: checkpoint file not found")
    expected = sidecar_digest(path) if verify else None
    if expected is not None and sha256_of_file(path) != expected:
        raise AliceError(f"{path}: checksum mismatch with {os.path.basename(path)}.sha256 "
                         f"(the file is truncated or corrupted)")
    ckpt = safe_torch_load(path, map_location)
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise AliceError(f"{path}: not a network checkpoint (no 'network_weights' entry)")
    if verify and expected is None:
        msg = (f"{path}: no checksum sidecar ({os.path.basename(path)}.sha256), loaded unverified (damage inside "
               f"the tensors would go unnoticed)")
        if note is not None:
            note(msg)
        else:
            warnings.warn(msg, UnverifiedCheckpointWarning, stacklevel=2)
    return ckpt


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint was loaded without a ``.sha256`` sidecar to check it against."""


def network_state_dict(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """State dict of ``module`` on the CPU, unwrapped from DDP (``.module``) and torch.compile (``._orig_mod``)."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif isinstance(module, torch.nn.parallel.DistributedDataParallel):
            module = module.module
        else:
            break
    # nnU-Net registers the encoder twice (``encoder.*`` and ``decoder.encoder.*``): keep tensors that share
    # storage shared, so torch.save stores them once. ``.cpu()`` copies each GPU tensor separately, hence the memo.
    out, copies = {}, {}
    for k, v in module.state_dict().items():
        v = v.detach()
        if v.device.type != "cpu":
            view = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
            if view not in copies:
                copies[view] = v.cpu()
            v = copies[view]
        out[k] = v
    return out


def nnssl_adaptation_plan(meta: Dict[str, Any], network: torch.nn.Module) -> Dict[str, Any]:
    """The keys nnssl's adaptation plan carries (nnssl ``adaptation_plan.py``), filled from our metadata."""
    def attr(name, default=None):
        v = getattr(network, name, default)
        return list(v) if isinstance(v, tuple) else v

    return {
        "architecture_plans": {
            "arch_class_name": meta["network_class_name"].split(".")[-1],
            "arch_kwargs": meta["arch_kwargs"],
            "arch_kwargs_requiring_import": list(meta["arch_kwargs_requires_import"]),
        },
        "pretrain_plan": {
            "plans_name": meta["plans_name"],
            "configuration": meta["configuration"],
            "spacing": meta["spacing"],
            "patch_size": meta["patch_size"],
            "normalization_schemes": meta["normalization_schemes"],
            "use_mask_for_norm": meta["use_mask_for_norm"],
        },
        "pretrain_num_input_channels": meta["num_input_channels"],
        "recommended_downstream_patchsize": meta["patch_size"],
        "key_to_encoder": attr("key_to_encoder", "encoder.stages"),
        "key_to_stem": attr("key_to_stem", "encoder.stages.0"),
        "keys_to_in_proj": attr("keys_to_in_proj", []),
        "key_to_lpe": attr("key_to_lpe", None),
    }


def make_payload(network_weights: Dict[str, torch.Tensor], metadata: Dict[str, Any],
                 adaptation_plan: Dict[str, Any], training_state: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "network_weights": network_weights,
        "metadata": metadata,
        "nnssl_adaptation_plan": adaptation_plan,
    }
    if training_state is not None:
        payload["training_state"] = training_state
    return payload
