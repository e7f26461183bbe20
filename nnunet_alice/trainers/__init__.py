"""Trainer classes for ``nnUNetv2_train -tr <name>`` (found through nnU-Net's ``nnUNet_extTrainer``)."""
from nnunet_alice.trainers.alice import nnUNetTrainerAlice
from nnunet_alice.trainers.variants import (nnUNetTrainerAlice_1epoch, nnUNetTrainerAlice_5epochs,
                                            nnUNetTrainerAlice_10epochs, nnUNetTrainerAlice_20epochs,
                                            nnUNetTrainerAlice_50epochs, nnUNetTrainerAlice_100epochs,
                                            nnUNetTrainerAlice_150epochs, nnUNetTrainerAlice_250epochs,
                                            nnUNetTrainerAlice_500epochs, nnUNetTrainerAlice_encLR,
                                            nnUNetTrainerAlice_encLR_tiny, nnUNetTrainerAlice_frozenEncoder,
                                            nnUNetTrainerAlice_frozenEncoder_tiny, nnUNetTrainerAlice_nnUNetSchedule,
                                            nnUNetTrainerAlice_sawtooth,
                                            nnUNetTrainerAlice_sawtooth_150epochs, nnUNetTrainerAlice_sawtooth_tiny,
                                            nnUNetTrainerAlice_tiny)

__all__ = ["nnUNetTrainerAlice", "nnUNetTrainerAlice_1epoch", "nnUNetTrainerAlice_5epochs",
           "nnUNetTrainerAlice_10epochs", "nnUNetTrainerAlice_20epochs", "nnUNetTrainerAlice_50epochs",
           "nnUNetTrainerAlice_100epochs", "nnUNetTrainerAlice_150epochs", "nnUNetTrainerAlice_250epochs",
           "nnUNetTrainerAlice_500epochs", "nnUNetTrainerAlice_tiny", "nnUNetTrainerAlice_sawtooth",
           "nnUNetTrainerAlice_sawtooth_150epochs", "nnUNetTrainerAlice_sawtooth_tiny",
           "nnUNetTrainerAlice_frozenEncoder", "nnUNetTrainerAlice_frozenEncoder_tiny",
           "nnUNetTrainerAlice_encLR", "nnUNetTrainerAlice_encLR_tiny", "nnUNetTrainerAlice_nnUNetSchedule"]
