"""Trainer used by ``alice_benchmark``: ``nnUNetTrainerAlice`` with a budget and a seed set from the environment.

Harness-only. nnU-Net builds trainers from a class name, so a benchmark with budget-dependent run lengths would
need one class per budget; instead this class reads its budget in ``__init__`` (``nnUNetv2_predict`` does not
use any of them, so predicting needs no environment):

``ALICE_BENCH_EPOCHS``          epochs (default 50)
``ALICE_BENCH_ITERATIONS``      training iterations per epoch (default 250, nnU-Net's)
``ALICE_BENCH_VAL_ITERATIONS``  validation iterations per epoch (default 50, nnU-Net's)
``ALICE_BENCH_SEED``            seeds python, numpy and torch before the network is built (nnU-Net has no seed
                                flag); unset: not seeded
``ALICE_BENCH_FINAL_VAL``       ``1`` runs nnU-Net's final validation of the fold's val cases; default ``0``
                                skips it, because the benchmark evaluates on held-out test cases instead

Warm-up is nnUNetTrainerAlice's rule (5 % of the epochs, at least 1, at most 50), pretrained or not, so the
scratch baseline (``nnUNet_alice_pretrained=none``) has exactly the same schedule.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from nnunet_alice.trainers.alice import nnUNetTrainerAlice

ENV_EPOCHS = "ALICE_BENCH_EPOCHS"
ENV_ITERATIONS = "ALICE_BENCH_ITERATIONS"
ENV_VAL_ITERATIONS = "ALICE_BENCH_VAL_ITERATIONS"
ENV_SEED = "ALICE_BENCH_SEED"
ENV_FINAL_VAL = "ALICE_BENCH_FINAL_VAL"


def _env_int(name: str, default):
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None
    if number < (0 if name == ENV_SEED else 1):
        raise ValueError(f"environment variable {name} must be positive, got {number}")
    return number


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class nnUNetTrainerAlice_bench(nnUNetTrainerAlice):
    """``nnUNetTrainerAlice`` with epochs / iterations / seed from ``ALICE_BENCH_*`` (see the module docstring)."""

    default_num_epochs = 50

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        self.bench_seed = _env_int(ENV_SEED, None)
        if self.bench_seed is not None:
            seed_everything(self.bench_seed)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = _env_int(ENV_EPOCHS, self.default_num_epochs)
        self.num_iterations_per_epoch = _env_int(ENV_ITERATIONS, self.num_iterations_per_epoch)
        self.num_val_iterations_per_epoch = _env_int(ENV_VAL_ITERATIONS, self.num_val_iterations_per_epoch)
        self.warmup_duration_whole_net = max(1, min(50, round(0.05 * self.num_epochs)))
        self.bench_final_validation = os.environ.get(ENV_FINAL_VAL, "0").strip() == "1"

    def on_train_start(self):
        self.print_to_log_file(f"alice_benchmark trainer: {self.num_epochs} epochs x {self.num_iterations_per_epoch} "
                               f"iterations, {self.num_val_iterations_per_epoch} val iterations, warm-up "
                               f"{self.warmup_duration_whole_net} epoch(s), seed {self.bench_seed}")
        super().on_train_start()

    def perform_actual_validation(self, save_probabilities: bool = False):
        if self.bench_final_validation:
            return super().perform_actual_validation(save_probabilities)
        self.print_to_log_file(f"alice_benchmark: final validation skipped ({ENV_FINAL_VAL}=0); the benchmark "
                               "evaluates held-out test cases with nnUNetv2_predict")
