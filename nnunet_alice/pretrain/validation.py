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
