"""Fine-tuning schedules beyond the default warm-up (docs/finetuning.md says when to use which).

* ``nnUNetTrainerAlice_frozenEncoder``: the encoder (including the stem) is frozen for the first
  ``freeze_encoder_epochs`` epochs (default: the warm-up length, 5 % of the epochs, at most 50) while the
  decoder and segmentation layers warm up; then it is unfrozen and its learning rate ramps up linearly over
  ``unfreeze_ramp_epochs`` epochs (default: the warm-up length again).
* ``nnUNetTrainerAlice_encLR``: the encoder always trains at ``encoder_lr_factor`` (0.1) times the decoder's
  learning rate, warm-up and poly decay included.

Both keep **all** parameters in one SGD optimizer with two parameter groups (group 0: decoder and segmentation
layers, group 1: encoder) and scale group 1's learning rate after nnU-Net's scheduler has set the rate of every
group. Freezing is a learning rate of exactly 0 (SGD then changes nothing, weight decay included), not
``requires_grad=False``: the parameter set never changes, so DDP, ``torch.compile``, nnUNetTrainer_warmup's
optimizer re-creation at epoch 0 and at the warm-up switch, and ``--c`` all work unchanged. Momentum
accumulated while frozen is discarded when the encoder is unfrozen.
"""
from __future__ import annotations

import torch
from nnunetv2.training.lr_scheduler.warmup import Lin_incr_LRScheduler, PolyLRScheduler_offset
from nnunetv2.utilities.helpers import empty_cache

from nnunet_alice.pretrain.model import unwrap
from nnunet_alice.trainers.alice import nnUNetTrainerAlice, nnUNetTrainerAlice_tiny

ENCODER, DECODER = "encoder", "decoder"


class _EncoderGroupsMixin:
    """Two parameter groups (decoder first, then encoder) and a per-epoch encoder learning-rate scale."""

    def encoder_lr_scale(self, epoch: int) -> float:
        return 1.0

    def parameter_groups(self):
        net = unwrap(self.network)
        encoder_ids = {id(p) for p in net.encoder.parameters()}
        params = list(net.parameters())  # shared tensors (decoder.encoder is the encoder) appear once
        return [{"params": [p for p in params if id(p) not in encoder_ids], "alice_group": DECODER},
                {"params": [p for p in params if id(p) in encoder_ids], "alice_group": ENCODER}]

    def configure_optimizers(self, stage: str = "warmup_all"):
        """nnUNetTrainer_warmup.configure_optimizers with :meth:`parameter_groups` instead of one group."""
        assert stage in ("warmup_all", "train")
        if self.training_stage == stage:
            return self.optimizer, self.lr_scheduler
        if stage == "train" and self.training_stage == "warmup_all":
            optimizer = self.optimizer  # keep the momentum of the warm-up, as nnUNetTrainer_warmup does
        else:
            optimizer = torch.optim.SGD(self.parameter_groups(), self.initial_lr, weight_decay=self.weight_decay,
                                        momentum=0.99, nesterov=True)
        if stage == "warmup_all":
            scheduler = Lin_incr_LRScheduler(optimizer, self.initial_lr, self.warmup_duration_whole_net)
        else:
            scheduler = PolyLRScheduler_offset(optimizer, self.initial_lr, self.num_epochs,
                                               self.warmup_duration_whole_net)
        self.print_to_log_file(f"Alice: {stage} optimizer with encoder/decoder parameter groups at epoch "
                               f"{self.current_epoch}")
        self.training_stage = stage
        empty_cache(self.device)
        return optimizer, scheduler

    def on_train_epoch_start(self):
        super().on_train_epoch_start()  # warm-up trainer: optimizer re-creation, then scheduler.step(epoch)
        self.apply_encoder_lr()

    def apply_encoder_lr(self) -> float:
        scale = float(self.encoder_lr_scale(self.current_epoch))
        lr = None
        for g in self.optimizer.param_groups:
            if g.get("alice_group") == ENCODER:
                g["lr"] = g["lr"] * scale
                lr = g["lr"]
        self.print_to_log_file(f"Alice: encoder learning rate {lr:.5g} ({scale:.3g} x decoder)")
        return scale


class _FrozenEncoderMixin(_EncoderGroupsMixin):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # explicit signature: nnUNetTrainer records its __init__ arguments by name for checkpoints
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.freeze_encoder_epochs = self.warmup_duration_whole_net
        self.unfreeze_ramp_epochs = self.warmup_duration_whole_net

    def encoder_lr_scale(self, epoch: int) -> float:
        k, r = int(self.freeze_encoder_epochs), int(self.unfreeze_ramp_epochs)
        if epoch < k:
            return 0.0
        return 1.0 if r <= 0 else min(1.0, (epoch - k + 1) / r)

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        if self.current_epoch < self.freeze_encoder_epochs:
            self.print_to_log_file(f"Alice: encoder frozen (epoch {self.current_epoch} of the first "
                                   f"{self.freeze_encoder_epochs})")
        elif self.current_epoch == self.freeze_encoder_epochs:
            self.drop_encoder_momentum()
            self.print_to_log_file(f"Alice: encoder unfrozen at epoch {self.current_epoch}; its learning rate "
                                   f"ramps up over {self.unfreeze_ramp_epochs} epoch(s)")

    def drop_encoder_momentum(self) -> int:
        """Forget the SGD momentum gathered while the encoder was frozen (it would jolt the weights)."""
        dropped = 0
        for g in self.optimizer.param_groups:
            if g.get("alice_group") != ENCODER:
                continue
            for p in g["params"]:
                if self.optimizer.state.get(p, {}).pop("momentum_buffer", None) is not None:
                    dropped += 1
        return dropped


class _EncoderLRMixin(_EncoderGroupsMixin):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.encoder_lr_factor = 0.1

    def encoder_lr_scale(self, epoch: int) -> float:
        return float(self.encoder_lr_factor)


class nnUNetTrainerAlice_frozenEncoder(_FrozenEncoderMixin, nnUNetTrainerAlice):
    """Encoder frozen during the warm-up, then unfrozen with its own linear ramp."""


class nnUNetTrainerAlice_encLR(_EncoderLRMixin, nnUNetTrainerAlice):
    """Encoder at 0.1 x the decoder's learning rate throughout."""


class nnUNetTrainerAlice_frozenEncoder_tiny(_FrozenEncoderMixin, nnUNetTrainerAlice_tiny):
    """For tests: 3 tiny epochs, encoder frozen in epoch 0 (the warm-up), unfrozen from epoch 1."""

    default_num_epochs = 3


class nnUNetTrainerAlice_encLR_tiny(_EncoderLRMixin, nnUNetTrainerAlice_tiny):
    """For tests: the tiny schedule with the encoder at 0.1 x the decoder's learning rate."""
