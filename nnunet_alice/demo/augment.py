"""Turn one real volume into many synthetic "subjects": random smooth deformation, field of view and intensities.

Every random number comes from the ``numpy.random.Generator`` passed in, so a subject is a pure function of
(source, task, spacing, variation, generator state). numpy and scipy only. Per subject:

1. **Field of view** - an axis-aligned box in the source's axis frame: the task's labelled foreground's bounding
   box, each side scaled by U(0.8, 1.1) and its centre shifted by U(-0.1, 0.1) x the extent, so some subjects are
   cut off and some have a margin. The output grid covers the box at the requested spacing, with the source's
   direction, so arrays keep the source's axis order.
2. **Spatial transform** (output point p -> source point): ``B(A(p + d(p)))``. ``d`` is an elastic displacement,
   a sum over scales of N(0, a) noise (a drawn per scale) on a control grid about ``control_mm`` apart, upsampled
   by cubic splines to a 4 mm grid and linearly to the output grid. ``A`` is an affine about the grid centre
   (rotation U(-r, r) degrees about each axis, scale per axis, translation). ``B`` (``anatomy`` only) changes the
   size of the anatomy around the source's ``centre`` (the ventricles of the MNI template) by a factor m:
   ``B(q) = q - (1 - 1/m) (q - c) exp(-|q - c|^2 / (2 s^2))``, s = 20 mm. The image is resampled linearly
   (after an anti-aliasing blur, see ``DemoSource.channels_for_spacing``), the labels by nearest neighbour at
   the *same* source points, so the labels follow the deformation exactly.
3. **Intensities** - MR: for ``anatomy``, per-tissue contrast: the T1 plus U(-j, j) x p(tissue) for GM, WM and
   CSF, or, for a fraction of subjects (``t2_fraction``), a T2-like image (CSF bright, WM dark) made from the
   tissue probabilities; then gamma exp(U(-0.3, 0.3)), smooth multiplicative bias field exp(N(0, U(0.05, 0.2))
   on a 4^3 grid, cubic), scale x1000 x U(0.8, 1.2), Rician noise of sigma U(0.01, 0.04) of the range; int16
   >= 0. CT: linear contrast on (HU + 1024) x U(0.96, 1.04), mild bias field (sigma U(0, 0.02)), offset
   U(-15, 15) HU, Gaussian noise U(5, 25) HU; int16 clipped to [-1024, 3071].

The ranges of step 2 and 3 per task are the ``VARIATIONS``: ``tissue`` keeps mild deformations (rotation 10
degrees, scale 0.9-1.1, translation 5 mm, one elastic scale 40 mm / 1-3 mm); ``anatomy`` varies more (15
degrees, 0.85-1.15, 8 mm, elastic 50 mm / 2-6 mm plus 25 mm / 0.5-2 mm, ventricle size x0.85-1.4, tissue
contrast +-0.08).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import ndimage as ndi

from nnunet_alice.demo.sources import CT_HU_MAX, CT_HU_MIN, DemoSource

#: Field-of-view ranges (module docstring); kept here so tests and docs can refer to them.
FOV_SCALE = (0.8, 1.1)
FOV_SHIFT = 0.1
FIELD_SPACING_MM = 4.0
MAGNIFY_SIGMA_MM = 20.0


@dataclass(frozen=True)
class Variation:
    """The random ranges of one task (module docstring)."""

    rotation_deg: float
    scale: tuple
    translation_mm: float
    elastic: tuple                    # ((control spacing mm, (amplitude lo, hi) mm), ...)
    magnify: Optional[tuple] = None   # local size factor range around the source's centre; None: off
    tissue_jitter: float = 0.0        # per-tissue intensity offsets U(-j, j) (MR sources with tissue maps)
    t2_fraction: float = 0.0          # share of T2-like subjects (MR sources with tissue maps)


VARIATIONS = {
    "tissue": Variation(10.0, (0.9, 1.1), 5.0, ((40.0, (1.0, 3.0)),)),
    "anatomy": Variation(15.0, (0.85, 1.15), 8.0, ((50.0, (2.0, 6.0)), (25.0, (0.5, 2.0))), magnify=(0.85, 1.4),
                         tissue_jitter=0.08),
}


def smooth_noise(rng: np.random.Generator, coarse_shape, out_shape, sigma: float = 1.0) -> np.ndarray:
    """N(0, sigma) noise on a ``coarse_shape`` grid, upsampled to ``out_shape`` (corners aligned): by cubic splines
    to a grid at most 4x finer than the coarse one, then linearly (cheap, and smooth enough at that density)."""
    coarse = rng.normal(0.0, sigma, size=tuple(int(c) for c in coarse_shape))
    mid = [min(int(o), 4 * (int(c) - 1) + 1) for o, c in zip(out_shape, coarse.shape)]
    out = _zoom_to(coarse, mid, order=3)
    return out if list(out.shape) == [int(o) for o in out_shape] else _zoom_to(out, out_shape, order=1)


def _zoom_to(arr: np.ndarray, out_shape, order: int) -> np.ndarray:
    """``arr`` resized to ``out_shape`` with its corner samples on the output's corners."""
    factors = [(o - 1) / max(c - 1, 1) if c > 1 else o for o, c in zip(out_shape, arr.shape)]
    out = ndi.zoom(arr, factors, order=order, mode="nearest", grid_mode=False, prefilter=order > 1)
    return out[tuple(slice(0, o) for o in out_shape)]


