"""Trainer classes for ``nnUNetv2_train -tr <name>`` (found through nnU-Net's ``nnUNet_extTrainer``)."""
from nnunet_alice.trainers.alice import (nnUNetTrainerAlice, nnUNetTrainerAlice_1epoch, nnUNetTrainerAlice_5epochs,
                                         nnUNetTrainerAlice_10epochs, nnUNetTrainerAlice_20epochs,
                                         nnUNetTrainerAlice_50epochs, nnUNetTrainerAlice_100epochs,
                                         nnUNetTrainerAlice_250epochs, nnUNetTrainerAlice_500epochs,
                                         nnUNetTrainerAlice_tiny)

__all__ = ["nnUNetTrainerAlice", "nnUNetTrainerAlice_1epoch", "nnUNetTrainerAlice_5epochs",
           "nnUNetTrainerAlice_10epochs", "nnUNetTrainerAlice_20epochs", "nnUNetTrainerAlice_50epochs",
           "nnUNetTrainerAlice_100epochs", "nnUNetTrainerAlice_250epochs", "nnUNetTrainerAlice_500epochs",
           "nnUNetTrainerAlice_tiny"]

# alice_benchmark's harness trainer (budget and seed from ALICE_BENCH_* environment variables); imported lazily
# because nnunet_alice.tools.bench_trainers itself imports this package.
__all__ += ["nnUNetTrainerAlice_bench"]


def __getattr__(name):
    if name == "nnUNetTrainerAlice_bench":
        from nnunet_alice.tools.bench_trainers import nnUNetTrainerAlice_bench
        return nnUNetTrainerAlice_bench
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
