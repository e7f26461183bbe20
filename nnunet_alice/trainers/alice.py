"""``nnUNetTrainerAlice``: nnU-Net's trainer, initialised from an Alice checkpoint, fine-tuned with the recipe for
pretrained weights (``nnunet_alice.trainers.recipe``: SGD at peak 1e-3, per-iteration linear warm-up, poly).

A subclass of nnU-Net's ``nnUNetTrainer`` that changes only these things: the optimizer and a per-iteration
learning rate (``configure_optimizers``, ``train_step``), the pretrained weights loaded at epoch 0 (never on
``--c``) after the ``alice_doctor`` summary is printed (stem + encoder by default, see the load scope; a 1-channel
checkpoint is adapted to more input channels), ``--c`` loading nnU-Net's checkpoint with ``weights_only=True``,
and refusals (``AliceError``: a missing or incompatible checkpoint, a bad setting) written as one line to the
training log and to stderr, then exit code 2. The network is built by nnU-Net's own builder, so
``nnUNetv2_predict`` needs nothing from this package but the class name. Other schedules (sawtooth, frozen
encoder, lower encoder LR): ``nnunet_alice.trainers.variants`` and docs/finetuning.md.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Dict, Optional, Union

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_alice.errors import AliceError
from nnunet_alice.pretrain.model import unwrap
from nnunet_alice.trainers.pretrained import find_pretrained_checkpoint, load_pretrained_into, load_training_checkpoint
from nnunet_alice.trainers.recipe import (PerIterationLR, load_scope, peak_lr, short_run_note, warmup_iterations,
                                          warmup_poly)

#: ``recipe`` values: the recipe for pretrained weights, or nnU-Net's own (its per-epoch poly at ``initial_lr``)
PRETRAINED, NNUNET = "pretrained", "nnunet"


class nnUNetTrainerAlice(nnUNetTrainer):
    """Fine-tunes the planned network from an Alice checkpoint with the recipe for pretrained weights."""

    default_num_epochs = 1000
    warmup_fraction = 0.1          # of all training iterations
    warmup_min_iterations = 50
    warmup_max_fraction = 0.5      # the poly decay always gets at least the other half

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.default_num_epochs
        self.recipe = PRETRAINED
        with self.refusals():
            self.initial_lr, self.lr_source = peak_lr(self.plans_manager.plans)
            self.load_scope, self.load_scope_source = load_scope(self.plans_manager.plans)
        self.alice_checkpoint: Optional[str] = None
        self.alice_tensors_loaded = 0

    # ------------------------------------------------------------------ refusals
    @contextlib.contextmanager
    def refusals(self):
        """An ``AliceError`` inside becomes one ``error:`` line in the training log and on stderr, then exit 2."""
        try:
            yield
        except AliceError as e:
            msg = " ".join(str(e).splitlines())
            self.print_to_log_file(f"error: {msg}", also_print_to_console=False)
            print(f"error: {msg}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    # ------------------------------------------------------------------ the learning rate
    def total_iterations(self) -> int:
        return int(self.num_epochs) * int(self.num_iterations_per_epoch)

    def warmup_length(self) -> int:
        return warmup_iterations(self.total_iterations(), self.warmup_fraction, self.warmup_min_iterations,
                                 self.warmup_max_fraction)

    def lr_factor(self, iteration: int, group: str) -> float:
        """Fraction of the peak learning rate for ``group`` at ``iteration``: warm-up, then poly (one group)."""
        return warmup_poly(iteration, 0, self.warmup_length(), self.total_iterations())

    def lr_of(self, iteration: int, group: str) -> float:
        return float(self.initial_lr) * float(self.lr_factor(iteration, group))

    def parameter_groups(self):
        return [{"params": list(unwrap(self.network).parameters()), "alice_group": "all"}]

    def configure_optimizers(self):
        if self.recipe == NNUNET:
            return super().configure_optimizers()
        optimizer = torch.optim.SGD(self.parameter_groups(), self.initial_lr, weight_decay=self.weight_decay,
                                    momentum=0.99, nesterov=True)
        return optimizer, PerIterationLR(optimizer, self.lr_of, lambda: self.num_iterations_per_epoch,
                                         self.on_lr_change)

    def train_step(self, batch: dict) -> dict:
        per_iteration = isinstance(self.lr_scheduler, PerIterationLR)
        if per_iteration:
            self.lr_scheduler.apply()
        out = super().train_step(batch)
        if per_iteration:
            self.lr_scheduler.advance()
        return out

    def on_train_epoch_start(self):
        super().on_train_epoch_start()  # nnU-Net: lr_scheduler.step(epoch) = the rate of the epoch's 1st iteration
        if isinstance(self.lr_scheduler, PerIterationLR) and len(self.lr_scheduler.current) > 1:
            self.print_to_log_file("Alice: learning rates " + ", ".join(
                f"{k} {v:.5g}" for k, v in self.lr_scheduler.current.items()))

    def on_lr_change(self, old: Dict[str, float], new: Dict[str, float]) -> None:
        """A group at learning rate 0 is frozen: no gradient (``requires_grad=False``: no weight decay, not in
        the gradient clipping, no backward through it). Under DDP the parameter set must not change, so there
        the rate alone freezes it. Unfreezing drops the momentum gathered before."""
        for group in self.optimizer.param_groups:
            name = group.get("alice_group")
            frozen, was_frozen = new.get(name) == 0.0, old.get(name) == 0.0
            if frozen == was_frozen and old:
                continue
            if not self.is_ddp:
                for p in group["params"]:
                    p.requires_grad_(not frozen)
            if frozen and not was_frozen:
                self.print_to_log_file(f"Alice: {name} frozen from iteration {self.lr_scheduler.iteration}")
            elif was_frozen and not frozen:
                dropped = sum(self.optimizer.state.get(p, {}).pop("momentum_buffer", None) is not None
                              for p in group["params"])
                self.print_to_log_file(f"Alice: {name} unfrozen at iteration {self.lr_scheduler.iteration}"
                                       + (f" ({dropped} momentum buffers dropped)" if dropped else ""))

    def describe_schedule(self) -> str:
        return (f"linear warm-up over {self.warmup_length()} of {self.total_iterations()} iterations, "
                f"then poly decay")

    def log_recipe(self) -> None:
        run = f"{self.num_epochs} epochs x {self.num_iterations_per_epoch} iterations"
        if self.recipe == NNUNET:
            self.print_to_log_file(f"Alice: nnU-Net's own schedule: SGD at {self.initial_lr:g} ({self.lr_source}), "
                                   f"poly decay per epoch, no warm-up ({run}); load scope {self.load_scope} "
                                   f"({self.load_scope_source})")
            return
        self.print_to_log_file(f"Alice: recipe for pretrained weights: SGD (momentum 0.99, Nesterov, weight decay "
                               f"{self.weight_decay:g}), peak learning rate {self.initial_lr:g} ({self.lr_source}), "
                               f"{self.describe_schedule()} ({run}), learning rate set every iteration; load "
                               f"scope {self.load_scope} ({self.load_scope_source})")
        note = short_run_note(self.total_iterations(), self.lr_source)
        if note:
            self.print_to_log_file(note)

    # ------------------------------------------------------------------ loading
    def on_train_start(self):
        with self.refusals():
            if not self.was_initialized:
                self.initialize()
            if self.current_epoch == 0:
                self.load_alice_weights()
            else:
                self.print_to_log_file(f"Alice: resuming at epoch {self.current_epoch}; pretrained weights not "
                                       f"reloaded")
        self.log_recipe()
        super().on_train_start()

    def load_alice_weights(self) -> None:
        """Print the ``alice_doctor`` summary, then load the load scope (input channels 1 -> n adapted)."""
        from nnunet_alice.checkpoint import load_checkpoint
        from nnunet_alice.doctor import diagnose

        path = find_pretrained_checkpoint(self.plans_manager.plans, self.configuration_name)
        if path is None:
            self.print_to_log_file("Alice: nnUNet_alice_pretrained=none: no pretrained weights loaded")
            return
        ckpt = load_checkpoint(path)
        net = unwrap(self.network)
        report = diagnose(ckpt, path, self.plans_manager.plans, self.configuration_name, self.dataset_json,
                          target_state=net.state_dict(), keys_to_in_proj=getattr(net, "keys_to_in_proj", ()))
        for line in report.summary_lines():
            self.print_to_log_file(line)
        cm = self.configuration_manager
        self.alice_tensors_loaded = load_pretrained_into(
            self.network, path, cm.network_arch_class_name, cm.network_arch_init_kwargs, self.num_input_channels,
            log=self.print_to_log_file, adapt_input_channels=True, checkpoint=ckpt, scope=self.load_scope)
        self.alice_checkpoint = path

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        """``--c``: nnU-Net's checkpoint loaded with ``weights_only=True`` (numpy scalars allowed); the optimizer
        (same parameter groups for the whole run) gets its state back, the learning rate follows from the epoch."""
        with self.refusals():
            if not self.was_initialized:
                self.initialize()
            if isinstance(filename_or_checkpoint, str):
                checkpoint = load_training_checkpoint(filename_or_checkpoint, map_location=self.device)
            else:
                checkpoint = filename_or_checkpoint
            net = unwrap(self.network)
            own = net.state_dict()
            weights = {(k[7:] if k not in own and k.startswith("module.") else k): v
                       for k, v in checkpoint["network_weights"].items()}
            self.my_init_kwargs = checkpoint["init_args"]
            self.current_epoch = checkpoint["current_epoch"]
            self.logger.load_checkpoint(checkpoint["logging"])
            self._best_ema = checkpoint["_best_ema"]
            if "inference_allowed_mirroring_axes" in checkpoint:
                self.inference_allowed_mirroring_axes = checkpoint["inference_allowed_mirroring_axes"]
            net.load_state_dict(weights)
            try:
                self.optimizer.load_state_dict(checkpoint["optimizer_state"])
            except (ValueError, KeyError) as e:
                name = filename_or_checkpoint if isinstance(filename_or_checkpoint, str) else "checkpoint"
                raise AliceError(f"{name}: optimizer state does not fit this trainer's parameter groups "
                                 f"({e})") from None
            if self.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
                self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])
