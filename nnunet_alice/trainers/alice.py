"""``nnUNetTrainerAlice``: nnU-Net's trainer, initialised from an Alice checkpoint, fine-tuned with warm-up.

Subclasses nnU-Net's ``nnUNetTrainer_warmup`` (linear LR warm-up of the whole network, then poly decay) and
changes only three things: the warm-up length scales with the run length (5 %, at most 50 epochs), the
pretrained weights are loaded at epoch 0 (never on ``--c``), and the network is built by nnU-Net's own
builder, so ``nnUNetv2_predict`` needs nothing from this package but the class name.
"""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.variants.lr_schedule.nnUNetTrainer_warmup import nnUNetTrainer_warmup

from nnunet_alice.trainers.pretrained import find_pretrained_checkpoint, load_pretrained_into


class nnUNetTrainerAlice(nnUNetTrainer_warmup):
    """Fine-tunes the planned network from an Alice checkpoint (see ``nnunet_alice.trainers.pretrained``)."""

    default_num_epochs = 1000

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.default_num_epochs
        self.warmup_duration_whole_net = max(1, min(50, round(0.05 * self.num_epochs)))
        self.alice_checkpoint = None
        self.alice_tensors_loaded = 0

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        if self.current_epoch == 0:
            self.load_alice_weights()
        else:
            self.print_to_log_file(f"Alice: resuming at epoch {self.current_epoch}; pretrained weights not reloaded")
        super().on_train_start()

    def load_alice_weights(self) -> None:
        path = find_pretrained_checkpoint(self.plans_manager.plans, self.configuration_name)
        if path is None:
            self.print_to_log_file("Alice: nnUNet_alice_pretrained=none, training from scratch with this schedule")
            return
        cm = self.configuration_manager
        self.alice_tensors_loaded = load_pretrained_into(
            self.network, path, cm.network_arch_class_name, cm.network_arch_init_kwargs, self.num_input_channels,
            log=self.print_to_log_file)
        self.alice_checkpoint = path


class nnUNetTrainerAlice_1epoch(nnUNetTrainerAlice):
    default_num_epochs = 1


class nnUNetTrainerAlice_5epochs(nnUNetTrainerAlice):
    default_num_epochs = 5


class nnUNetTrainerAlice_10epochs(nnUNetTrainerAlice):
    default_num_epochs = 10


class nnUNetTrainerAlice_20epochs(nnUNetTrainerAlice):
    default_num_epochs = 20


class nnUNetTrainerAlice_50epochs(nnUNetTrainerAlice):
    default_num_epochs = 50


class nnUNetTrainerAlice_100epochs(nnUNetTrainerAlice):
    default_num_epochs = 100


class nnUNetTrainerAlice_250epochs(nnUNetTrainerAlice):
    default_num_epochs = 250


class nnUNetTrainerAlice_500epochs(nnUNetTrainerAlice):
    default_num_epochs = 500


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