def _rotation(angles_rad) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx for angles (about x, y, z)."""
    ax, ay, az = angles_rad
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


class OutputGrid:
    """The sampling grid of one subject: size (x, y, z voxels), spacing (mm), origin and direction (physical LPS)."""

    def __init__(self, size, spacing, origin, direction):
        self.size = [int(s) for s in size]
        self.spacing = [float(s) for s in spacing]
        self.origin = [float(o) for o in origin]
        self.direction = np.asarray(direction, dtype=float).reshape(3, 3)

    @property
    def affine(self) -> np.ndarray:
        """4x4 voxel index (x, y, z) -> physical LPS mm."""
        a = np.eye(4)
        a[:3, :3] = self.direction * np.asarray(self.spacing)
        a[:3, 3] = self.origin
        return a

    def center(self) -> np.ndarray:
        """Physical centre of the grid."""
        half = (np.asarray(self.size) - 1) * np.asarray(self.spacing) / 2
        return np.asarray(self.origin) + self.direction @ half

    def points(self) -> np.ndarray:
        """Physical coordinates of every voxel centre, shape (3, x, y, z)."""
        idx = np.indices(self.size, dtype=np.float64).reshape(3, -1)
        return (self.affine[:3, :3] @ idx + self.affine[:3, 3:4]).reshape(3, *self.size)


def random_grid(src: DemoSource, task: str, spacing, rng: np.random.Generator) -> OutputGrid:
    """A random field of view around the source's foreground of ``task``, sampled at ``spacing`` (x, y, z mm)."""
    spacing = np.asarray(spacing, dtype=float)
    lo, hi = src.fg_box(task)
    ext = hi - lo
    size_mm = ext * rng.uniform(*FOV_SCALE, size=3)
    centre = (lo + hi) / 2 + rng.uniform(-FOV_SHIFT, FOV_SHIFT, size=3) * ext
    n = np.maximum(np.ceil(size_mm / spacing).astype(int), 8)
    lo_frame = centre - (n - 1) * spacing / 2
    origin = src.affine[:3, 3] + src.direction @ lo_frame
    return OutputGrid(n, spacing, origin, src.direction)


class SubjectTransform:
    """Output point -> source point, ``B(A(p + d(p)))`` (module docstring), evaluated on the output grid."""

    def __init__(self, grid: OutputGrid, matrix, translation, displacement, centre=None, magnify: float = 1.0):
        self.grid = grid
        self.matrix = np.asarray(matrix, dtype=float)
        self.translation = np.asarray(translation, dtype=float)
        self.displacement = displacement  # (3, x, y, z) physical mm at every output voxel
        self.centre = None if centre is None else np.asarray(centre, dtype=float)
        self.magnify = float(magnify)

    def source_points(self) -> np.ndarray:
        """Physical source coordinates of every output voxel centre, shape (3, x, y, z)."""
        p = self.grid.points() + self.displacement
        c = self.grid.center().reshape(3, 1, 1, 1)
        q = np.einsum("ij,j...->i...", self.matrix, p - c) + c + self.translation.reshape(3, 1, 1, 1)
        if self.centre is not None and self.magnify != 1.0:
            d = q - self.centre.reshape(3, 1, 1, 1)
            w = np.exp(-np.sum(d * d, axis=0) / (2 * MAGNIFY_SIGMA_MM ** 2))
            q = q - (1.0 - 1.0 / self.magnify) * d * w
        return q


def random_transform(grid: OutputGrid, rng: np.random.Generator, var: Variation,
                     centre=None) -> SubjectTransform:
    """A random ``B(A(p + d(p)))`` for ``grid`` with the ranges of ``var`` (module docstring)."""
    rot = _rotation(np.deg2rad(rng.uniform(-var.rotation_deg, var.rotation_deg, size=3)))
    scale = np.diag(rng.uniform(*var.scale, size=3))
    translation = rng.uniform(-var.translation_mm, var.translation_mm, size=3)
    extent = (np.asarray(grid.size) - 1) * np.asarray(grid.spacing)
    fsize = tuple(int(s) for s in np.maximum(np.ceil(extent / FIELD_SPACING_MM).astype(int) + 1, 2))
    coarse = np.zeros((3, *fsize))
    for control_mm, amp_range in var.elastic:
        ctrl = np.maximum(np.round(extent / control_mm).astype(int) + 1, 3)
        amp = rng.uniform(*amp_range)
        coarse += np.stack([smooth_noise(rng, ctrl, fsize, amp) for _ in range(3)])  # along the grid axes
    disp_axes = np.stack([_zoom_to(c, grid.size, order=1) for c in coarse])
    disp = np.einsum("ij,j...->i...", grid.direction, disp_axes)  # to physical
    magnify = rng.uniform(*var.magnify) if var.magnify else 1.0
    return SubjectTransform(grid, rot @ scale, translation, disp, centre if var.magnify else None, magnify)


