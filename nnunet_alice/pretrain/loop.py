"""The pretraining loop: one step reads top to bottom; checkpoints, logs and the plot around it.

Output folder, in nnU-Net's layout: ``$nnUNet_results/<Dataset>/AlicePretrain__<plans>__<configuration>/``
with ``checkpoint_latest.pth`` (every ``save_every`` steps, with the full training state for ``--continue``),
``checkpoint_latest.prev.pth`` (the latest checkpoint before that, kept as a fall-back), ``checkpoint_final.pth``,
``training_log.txt`` and ``progress.png``. Every file is written atomically with a ``.sha256`` sidecar; before
``checkpoint_latest.pth`` is replaced, the current one (and its sidecar) is renamed to ``checkpoint_latest.prev.pth``,
so ``--continue`` still finds a good checkpoint when the newest one is damaged (docs/resume.md).
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from nnunet_alice.errors import AliceError
from nnunet_alice.pretrain import distributed as dist_utils
from nnunet_alice.pretrain.logging_utils import RunLog

PRETRAIN_PREFIX = "AlicePretrain"
LATEST = "checkpoint_latest.pth"
PREVIOUS = "checkpoint_latest.prev.pth"
FINAL = "checkpoint_final.pth"


def pretrain_output_folder(dataset_name: str, plans: str, configuration: str) -> str:
    root = os.environ.get("nnUNet_results")
    if not root:
        raise AliceError("environment variable nnUNet_results is not set")
    return os.path.join(root, dataset_name, f"{PRETRAIN_PREFIX}__{plans}__{configuration}")


def parameter_groups(modules: Dict[str, torch.nn.Module]):
    """AdamW groups: weight decay on weights, none on biases and 1-D parameters (norms, gains)."""
    decay, no_decay = [], []
    for module in modules.values():
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


def set_schedule(optimizer, lr: float, wd: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
        if g.get("apply_wd", False):
            g["weight_decay"] = wd


def finite_or_raise(total: torch.Tensor, terms: Dict[str, torch.Tensor], step: int, last_good: Optional[str]):
    if torch.isfinite(total):
        return
    bad = [k for k, v in terms.items() if not torch.isfinite(v).all()] or ["total"]
    kept = f"; last good checkpoint kept: {last_good}" if last_good else "; no checkpoint was written yet"
    raise AliceError(f"non-finite loss at step {step}: term {bad[0]} = {float(terms.get(bad[0], total).detach())}{kept}")


def train_step(objective, ddp_objective, optimizer, batch: dict, step: int, lr: float, wd: float,
               grad_clip: float, device: torch.device, autocast_dtype=None, last_good: Optional[str] = None):
    """One optimisation step. ``ddp_objective`` is the objective itself or its DDP wrapper."""
    batch = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    set_schedule(optimizer, lr, wd)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        total, terms = ddp_objective(batch, step)
    finite_or_raise(total.detach(), terms, step, last_good)
    total.backward()
    objective.before_optimizer_step(step)
    if grad_clip > 0:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        if not torch.isfinite(norm):  # a finite loss with inf/NaN gradients would poison the weights
            kept = f"; last good checkpoint kept: {last_good}" if last_good else "; no checkpoint was written yet"
            raise AliceError(f"non-finite gradient at step {step}: term grad_norm = {float(norm)}{kept}")
    optimizer.step()
    objective.after_optimizer_step(step)
    return float(total.detach()), {k: float(v.detach()) for k, v in terms.items()}


class Checkpointer:
    """Writes ``checkpoint_latest.pth``/``checkpoint_final.pth`` (rank 0 only) and knows the last good one."""

    def __init__(self, folder: str, run):
        self.folder = folder
        self.run = run
        self.last_good: Optional[str] = None

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def save(self, name: str, step: int, with_state: bool) -> None:
        if not dist_utils.is_main_process():
            return
        from nnunet_alice.checkpoint import save_checkpoint

        payload = self.run.payload(step, with_state)  # built before anything on disk changes
        if name == LATEST:
            self.keep_previous()
        save_checkpoint(self.path(name), payload)
        self.last_good = self.path(name)

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
        """Rename ``checkpoint_latest.pth`` (+ sidecar) to ``checkpoint_latest.prev.pth`` (+ sidecar).

        The sidecar moves first: a kill between the two renames leaves the old latest without a sidecar (still
        loadable, torch.load detects truncation) and the stale previous one with a mismatching digest (refused).
        """
        cur, prev = self.path(LATEST), self.path(PREVIOUS)
        if not os.path.isfile(cur):
            return
        if os.path.isfile(cur + ".sha256"):
            os.replace(cur + ".sha256", prev + ".sha256")
        elif os.path.isfile(prev + ".sha256"):
            os.remove(prev + ".sha256")
        os.replace(cur, prev)


def make_run_log(folder: str, total_steps: int, start_step: int) -> RunLog:
    return RunLog(folder, total_steps, start_step, enabled=dist_utils.is_main_process())
