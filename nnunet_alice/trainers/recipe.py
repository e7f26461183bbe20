"""The fine-tuning recipe for pretrained weights: its settings and its learning rate per iteration.

The recipe follows nnU-Net's trainer for pretrained weights (``PretrainedTrainer`` in
https://github.com/MIC-DKFZ/nnUNet/blob/master/nnunetv2/training/nnUNetTrainer/pretraining/pretrainedTrainer.py):
SGD (momentum 0.99, Nesterov, weight decay 3e-5, as from scratch) at a **peak learning rate of 1e-3**, a linear
warm-up of the whole network, then nnU-Net's poly decay (exponent 0.9). Two differences, both for short runs:
the warm-up is counted in **iterations**, not epochs (nnU-Net steps its schedulers once per epoch, so a run of a
few epochs would start at full rate), and its length scales with the run: 10 % of all iterations (nnU-Net
master: 15 of 150 epochs), at least ``minimum`` iterations, at most ``max_fraction`` of the run, so that the
poly decay always gets the other part.

Settings (first match wins): environment variables ``nnUNet_alice_lr`` / ``nnUNet_alice_load``, then top-level
plans entries ``"alice_lr"`` / ``"alice_load_scope"``, then the defaults (1e-3, ``encoder``).
"""
from __future__ import annotations

import math
import os
from typing import Callable, Dict, Optional

from nnunet_alice.errors import AliceError

DEFAULT_LR = 1e-3
NNUNET_LR = 1e-2  # nnUNetTrainer.initial_lr: nnU-Net's own schedule from scratch
LR_ENV, LR_PLANS_KEY = "nnUNet_alice_lr", "alice_lr"
LOAD_ENV, LOAD_PLANS_KEY = "nnUNet_alice_load", "alice_load_scope"
LOAD_SCOPES = ("encoder", "all")
DEFAULT_LOAD_SCOPE = "encoder"
POLY_EXPONENT = 0.9
#: runs shorter than nnU-Net master's shortest pretrained variant (150 epochs x 250 iterations) get a note in the
#: log when the peak is the default 1e-3: in 1,000-iteration runs on the CPU demo it lost ~12 Dice to 1e-2
SHORT_RUN_ITERATIONS = 150 * 250


def short_run_note(total_iterations: int, lr_source: str) -> Optional[str]:
    """The log's advice for a short run at the default peak learning rate (``None`` when it does not apply)."""
    if lr_source != "default" or total_iterations >= SHORT_RUN_ITERATIONS:
        return None
    return (f"Alice: note: {total_iterations} iterations is short for the default peak {DEFAULT_LR:g} (the recipe "
            f"comes from runs of 150-1000 epochs); in 1,000-iteration runs on the demo, nnU-Net's own 1e-2 did "
            f"better: try -tr nnUNetTrainerAlice_nnUNetSchedule (nnU-Net's own schedule, encoder loaded) or "
            f"{LR_ENV}=1e-2 (docs/finetuning.md)")


def _setting(plans: dict, env: str, key: str):
    value = os.environ.get(env, "").strip()
    if value:
        return value, env
    if plans.get(key) not in (None, ""):
        return plans[key], f"plans entry {key!r}"
    return None, "default"


def peak_lr(plans: dict, default: float = DEFAULT_LR):
    """``(learning rate, where it came from)``; a value that is not a positive number is an error."""
    value, source = _setting(plans, LR_ENV, LR_PLANS_KEY)
    if value is None:
        return float(default), source
    try:
        lr = float(value)
    except (TypeError, ValueError):
        raise AliceError(f"{source}: learning rate must be a number, got {value!r}") from None
    if not (lr > 0 and math.isfinite(lr)):
        raise AliceError(f"{source}: learning rate must be positive, got {value!r}")
    return lr, source


def load_scope(plans: dict, default: str = DEFAULT_LOAD_SCOPE):
    """``(scope, where it came from)``: ``encoder`` (stem + encoder) or ``all`` (encoder + decoder)."""
    value, source = _setting(plans, LOAD_ENV, LOAD_PLANS_KEY)
    if value is None:
        return default, source
    scope = str(value).strip().lower()
    if scope not in LOAD_SCOPES:
        raise AliceError(f"{source}: load scope must be one of {', '.join(LOAD_SCOPES)}, got {value!r}")
    return scope, source


def warmup_iterations(total: int, fraction: float = 0.1, minimum: int = 50, max_fraction: float = 0.5) -> int:
    """Length of the linear warm-up: ``fraction`` of ``total``, at least ``minimum``, at most ``max_fraction``
    of ``total`` (and at least 1 iteration when the run has any)."""
    total = int(total)
    if total <= 0:
        return 0
    wanted = max(int(minimum), int(round(fraction * total)))
    return max(1, min(wanted, int(max_fraction * total)))


def warmup_poly(iteration: int, start: int, warmup: int, end: int) -> float:
    """Learning-rate factor in (0, 1] of a linear warm-up over ``warmup`` iterations from ``start``, then poly
    decay to 0 at ``end``. The first warm-up iteration gets 1/warmup, the last one 1 (nnU-Net's
    ``Lin_incr_LRScheduler`` rule); the first poly iteration is at 1. Iterations past ``end`` keep the last value.
    """
    length = max(1, int(end) - int(start))
    r = min(max(0, int(iteration) - int(start)), length - 1)
    warmup = max(0, min(int(warmup), length))
    if r < warmup:
        return (r + 1) / warmup
    decay = length - warmup
    return (1.0 - (r - warmup) / decay) ** POLY_EXPONENT


class PerIterationLR:
    """Sets every parameter group's learning rate for one training iteration, in the place of nnU-Net's
    per-epoch scheduler.

    ``lr_of(iteration, group_name) -> float`` gives the rate; ``iterations_per_epoch()`` is read on every
    ``step`` because nnU-Net trainers may change it after the optimizer is built. nnU-Net calls
    ``step(epoch)`` at the start of each epoch (``nnUNetTrainer.on_train_epoch_start``); the trainer calls
    :meth:`apply` before and :meth:`advance` after every training step. Nothing here needs saving: the
    iteration is recomputed from the epoch on ``--c``.
    """

    def __init__(self, optimizer, lr_of: Callable[[int, str], float], iterations_per_epoch: Callable[[], int],
                 on_change: Optional[Callable[[Dict[str, float], Dict[str, float]], None]] = None):
        self.optimizer = optimizer
        self.lr_of = lr_of
        self.iterations_per_epoch = iterations_per_epoch
        self.on_change = on_change
        self.iteration = 0
        self.current: Dict[str, float] = {}

    def step(self, epoch: Optional[int] = None) -> None:
        if epoch is not None:
            self.iteration = int(epoch) * int(self.iterations_per_epoch())
        self.apply()

    def apply(self) -> Dict[str, float]:
        rates = {}
        for i, group in enumerate(self.optimizer.param_groups):
            name = group.get("alice_group", f"group{i}")
            group["lr"] = rates[name] = float(self.lr_of(self.iteration, name))
        if self.on_change is not None:
            self.on_change(self.current, rates)
        self.current = rates
        return rates

    def advance(self) -> None:
        self.iteration += 1

    def get_last_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]
