"""Variants of ``nnUNetTrainerAlice`` for ``-tr``: run lengths (``_<N>epochs``, ``_tiny`` for tests), and fine-tuning
schedules beyond the default recipe (docs/finetuning.md says when to use which). The schedules set
the learning rate every iteration (``nnunet_alice.trainers.recipe``), with ``W`` the recipe's warm-up length in
iterations and ``T`` all training iterations:

* ``nnUNetTrainerAlice_sawtooth``: decoder-only warm-up and decoder-only training (encoder frozen) for the first
  ``D = min(W, T/2)`` iterations (warm-up over the first half of them, poly decay to 0 over the second), then
  the whole network warms up again over ``min(W, T - D)`` iterations and decays (poly) to the end. The
  "sawtooth" schedule of the OpenMind benchmark (Wald et al. 2025, arXiv 2412.17041; TaWald/nnUNet branch
  ``nnssl_finetuning_inclusion``, ``pretraining/sawtooth_trainer.py``), best for CNNs there.
* ``nnUNetTrainerAlice_frozenEncoder``: the encoder (including the stem) is frozen for the first
  ``freeze_encoder_iterations`` iterations (default ``W``) while decoder and segmentation layers follow the
  recipe; then it is unfrozen and its learning rate ramps up linearly to the decoder's over
  ``unfreeze_ramp_iterations`` (default ``W``).
* ``nnUNetTrainerAlice_encLR``: the encoder always trains at ``encoder_lr_factor`` (0.1) times the decoder's
  learning rate.
* ``nnUNetTrainerAlice_nnUNetSchedule``: the pretrained weights (the load scope, ``encoder`` by default) under
  nnU-Net's own from-scratch schedule: its optimizer at 1e-2, poly decay stepped per epoch, no warm-up.

The sawtooth, frozen-encoder and encoder-LR schedules keep every parameter in one SGD optimizer with two
parameter groups (group 0: decoder and segmentation layers, the one nnU-Net logs; group 1: stem + encoder) for
the whole run, so ``--c`` restores them unchanged; ``_nnUNetSchedule`` uses nnU-Net's own optimizer and scheduler.
A group at learning rate 0 is frozen (``nnUNetTrainerAlice.on_lr_change``: ``requires_grad=False`` outside
DDP, momentum dropped when it is unfrozen).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from nnunet_alice.pretrain.model import unwrap
from nnunet_alice.trainers.alice import NNUNET, nnUNetTrainerAlice
from nnunet_alice.trainers.recipe import NNUNET_LR, warmup_poly


# ---------------------------------------------------------------------------------------- run lengths
def _run_length(epochs: int, doc: str = "") -> type:
    """``nnUNetTrainerAlice`` with ``default_num_epochs = epochs``, named as nnU-Net names its length variants."""
    name = f"nnUNetTrainerAlice_{epochs}epoch{'s' if epochs > 1 else ''}"
    doc = doc or f"``nnUNetTrainerAlice`` for {epochs} epoch{'s' if epochs > 1 else ''}."
    return type(name, (nnUNetTrainerAlice,), {"default_num_epochs": epochs, "__module__": __name__, "__doc__": doc})


nnUNetTrainerAlice_1epoch = _run_length(1)
nnUNetTrainerAlice_5epochs = _run_length(5)
nnUNetTrainerAlice_10epochs = _run_length(10)
nnUNetTrainerAlice_20epochs = _run_length(20)
nnUNetTrainerAlice_50epochs = _run_length(50)
nnUNetTrainerAlice_100epochs = _run_length(100)
nnUNetTrainerAlice_150epochs = _run_length(150, "nnU-Net master's short pretrained schedule length "
                                                "(``PretrainedTrainer_150ep``).")
nnUNetTrainerAlice_250epochs = _run_length(250)
nnUNetTrainerAlice_500epochs = _run_length(500)


class nnUNetTrainerAlice_tiny(nnUNetTrainerAlice):
    """For tests and CPU smoke runs: 2 epochs of 2 training and 1 validation iteration, no mirroring TTA."""

    default_num_epochs = 2

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch, ()


# ---------------------------------------------------------------------------------------- schedules
ENCODER, DECODER = "encoder", "decoder"
# the mixins are only ever combined with nnUNetTrainerAlice; the type checker sees them as its subclasses
_MixinBase = nnUNetTrainerAlice if TYPE_CHECKING else object


class _EncoderGroupsMixin(_MixinBase):  # type: ignore[misc,valid-type]
    """Two parameter groups: decoder (+ segmentation layers) first, then stem + encoder."""

    def parameter_groups(self):
        net = unwrap(self.network)
        encoder_ids = {id(p) for p in net.encoder.parameters()}
        params = list(net.parameters())  # shared tensors (decoder.encoder is the encoder) appear once
        return [{"params": [p for p in params if id(p) not in encoder_ids], "alice_group": DECODER},
                {"params": [p for p in params if id(p) in encoder_ids], "alice_group": ENCODER}]


class _SawtoothMixin(_EncoderGroupsMixin):
    def sawtooth_lengths(self):
        """``(decoder stage D, decoder warm-up, whole-network warm-up)`` in iterations."""
        total, w = self.total_iterations(), self.warmup_length()
        decoder_stage = min(w, total // 2)
        return decoder_stage, max(1, decoder_stage // 2), min(w, total - decoder_stage)

    def lr_factor(self, iteration: int, group: str) -> float:
        d, wd, wa = self.sawtooth_lengths()
        if iteration < d:
            return warmup_poly(iteration, 0, wd, d) if group == DECODER else 0.0
        return warmup_poly(iteration, d, wa, self.total_iterations())

    def describe_schedule(self) -> str:
        d, wd, wa = self.sawtooth_lengths()
        return (f"sawtooth: decoder only for {d} iterations (warm-up {wd}, then poly to 0; encoder frozen), then "
                f"the whole network: warm-up over {wa} iterations, poly decay to iteration {self.total_iterations()}")


class _FrozenEncoderMixin(_EncoderGroupsMixin):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # explicit signature: nnUNetTrainer records its __init__ arguments by name for checkpoints
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.freeze_encoder_iterations = None  # None: the warm-up length
        self.unfreeze_ramp_iterations = None   # None: the warm-up length

    def freeze_lengths(self):
        w = self.warmup_length()
        k = w if self.freeze_encoder_iterations is None else int(self.freeze_encoder_iterations)
        r = w if self.unfreeze_ramp_iterations is None else int(self.unfreeze_ramp_iterations)
        return k, r

    def lr_factor(self, iteration: int, group: str) -> float:
        base = super().lr_factor(iteration, group)
        if group != ENCODER:
            return base
        k, r = self.freeze_lengths()
        if iteration < k:
            return 0.0
        return base * (1.0 if r <= 0 else min(1.0, (iteration - k + 1) / r))

    def describe_schedule(self) -> str:
        k, r = self.freeze_lengths()
        return f"{super().describe_schedule()}; encoder frozen for {k} iterations, then ramped up over {r}"


class _EncoderLRMixin(_EncoderGroupsMixin):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.encoder_lr_factor = 0.1

    def lr_factor(self, iteration: int, group: str) -> float:
        base = super().lr_factor(iteration, group)
        return base * float(self.encoder_lr_factor) if group == ENCODER else base

    def describe_schedule(self) -> str:
        return f"{super().describe_schedule()}; encoder at {self.encoder_lr_factor:g} x the decoder's rate"


class nnUNetTrainerAlice_sawtooth(_SawtoothMixin, nnUNetTrainerAlice):
    """Decoder-only warm-up and training, then whole-network warm-up and poly decay."""


class nnUNetTrainerAlice_sawtooth_150epochs(_SawtoothMixin, nnUNetTrainerAlice):
    default_num_epochs = 150


class nnUNetTrainerAlice_frozenEncoder(_FrozenEncoderMixin, nnUNetTrainerAlice):
    """Encoder frozen during the warm-up, then unfrozen with its own linear ramp."""


class nnUNetTrainerAlice_encLR(_EncoderLRMixin, nnUNetTrainerAlice):
    """Encoder at 0.1 x the decoder's learning rate throughout."""


