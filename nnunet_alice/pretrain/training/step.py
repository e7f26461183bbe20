"""One pretraining step, top to bottom (DINO style), and how a run is asked to stop between steps.

The loop around it (data, logging, checkpoints) is :meth:`nnunet_alice.pretrain.training.run.PretrainRun._train`.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Dict, Optional

import torch

from nnunet_alice.errors import AliceError, RunStopped
from nnunet_alice.pretrain.training import distributed as dist_utils

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
    value = float(terms.get(bad[0], total).detach())
    raise AliceError(f"non-finite loss at step {step}: term {bad[0]} = {value}{kept}")


# ---------------------------------------------------------------------------------------------- stop requests
class StopRequested(BaseException):
    """Raised by :func:`train_step` before step ``step`` when a stop signal arrived: steps < ``step`` are done."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"{signal.Signals(signum).name} before step {step}")
        self.signum = signum
        self.step = step


_stop = {"signum": None, "previous": None}


def _previous_handlers_in_child() -> None:
    """A process forked while :func:`stop_between_steps` is active (a data worker) gets the handlers from before
    it: a Python-level handler would never run while the worker is stuck in C code, so SIGTERM could not end it."""
    previous, _stop["previous"], _stop["signum"] = _stop["previous"], None, None
    for s, h in (previous or {}).items():
        try:
            signal.signal(s, h)
        except (ValueError, OSError):  # forked from a thread other than the main one: nothing to restore there
            pass


os.register_at_fork(after_in_child=_previous_handlers_in_child)


def pending_stop(device: torch.device) -> Optional[int]:
    """The signal that asked the run to stop, if any; with several processes, any one's request stops all."""
    signum = _stop["signum"]
    if dist_utils.world_size() > 1:
        import torch.distributed as dist

        flag = torch.tensor([signum or 0], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item()) or None
    return signum


@contextlib.contextmanager
def stop_between_steps(announce: Callable[[str], None] = lambda m: print(m, file=sys.stderr)):
    """While active, SIGTERM (what Slurm sends on pre-emption or time-out) and SIGINT ask the loop to stop
    before its next step; a second signal stops at once. Forked data workers keep the default behaviour."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:  # a forked worker inherited this handler: behave as if it were not there
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        name = signal.Signals(signum).name
        if _stop["signum"] is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise RunStopped(f"{name} again: stopped at once, without saving", 128 + signum)
        _stop["signum"] = signum
        announce(f"{name} received: saving a resumable checkpoint after the current step "
                 f"({'Ctrl-C' if signum == signal.SIGINT else 'send it'} again to stop at once)")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    _stop["previous"] = previous
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _stop["signum"] = _stop["previous"] = None


def train_step(objective, ddp_objective, optimizer, batch: dict, step: int, lr: float, wd: float,
               grad_clip: float, device: torch.device, autocast_dtype=None, last_good: Optional[str] = None):
    """One optimisation step. ``ddp_objective`` is the objective itself or its DDP wrapper.

    A pending stop request (:func:`stop_between_steps`) raises :class:`StopRequested` before anything changes.
    """
    signum = pending_stop(device)
    if signum:
        raise StopRequested(signum, step)
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
