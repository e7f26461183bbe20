"""Turn one real volume into many synthetic "subjects": random smooth deformation, field of view and intensities.

Every random number comes from the ``numpy.random.Generator`` passed in, so a subject is a pure function of
(source, spacing, generator state). Per subject:

1. **Field of view** - an axis-aligned box in the source's axis frame: the labelled foreground's bounding box,
   each side scaled by U(0.8, 1.1) and its centre shifted by U(-0.1, 0.1) x the extent, so some subjects are cut
   off and some have a margin. The output grid covers the box at the requested spacing, with the source's
   direction, so arrays keep the source's axis order.
2. **Spatial transform** (output point p -> source point): ``A(p + d(p))`` where ``A`` is an affine about the box
   centre (rotation U(-10, 10) degrees about each axis, scale U(0.9, 1.1) per axis, translation U(-5, 5) mm)
   and ``d`` is an elastic displacement: N(0, a) noise, a = U(1, 3) mm, on a coarse control grid
   (about 40 mm apart) upsampled by cubic splines to a 4 mm field grid, used by
   ``sitk.DisplacementFieldTransform`` (linear in between). The image is resampled linearly (after an
   anti-aliasing blur, see ``DemoSource.image_for_spacing``), the labels by nearest neighbour with the *same*
   transform and grid.
3. **Intensities** - MR: gamma exp(U(-0.3, 0.3)), smooth multiplicative bias field exp(N(0, U(0.05, 0.2)) on a
   4^3 grid, cubic), scale x1000 x U(0.8, 1.2), Rician noise of sigma U(0.01, 0.04) of the range; int16 >= 0.
   CT: linear contrast on (HU + 1024) x U(0.96, 1.04), mild bias field (sigma U(0, 0.02)), offset U(-15, 15) HU,
   Gaussian noise U(5, 25) HU; int16 clipped to [-1024, 3071].
"""
from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from nnunet_alice.tools.demo_sources import CT_HU_MAX, CT_HU_MIN, DemoSource

#: Random ranges (module docstring); kept here so tests and docs can refer to them.
FOV_SCALE = (0.8, 1.1)
FOV_SHIFT = 0.1
ROTATION_DEG = 10.0
SCALE = (0.9, 1.1)
TRANSLATION_MM = 5.0
ELASTIC_MM = (1.0, 3.0)
ELASTIC_CONTROL_MM = 40.0
FIELD_SPACING_MM = 4.0


def smooth_noise(rng: np.random.Generator, coarse_shape, out_shape, sigma: float = 1.0) -> np.ndarray:
    """N(0, sigma) noise on a ``coarse_shape`` grid, upsampled to ``out_shape`` by cubic splines (corners aligned)."""
    coarse = rng.normal(0.0, sigma, size=tuple(int(c) for c in coarse_shape))
    factors = [(o - 1) / max(c - 1, 1) if c > 1 else o for o, c in zip(out_shape, coarse.shape)]
    out = ndi.zoom(coarse, factors, order=3, mode="nearest", grid_mode=False, prefilter=True)
    return out[tuple(slice(0, o) for o in out_shape)]


def _rotation(angles_rad) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx for angles (about x, y, z)."""
    ax, ay, az = angles_rad
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


class OutputGrid:
    """The sampling grid of one subject: size (x, y, z voxels), spacing (mm), origin and direction (physical)."""

    def __init__(self, size, spacing, origin, direction):
        self.size = [int(s) for s in size]
        self.spacing = [float(s) for s in spacing]
        self.origin = [float(o) for o in origin]
        self.direction = [float(d) for d in np.asarray(direction).ravel()]

    def center(self) -> np.ndarray:
        """Physical centre of the grid."""
        d = np.asarray(self.direction).reshape(3, 3)
        half = (np.asarray(self.size) - 1) * np.asarray(self.spacing) / 2
        return np.asarray(self.origin) + d @ half


def random_grid(src: DemoSource, spacing, rng: np.random.Generator) -> OutputGrid:
    """A random field of view around the source's foreground, sampled at ``spacing`` (x, y, z mm)."""
    spacing = np.asarray(spacing, dtype=float)
    ext = src.fg_hi - src.fg_lo
    size_mm = ext * rng.uniform(*FOV_SCALE, size=3)
    centre = (src.fg_lo + src.fg_hi) / 2 + rng.uniform(-FOV_SHIFT, FOV_SHIFT, size=3) * ext
    n = np.maximum(np.ceil(size_mm / spacing).astype(int), 8)
    lo_frame = centre - (n - 1) * spacing / 2
    d = np.asarray(src.image.GetDirection()).reshape(3, 3)
    origin = np.asarray(src.image.GetOrigin()) + d @ lo_frame
    return OutputGrid(n, spacing, origin, d)


