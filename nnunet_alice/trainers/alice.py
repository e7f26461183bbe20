"""``nnUNetTrainerAlice``: nnU-Net's trainer, initialised from an Alice checkpoint, fine-tuned with warm-up.

Subclasses nnU-Net's ``nnUNetTrainer_warmup`` (linear LR warm-up of the whole network, then poly decay) and
changes only these things: the warm-up length scales with the run length (5 %, at most 50 epochs), the
pretrained weights are loaded at epoch 0 (never on ``--c``) after the ``alice_doctor`` summary is printed
(a 1-channel checkpoint is adapted to more input channels), ``--c`` loads nnU-Net's checkpoint with
``weights_only=True``, and the network is built by nnU-Net's own builder, so ``nnUNetv2_predict`` needs
nothing from this package but the class name. Other schedules (frozen encoder, lower encoder LR):
``nnunet_alice.trainers.schedules`` and docs/finetuning.md.
"""
from __future__ import annotations

from typing import Union

import torch
from nnunetv2.training.nnUNetTrainer.variants.lr_schedule.nnUNetTrainer_warmup import nnUNetTrainer_warmup

from nnunet_alice.pretrain.model import unwrap
from nnunet_alice.trainers.pretrained import find_pretrained_checkpoint, load_pretrained_into, load_training_checkpoint


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
        """Print the ``alice_doctor`` summary, then load (input channels 1 -> n adapted, all else strict)."""
        from nnunet_alice.checkpoint import load_checkpoint
        from nnunet_alice.doctor import diagnose
        from nnunet_alice.pretrain.model import unwrap

        path = find_pretrained_checkpoint(self.plans_manager.plans, self.configuration_name)
        if path is None:
            self.print_to_log_file("Alice: nnUNet_alice_pretrained=none, training from scratch with this schedule")
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
            log=self.print_to_log_file, adapt_input_channels=True, checkpoint=ckpt)
        self.alice_checkpoint = path

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        """``--c``: nnUNetTrainer_warmup's logic with a ``weights_only=True`` load (numpy scalars allowed).

        The optimizer is re-created for the stage of the restored epoch (warm-up or train) with this trainer's
        parameter groups before its state is loaded, so variants with several groups resume correctly.
        """
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if isinstance(filename_or_checkpoint, str):
            checkpoint = load_training_checkpoint(filename_or_checkpoint, map_location=self.device)
        net = unwrap(self.network)
        own = net.state_dict()
        weights = {(k[7:] if k not in own and k.startswith("module.") else k): v
                   for k, v in checkpoint["network_weights"].items()}
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)
        net.load_state_dict(weights)
        stage = "warmup_all" if self.current_epoch < self.warmup_duration_whole_net else "train"
        self.optimizer, self.lr_scheduler = self.configure_optimizers(stage)
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])


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
