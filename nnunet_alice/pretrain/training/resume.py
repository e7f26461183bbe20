"""What ``alice_pretrain --continue`` accepts: which checkpoint, how far, and with which settings (docs/resume.md).

A resumed run reproduces an uninterrupted one only with the same settings, so a change of a setting that
changes the computation (learning rate, patch or batch size, masking, objective, ...) is refused unless
asked for (``--allow-settings-change``); an accepted change, and a change of the run's length, is recorded
in the checkpoint's ``metadata.settings_history``. A checkpoint past the asked length is refused: continuing
it would wind the step counter back.
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

from nnunet_alice.errors import AliceError
from nnunet_alice.pretrain.training.checkpointing import LATEST, PREVIOUS

# settings that do not change what is computed; a resumed run may change them freely
RESUME_FREE_SETTINGS = ("device", "num_workers", "save_every", "log_every", "compile", "data_timeout")
# the run's length: may change on --continue (the schedules are then laid out for the new length)
LENGTH_SETTINGS = ("steps", "epochs", "iterations_per_epoch")


def resume_candidates(folder: str) -> List[str]:
    """Checkpoints ``--continue`` may use, newest first; raises when there is none."""
    found = [os.path.join(folder, n) for n in (LATEST, PREVIOUS) if os.path.isfile(os.path.join(folder, n))]
    if not found:
        raise AliceError(f"{os.path.join(folder, LATEST)}: --continue given but there is no checkpoint to continue "
                         f"from (drop --continue to start a new run)")
    return found


def settings_diff(saved: dict, current: dict) -> Dict[str, Tuple]:
    """``{key: (saved, current)}`` for every setting known to both (except :data:`RESUME_FREE_SETTINGS`) that
    changed. A key only one side has (a setting of another package version) is not a change."""
    out = {}
    for k in sorted(set(saved) & set(current)):
        if k in RESUME_FREE_SETTINGS:
            continue
        a, b = saved[k], current[k]
        if isinstance(a, tuple):
            a = list(a)
        if isinstance(b, tuple):
            b = list(b)
        if a != b:
            out[k] = (a, b)
    return out


def _describe(diff: Dict[str, Tuple]) -> str:
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())


def settings_changes(saved: dict, current: dict) -> List[str]:
    """``key: saved -> current`` for every setting (except :data:`RESUME_FREE_SETTINGS`) that changed."""
    return [f"{k}: {a!r} -> {b!r}" for k, (a, b) in settings_diff(saved, current).items()]


def check_resumable(path: str, metadata: dict, step: int, total_steps: int, settings: dict,
                    allow_settings_change: bool) -> Tuple[List[dict], List[str]]:
    """Refuse (one line, nothing written) a resume that would wind the run back or silently change it.

    Returns the settings history to record (the checkpoint's, plus this resume's changes) and notes for the log.
    """
    if step > total_steps:
        raise AliceError(f"{path}: the checkpoint is at step {step}, past the {total_steps} steps asked for; "
                         f"give --steps {step} or more to continue it (nothing was changed)")
    diff = settings_diff(metadata.get("settings", {}), settings)
    computing = {k: v for k, v in diff.items() if k not in LENGTH_SETTINGS}
    if computing and not allow_settings_change:
        raise AliceError(f"{path}: --continue with settings that change the computation ({_describe(computing)}); "
                         f"use the checkpoint's settings, or add --allow-settings-change to continue and record "
                         f"the change in the checkpoint")
    history = list(metadata.get("settings_history", []))
    notes = []
    if diff:
        history.append({"step": int(step), "changes": {k: [a, b] for k, (a, b) in diff.items()}})
        length = any(k in LENGTH_SETTINGS for k in diff)
        notes.append(f"settings changed at step {step}, recorded in metadata.settings_history: {_describe(diff)}"
                     + (f" (schedules now laid out for {total_steps} steps)" if length else ""))
    return history, notes