def random_transform(grid: OutputGrid, rng: np.random.Generator) -> sitk.Transform:
    """``A(p + d(p))``: random affine about the grid centre after a smooth elastic displacement (docstring)."""
    rot = _rotation(np.deg2rad(rng.uniform(-ROTATION_DEG, ROTATION_DEG, size=3)))
    scale = np.diag(rng.uniform(*SCALE, size=3))
    affine = sitk.AffineTransform(3)
    affine.SetMatrix([float(v) for v in (rot @ scale).ravel()])
    affine.SetCenter([float(c) for c in grid.center()])
    affine.SetTranslation([float(t) for t in rng.uniform(-TRANSLATION_MM, TRANSLATION_MM, size=3)])

    # elastic field on a coarse grid covering the output grid (its corners are field points)
    extent = (np.asarray(grid.size) - 1) * np.asarray(grid.spacing)
    fsize = np.maximum(np.ceil(extent / FIELD_SPACING_MM).astype(int) + 1, 2)
    fspacing = extent / np.maximum(fsize - 1, 1)
    fspacing = np.where(fspacing > 0, fspacing, 1.0)
    ctrl = np.maximum(np.round(extent / ELASTIC_CONTROL_MM).astype(int) + 1, 3)
    amp = rng.uniform(*ELASTIC_MM)
    shape_zyx = tuple(int(s) for s in fsize[::-1])
    d = np.asarray(grid.direction).reshape(3, 3)
    comps = [smooth_noise(rng, ctrl[::-1], shape_zyx, amp) for _ in range(3)]  # along the grid axes x, y, z
    disp_axes = np.stack(comps, axis=-1)  # (z, y, x, 3) in grid axis coordinates
    disp_phys = disp_axes @ d.T  # to physical
    field = sitk.GetImageFromArray(disp_phys.astype(np.float64), isVector=True)
    field.SetOrigin(grid.origin)
    field.SetSpacing([float(s) for s in fspacing])
    field.SetDirection(grid.direction)
    elastic = sitk.DisplacementFieldTransform(field)
    return sitk.CompositeTransform([affine, elastic])  # the last one is applied first: A(p + d(p))


def resample(src: DemoSource, grid: OutputGrid, transform: sitk.Transform) -> tuple[np.ndarray, np.ndarray]:
    """Image (float32, linear, anti-aliased) and labels (uint8, nearest) of ``src`` on ``grid`` (arrays z, y, x)."""
    img = sitk.Resample(
        src.image_for_spacing(grid.spacing), grid.size, transform, sitk.sitkLinear,
        grid.origin, grid.spacing, grid.direction, src.fill_value, sitk.sitkFloat32,
    )
    lab = sitk.Resample(
        src.labels, grid.size, transform, sitk.sitkNearestNeighbor,
        grid.origin, grid.spacing, grid.direction, 0, sitk.sitkUInt8,
    )
    return sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(lab)


def mr_intensities(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gamma, bias field, scale and Rician noise on a 0..1 T1 image; int16 (docstring)."""
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


def make_subject(src: DemoSource, spacing, rng: np.random.Generator) -> tuple[sitk.Image, sitk.Image]:
    """One synthetic subject: an int16 image and its uint8 labels on the same random grid (module docstring)."""
    grid = random_grid(src, spacing, rng)
    transform = random_transform(grid, rng)
    img, lab = resample(src, grid, transform)
    arr = mr_intensities(img, rng) if src.channel_name != "CT" else ct_intensities(img, rng)
    out = []
    for a in (arr, lab):
        im = sitk.GetImageFromArray(a)
        im.SetOrigin(grid.origin)
        im.SetSpacing(grid.spacing)
        im.SetDirection(grid.direction)
        out.append(im)
    return out[0], out[1]
