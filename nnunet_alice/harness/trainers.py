"""Trainers used by ``alice_benchmark``: ``nnUNetTrainerAlice`` (and its sawtooth and encoder-LR variants) with a
budget, a seed, a recipe and initial weights set from the environment.

Harness-only. nnU-Net builds trainers from a class name, so a benchmark with budget-dependent run lengths would
need one class per budget; instead these classes read their settings in ``__init__`` (``nnUNetv2_predict`` does
not use any of them, so predicting needs no environment):

- ``nnUNet_alice_bench_epochs``: epochs (default 50)
- ``nnUNet_alice_bench_iterations``: training iterations per epoch (default 250, nnU-Net's)
- ``nnUNet_alice_bench_val_iterations``: validation iterations per epoch (default 50, nnU-Net's)
- ``nnUNet_alice_bench_seed``: seeds python, numpy and torch before the network is built (nnU-Net has no seed
  flag); unset: not seeded
- ``nnUNet_alice_bench_recipe``: ``pretrained`` (default): the recipe for pretrained weights (peak 1e-3,
  per-iteration warm-up, poly); ``nnunet``: nnU-Net's own schedule (SGD 1e-2, poly per epoch, no warm-up), the
  from-scratch baseline
- ``nnUNet_alice_bench_init``: a file of ``nnunet_alice.trainers.init_weights``: every tensor of the network is set
  from it before the pretrained weights (if any) are loaded on top, so that all arms of one seed start from the
  draw pretraining started from
- ``nnUNet_alice_bench_final_val``: ``1`` runs nnU-Net's final validation of the fold's val cases; default ``0``
  skips it, because the benchmark evaluates on held-out test cases instead

At the end of training the trainer writes ``learning_curve.json`` next to ``checkpoint_final.pth``: nnU-Net's
per-epoch logs (EMA and mean pseudo-Dice, training and validation loss) as plain numbers, so the harness can tell
whether a cell was still learning when its budget ran out without unpickling nnU-Net's checkpoint.

(Earlier versions named these ``ALICE_BENCH_*``; ``nnunet_alice.env`` still reads those.)
"""
from __future__ import annotations

import json
import os
import random

import numpy as np
import torch

from nnunet_alice.env import getenv
from nnunet_alice.errors import AliceError
from nnunet_alice.harness.config import CURVE_FILE
from nnunet_alice.trainers.alice import NNUNET, PRETRAINED, nnUNetTrainerAlice
from nnunet_alice.trainers.recipe import NNUNET_LR
from nnunet_alice.trainers.variants import _EncoderLRMixin, _SawtoothMixin

ENV_EPOCHS = "nnUNet_alice_bench_epochs"
ENV_ITERATIONS = "nnUNet_alice_bench_iterations"
ENV_VAL_ITERATIONS = "nnUNet_alice_bench_val_iterations"
ENV_SEED = "nnUNet_alice_bench_seed"
ENV_RECIPE = "nnUNet_alice_bench_recipe"
ENV_INIT = "nnUNet_alice_bench_init"
ENV_FINAL_VAL = "nnUNet_alice_bench_final_val"


def _env_int(name: str, default):
    value = (getenv(name) or "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        raise AliceError(f"environment variable {name} must be an integer, got {value!r}") from None
    if number < (0 if name == ENV_SEED else 1):
        raise AliceError(f"environment variable {name} must be positive, got {number}")
    return number


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


CURVE_KEYS = ("ema_fg_dice", "mean_fg_dice", "train_losses", "val_losses")


def write_learning_curve(folder: str, logging: dict) -> str:
    """``<folder>/learning_curve.json``: the per-epoch lists of nnU-Net's logger named in ``CURVE_KEYS``, as floats."""
    curve = {k: [float(v) for v in logging.get(k, [])] for k in CURVE_KEYS}
    path = os.path.join(folder, CURVE_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(curve, f)
    os.replace(path + ".tmp", path)
    return path


class _BenchMixin:
    default_num_epochs = 50

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        seed = (getenv(ENV_SEED) or "").strip()
        if seed.isdigit():
            seed_everything(int(seed))
        super().__init__(plans, configuration, fold, dataset_json, device)
        with self.refusals():
            self.bench_seed = _env_int(ENV_SEED, None)
            self.num_epochs = _env_int(ENV_EPOCHS, self.default_num_epochs)
            self.num_iterations_per_epoch = _env_int(ENV_ITERATIONS, self.num_iterations_per_epoch)
            self.num_val_iterations_per_epoch = _env_int(ENV_VAL_ITERATIONS, self.num_val_iterations_per_epoch)
            recipe = (getenv(ENV_RECIPE) or "").strip() or PRETRAINED
            if recipe not in (PRETRAINED, NNUNET):
                raise AliceError(f"environment variable {ENV_RECIPE} must be {PRETRAINED} or {NNUNET}, got {recipe!r}")
        self.recipe = recipe
        if recipe == NNUNET:
            self.initial_lr, self.lr_source = NNUNET_LR, "nnU-Net's default"
        self.bench_init = (getenv(ENV_INIT) or "").strip() or None
        self.bench_final_validation = (getenv(ENV_FINAL_VAL) or "0").strip() == "1"

    def load_alice_weights(self) -> None:
        if self.bench_init:
            from nnunet_alice.trainers.init_weights import load_init_weights
            load_init_weights(self.network, self.bench_init, include_seg_layers=True, log=self.print_to_log_file)
        super().load_alice_weights()

    def on_train_start(self):
        self.print_to_log_file(f"alice_benchmark trainer: {self.num_epochs} epochs x {self.num_iterations_per_epoch} "
                               f"iterations, {self.num_val_iterations_per_epoch} val iterations, recipe "
                               f"{self.recipe}, seed {self.bench_seed}, initial weights {self.bench_init or 'drawn'}")
        super().on_train_start()

    def on_train_end(self):
        super().on_train_end()
        if self.local_rank == 0:
            try:  # get_checkpoint(): the per-epoch lists, on nnU-Net's old logger and on its MetaLogger
                write_learning_curve(self.output_folder, self.logger.get_checkpoint())
            except (AttributeError, TypeError, ValueError, OSError) as e:  # an extra: never fails the training
                self.print_to_log_file(f"alice_benchmark: no {CURVE_FILE} ({type(e).__name__}: {e})")

    def perform_actual_validation(self, save_probabilities: bool = False):
        if self.bench_final_validation:
            return super().perform_actual_validation(save_probabilities)
        self.print_to_log_file(f"alice_benchmark: final validation skipped ({ENV_FINAL_VAL}=0); the benchmark "
                               "evaluates held-out test cases with nnUNetv2_predict")


class nnUNetTrainerAlice_bench(_BenchMixin, nnUNetTrainerAlice):
    """``nnUNetTrainerAlice`` with the ``nnUNet_alice_bench_*`` settings (see the module docstring)."""


class nnUNetTrainerAlice_sawtooth_bench(_BenchMixin, _SawtoothMixin, nnUNetTrainerAlice):
    """``nnUNetTrainerAlice_sawtooth`` with the ``nnUNet_alice_bench_*`` settings."""


class nnUNetTrainerAlice_encLR_bench(_BenchMixin, _EncoderLRMixin, nnUNetTrainerAlice):
    """``nnUNetTrainerAlice_encLR`` with the ``nnUNet_alice_bench_*`` settings."""
