"""nnunet-alice: Alice self-supervised pretraining for nnU-Net v2.

Kept free of heavy imports: a start-up hook imports ``nnunet_alice._bootstrap``
in every interpreter of the environment.
"""
__version__ = "0.1.0"