def source_indices(src: DemoSource, points: np.ndarray) -> np.ndarray:
    """Continuous voxel indices (3, ...) in ``src`` of physical points (3, ...)."""
    inv = np.linalg.inv(src.affine)
    return np.einsum("ij,j...->i...", inv[:3, :3], points) + inv[:3, 3].reshape(3, *([1] * (points.ndim - 1)))


def resample(src: DemoSource, task: str, transform: SubjectTransform, weights=None):
    """(image, labels) of ``src`` at the transform's source points; arrays (x, y, z).

    ``weights`` (MR sources with tissue maps): the image is ``w0 T1 + w1 p(GM) + w2 p(WM) + w3 p(CSF)``, combined
    in the source (resampling is linear, so this equals combining the resampled maps, at a quarter of the cost).
    """
    idx = source_indices(src, transform.source_points())
    vols = src.channels_for_spacing(transform.grid.spacing, with_tissue=weights is not None)
    vol = vols[0]
    if weights is not None:
        vol = sum(np.float32(w) * v for w, v in zip(weights, vols) if w != 0.0)
    img = ndi.map_coordinates(vol, idx, order=1, mode="constant", cval=src.fill_value, prefilter=False)
    lab = ndi.map_coordinates(src.labels(task), idx, order=0, mode="constant", cval=0, prefilter=False)
    return img.astype(np.float32), lab.astype(np.uint8)


def mr_contrast(rng: np.random.Generator, var: Variation) -> tuple:
    """Weights of (T1, p(GM), p(WM), p(CSF)) and the contrast's name: the T1 with per-tissue offsets, or a T2-like
    image for a ``t2_fraction`` of subjects (module docstring)."""
    t2 = rng.uniform() < var.t2_fraction
    jitter = rng.uniform(-var.tissue_jitter, var.tissue_jitter, size=3)
    if t2:
        return (0.0, rng.uniform(0.45, 0.6), rng.uniform(0.25, 0.4), rng.uniform(0.8, 1.0)), "T2-like"
    return (1.0, *[float(j) for j in jitter]), "T1"


def mr_intensities(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gamma, bias field, scale and Rician noise on a 0..1 MR image; int16 (docstring)."""
    x = np.clip(x, 0.0, None, out=x)
    top = float(x.max()) or 1.0
    x = (x / top) ** float(np.exp(rng.uniform(-0.3, 0.3)))
    bias = np.exp(smooth_noise(rng, (4, 4, 4), x.shape, rng.uniform(0.05, 0.2)))
    scale = 1000.0 * rng.uniform(0.8, 1.2)
    x = (x * bias * scale).astype(np.float32)
    sigma = rng.uniform(0.01, 0.04) * scale
    n1 = rng.standard_normal(x.shape, dtype=np.float32) * sigma
    n2 = rng.standard_normal(x.shape, dtype=np.float32) * sigma
    x = np.sqrt((x + n1) ** 2 + n2 ** 2)
    return np.clip(np.rint(x), 0, 32767).astype(np.int16)


def ct_intensities(hu: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mild contrast, bias field, offset and Gaussian noise on HU; int16 in [-1024, 3071] (docstring)."""
    bias = np.exp(smooth_noise(rng, (4, 4, 4), hu.shape, rng.uniform(0.0, 0.02)))
    y = (hu - CT_HU_MIN) * (rng.uniform(0.96, 1.04) * bias) + CT_HU_MIN + rng.uniform(-15, 15)
    y = y.astype(np.float32) + rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(rng.uniform(5, 25))
    return np.clip(np.rint(y), CT_HU_MIN, CT_HU_MAX).astype(np.int16)


@dataclass
class Subject:
    """One synthetic subject: int16 image and uint8 labels (x, y, z) on ``grid``, made with ``transform``."""

    image: np.ndarray
    labels: np.ndarray
    grid: OutputGrid
    transform: SubjectTransform
    contrast: str


def uses_tissue(src: DemoSource, var: Variation) -> bool:
    """Whether subjects of ``src`` with ``var`` are made from the tissue maps (MR contrast changes)."""
    return src.channel_name != "CT" and src.tissue is not None and (var.tissue_jitter > 0 or var.t2_fraction > 0)


def make_subject(src: DemoSource, spacing, rng: np.random.Generator, task: str = "tissue",
                 variation: Optional[Variation] = None) -> Subject:
    """One synthetic subject of ``task`` (module docstring); ``variation`` defaults to the task's ranges."""
    var = variation or VARIATIONS[task]
    grid = random_grid(src, task, spacing, rng)
    transform = random_transform(grid, rng, var, src.centre)
    is_mr = src.channel_name != "CT"
    weights, contrast = None, src.channel_name
    if uses_tissue(src, var):
        weights, contrast = mr_contrast(rng, var)
    img, lab = resample(src, task, transform, weights)
    arr = mr_intensities(img, rng) if is_mr else ct_intensities(img, rng)
    return Subject(arr, lab, grid, transform, contrast)
