from nnunet_alice.trainers import *  # noqa: F401,F403  (shim scanned by nnU-Net via nnUNet_extTrainer)