class nnUNetTrainerAlice_nnUNetSchedule(nnUNetTrainerAlice):
    """Pretrained weights, nnU-Net's own schedule (``nnUNetTrainer``'s SGD at 1e-2, poly per epoch, no warm-up).

    What stock ``nnUNetv2_train -pretrained_weights`` trains with, but loading the load scope (stem + encoder by
    default) instead of encoder and decoder. On the CPU demo this was the best schedule measured for a pretrained
    encoder, and loading the decoder too cost Dice (docs/results.md, arms ``alice_nnunet``, ``alice_all_nnunet``).
    A peak set with ``nnUNet_alice_lr`` or the plans' ``alice_lr`` replaces 1e-2."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.recipe = NNUNET
        if self.lr_source == "default":
            self.initial_lr, self.lr_source = NNUNET_LR, "nnU-Net's default"


class nnUNetTrainerAlice_sawtooth_tiny(_SawtoothMixin, nnUNetTrainerAlice_tiny):
    """For tests: 3 tiny epochs (6 iterations, warm-up 3): decoder only for 3 iterations, then the whole network."""

    default_num_epochs = 3


class nnUNetTrainerAlice_frozenEncoder_tiny(_FrozenEncoderMixin, nnUNetTrainerAlice_tiny):
    """For tests: 3 tiny epochs (6 iterations), encoder frozen for the first 3 (the warm-up), unfrozen mid-epoch."""

    default_num_epochs = 3


class nnUNetTrainerAlice_encLR_tiny(_EncoderLRMixin, nnUNetTrainerAlice_tiny):
    """For tests: the tiny schedule with the encoder at 0.1 x the decoder's learning rate."""
