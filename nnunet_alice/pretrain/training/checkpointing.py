"""Where a pretraining run writes, and the writer of its checkpoints.

Output folder, in nnU-Net's layout: ``$nnUNet_results/<Dataset>/AlicePretrain__<plans>__<configuration>/``
with ``checkpoint_latest.pth`` (every ``save_every`` steps, with the full training state for ``--continue``),
``checkpoint_latest.prev.pth`` (the latest checkpoint before that, kept as a fall-back), ``checkpoint_final.pth``,
``training_log.txt`` and ``progress.png``. Every file is written atomically with a ``.sha256`` sidecar; before
``checkpoint_latest.pth`` is replaced, the current one (and its sidecar) is renamed to ``checkpoint_latest.prev.pth``,
so ``--continue`` still finds a good checkpoint when the newest one is damaged (docs/resume.md).
"""
from __future__ import annotations

import os
from typing import Callable, Optional

from nnunet_alice.errors import AliceError, os_error_message
from nnunet_alice.paths import PRETRAIN, results_folder
from nnunet_alice.pretrain.training import distributed as dist_utils
from nnunet_alice.pretrain.training.progress import RunLog

LATEST = "checkpoint_latest.pth"
PREVIOUS = "checkpoint_latest.prev.pth"
FINAL = "checkpoint_final.pth"


def pretrain_output_folder(dataset_name: str, plans: str, configuration: str) -> str:
    return results_folder(PRETRAIN, dataset_name, plans, configuration)


def check_output_files(folder: str) -> None:
    """Refuse to start when something that is not a file sits where the run writes a file (it would train,
    then fail at its first save)."""
    if not os.path.isdir(folder):
        return
    from nnunet_alice.pretrain.training.progress import LOG_NAME, PLOT_NAME

    for name in (LATEST, PREVIOUS, FINAL, LOG_NAME, PLOT_NAME):
        for path in (os.path.join(folder, name), os.path.join(folder, name + ".sha256")):
            if os.path.lexists(path) and not os.path.isfile(path):
                what = "a directory" if os.path.isdir(path) else "not a regular file (a broken link?)"
                raise AliceError(f"{path}: is {what}, where the run writes a file; move it away (the run would "
                                 f"fail when it saves)")


class Checkpointer:
    """Writes ``checkpoint_latest.pth``/``checkpoint_final.pth`` (rank 0 only) and knows the last good one."""

    def __init__(self, folder: str, payload: Callable[[int, bool], dict]):
        self.folder = folder
        self.payload = payload  # (step, with_state) -> the checkpoint dict; called before anything on disk changes
        self.last_good: Optional[str] = None
        self.last_step: Optional[int] = None  # step of the last checkpoint this run wrote or resumed from

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def save(self, name: str, step: int, with_state: bool) -> None:
        """Write checkpoint ``name``; a file-system error becomes one line naming the file and the last good one."""
        if not dist_utils.is_main_process():
            return
        from nnunet_alice.checkpoint import serialise_checkpoint, write_checkpoint_bytes

        payload = self.payload(step, with_state)
        path = self.path(name)
        # serialised before the current latest is renamed: a run stopped (or failing) while serialising keeps
        # checkpoint_latest.pth where it was
        data = serialise_checkpoint(payload)
        try:
            if name == LATEST:
                self.keep_previous()
            write_checkpoint_bytes(path, data)
        except OSError as e:
            kept = f"; last good checkpoint kept: {self.last_good}" if self.last_good else ""
            raise AliceError(os_error_message(e, e.filename or path, f"writing checkpoint at step {step}") + kept) \
                from None
        self.last_good = path
        self.last_step = step

    def remove_stale_temp_files(self) -> list:
        """Delete half-written checkpoint temp files a killed run left behind (never loaded, only disk space)."""
        removed = []
        if not dist_utils.is_main_process() or not os.path.isdir(self.folder):
            return removed
        for name in os.listdir(self.folder):
            if name.startswith(".checkpoint_") and name.endswith(".tmp"):
                try:
                    os.remove(os.path.join(self.folder, name))
                    removed.append(name)
                except OSError:
                    pass
        return removed

    def keep_previous(self) -> None:
        """Rename ``checkpoint_latest.pth`` to ``checkpoint_latest.prev.pth``, with a sidecar naming the new name.

        Order: the previous sidecar is written first (digest of the current latest, file name of the previous
        one), then the latest sidecar is removed, then the file is renamed. A kill in between leaves the old
        ``prev`` with a mismatching digest (refused) and the latest without a sidecar (loaded, noted unverified).
        """
        from nnunet_alice.checkpoint import sidecar_digest, write_sidecar

        cur, prev = self.path(LATEST), self.path(PREVIOUS)
        if not os.path.isfile(cur):
            return
        digest = sidecar_digest(cur)
        if digest is not None:
            write_sidecar(prev, digest)
            os.remove(cur + ".sha256")
        elif os.path.isfile(prev + ".sha256"):
            os.remove(prev + ".sha256")
        os.replace(cur, prev)
        if self.last_good == cur:
            self.last_good = prev


def make_run_log(folder: str, total_steps: int, start_step: int) -> RunLog:
    return RunLog(folder, total_steps, start_step, enabled=dist_utils.is_main_process())
