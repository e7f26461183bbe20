"""Checks on image arrays before they are used for pretraining: each failure is one line naming the file."""
from __future__ import annotations

from typing import Optional

import numpy as np

from nnunet_alice.errors import AliceError


def check_image_array(data: np.ndarray, source: str, expected_channels: Optional[int] = None) -> None:
    """Reject arrays that are not (C, X, Y, Z), have the wrong channel count, hold NaN/Inf or are constant."""
    if data.ndim != 4:
        raise AliceError(f"{source}: expected a 3D image (array of shape C,X,Y,Z after preprocessing), "
                         f"got {data.ndim - 1} spatial dimensions, shape {tuple(data.shape)}")
    if expected_channels is not None and data.shape[0] != expected_channels:
        raise AliceError(f"{source}: has {data.shape[0]} channels, the dataset expects {expected_channels}")
    if min(data.shape[1:]) < 1 or data.size == 0:
        raise AliceError(f"{source}: empty image, shape {tuple(data.shape)}")
    if not np.all(np.isfinite(data)):
        raise AliceError(f"{source}: contains NaN or Inf voxels")
    if float(data.max()) == float(data.min()):
        raise AliceError(f"{source}: image is constant (all voxels {float(data.min())}); nothing to learn from")


def check_raw_image(data: np.ndarray, spacing, source: str, expected_channels: int, num_files: int = 1) -> None:
    """Checks on an image as nnU-Net's reader returned it (before preprocessing): 3D, channels, values."""
    if spacing is not None and len(spacing) and float(spacing[0]) >= 999:
        # nnU-Net's readers give 2D images a fake first axis with spacing 999 (x max in-plane spacing)
        raise AliceError(f"{source}: is a 2D image (shape {tuple(data.shape[2:])}), the configuration is 3D")
    if data.ndim == 4 and data.shape[0] != expected_channels and num_files == 1 and data.shape[0] > 1:
        raise AliceError(f"{source}: is a 4D image with {data.shape[0]} volumes, the dataset expects "
                         f"{expected_channels} channel(s) with one 3D file per channel (<case>_0000, <case>_0001, ...)")
    check_image_array(data, source, expected_channels)
