"""``registration``: classical correspondence through affine registration to a reference case.

A baseline beside the learned anatomical embedding (docs/correspondence.md compares it with the others).
Every case is registered once (SimpleITK, Mattes mutual information, a similarity stage then an affine
stage, on images downsampled to about ``grid_spacing`` mm) to the reference case (the first case given to
:meth:`RegistrationMatcher.prepare`). A point of A maps A -> reference -> B through the composed transforms.
The score is the normalised cross-correlation (in [-1, 1]) of A's neighbourhood of the query point and B's
neighbourhood of the match, B sampled through the same transform, so a rotation does not lower it.

Coordinates. Arrays are indexed ``(a0, a1, a2)`` with ``spacing[i]`` mm along axis ``i``. SimpleITK orders
its axes the other way round (x = last numpy axis), so images are built from the array with the reversed
spacing and origin 0, and a voxel ``p`` sits at physical ``(p[2]*s[2], p[1]*s[1], p[0]*s[0])``. Each case
keeps only a 4x4 matrix (reference voxel -> case voxel), cheap to pickle into data-loading workers.

Cache: ``<cache_dir>/alice_registration/<reference fingerprint>/<case>__<case fingerprint>.json``. A changed
case gets a new name (its older files are deleted); a file that does not parse or does not match its key is
recomputed.
"""
from __future__ import annotations

import os
import time
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from nnunet_alice.pretrain.matching.base import CaseVolume, Matcher
from nnunet_alice.pretrain.matching.fingerprint import (case_fingerprint, read_json_or_none, remove_stale,
                                                         safe_name, write_json_atomic)

CACHE_SUBDIR = "alice_registration"
ALGORITHM_VERSION = 1


def _voxel_to_physical(spacing: Sequence[float]) -> np.ndarray:
    """4x4 matrix from numpy voxel index to SimpleITK physical (x, y, z) for an image with origin 0."""
    m = np.zeros((4, 4))
    for i, s in enumerate(spacing):
        m[2 - i, i] = float(s)
    m[3, 3] = 1.0
    return m


def _sitk_image(array: np.ndarray, spacing: Sequence[float]):
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    img.SetSpacing(tuple(float(s) for s in reversed(spacing)))
    return img


def _downsample(img, grid_spacing: float, max_size: int):
    """Average-pool by integer factors: voxels of about ``grid_spacing`` mm, axes <= max_size but >= ~24."""
    import SimpleITK as sitk
    factors = []
    for size, sp in zip(img.GetSize(), img.GetSpacing()):
        f = max(1, int(round(grid_spacing / sp)), int(np.ceil(size / max_size)))
        factors.append(min(f, max(1, size // 24)))
    return sitk.BinShrink(img, factors) if any(f > 1 for f in factors) else img


def _affine_to_matrix(tx) -> np.ndarray:
    """4x4 homogeneous matrix of a SimpleITK affine-like transform (``y = M (x - c) + t + c``)."""
    dim = 3
    M = np.asarray(tx.GetMatrix(), dtype=float).reshape(dim, dim)
    t = np.asarray(tx.GetTranslation(), dtype=float)
    c = np.asarray(tx.GetCenter(), dtype=float)
    out = np.eye(4)
    out[:3, :3] = M
    out[:3, 3] = t + c - M @ c
    return out


def register_affine(fixed: np.ndarray, fixed_spacing: Sequence[float], moving: np.ndarray,
                    moving_spacing: Sequence[float], grid_spacing: float = 4.0, max_size: int = 64,
                    iterations: int = 100, seed: int = 0) -> Tuple[np.ndarray, float]:
    """Affine registration; returns ``(4x4 matrix fixed-voxel -> moving-voxel, final metric value)``."""
    import SimpleITK as sitk

    f_img = _downsample(_sitk_image(fixed, fixed_spacing), grid_spacing, max_size)
    m_img = _downsample(_sitk_image(moving, moving_spacing), grid_spacing, max_size)

    def method(shrink, smooth):
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(0.25, seed)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3,
                                                     numberOfIterations=iterations,
                                                     gradientMagnitudeTolerance=1e-6)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel(shrink)
        reg.SetSmoothingSigmasPerLevel(smooth)
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        return reg

    # stage 1: similarity (rotation, isotropic scale, translation), started from the centres of mass
    init = sitk.CenteredTransformInitializer(f_img, m_img, sitk.Similarity3DTransform(),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = method([2, 1], [1.0, 0.0])
    reg.SetInitialTransform(init, inPlace=True)
    reg.Execute(f_img, m_img)
    # stage 2: full affine, started from the similarity result
    affine = sitk.AffineTransform(3)
    affine.SetCenter(init.GetCenter())
    affine.SetMatrix(init.GetMatrix())
    affine.SetTranslation(init.GetTranslation())
    reg = method([1], [0.0])
    reg.SetInitialTransform(affine, inPlace=True)
    reg.Execute(f_img, m_img)
    metric = float(reg.GetMetricValue())

    phys = _affine_to_matrix(affine)                     # fixed physical -> moving physical
    to_phys_f = _voxel_to_physical(fixed_spacing)
    to_phys_m = _voxel_to_physical(moving_spacing)
    return np.linalg.inv(to_phys_m) @ phys @ to_phys_f, metric


def local_ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised cross-correlation of two equally shaped samples, in [-1, 1] (0 where either is flat)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    if den < 1e-12:
        return 0.0
    return float(np.clip((a * b).sum() / den, -1.0, 1.0))


def sample_region(case: CaseVolume, coords: np.ndarray) -> np.ndarray:
    """Trilinear samples of channel 0 at ``coords`` (N, 3), reading only their bounding box."""
    from scipy.ndimage import map_coordinates

    shape = np.asarray(case.shape)
    lo = np.clip(np.floor(coords.min(0)).astype(int), 0, shape - 1)
    hi = np.clip(np.ceil(coords.max(0)).astype(int) + 1, lo + 1, shape)
    block = np.asarray(case.image[0, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], dtype=np.float32)
    return map_coordinates(block, (coords - lo).T, order=1, mode="nearest")


class RegistrationMatcher(Matcher):
    """Point correspondence through affine registration of every case to a reference case."""

    name = "registration"
    inter_volume = True

    def __init__(self, cache_dir: Optional[str] = None, grid_spacing: float = 4.0, max_size: int = 64,
                 iterations: int = 100, patch_radius_mm: float = 10.0, patch_points: int = 9):
        self.cache_dir = cache_dir
        self.grid_spacing = float(grid_spacing)
        self.max_size = int(max_size)
        self.iterations = int(iterations)
        self.patch_radius_mm = float(patch_radius_mm)
        self.patch_points = int(patch_points)
        self.reference: Optional[Tuple[str, str, np.ndarray, Tuple[float, ...]]] = None  # id, fp, array, spacing
        self.matrices: Dict[str, np.ndarray] = {}   # case id -> 4x4 reference voxel -> case voxel
        self.n_computed = 0
        self.n_loaded = 0

    # ------------------------------------------------------------------ state
    def __getstate__(self):
        state = self.__dict__.copy()
        if self.reference is not None:   # workers only map points; the reference array stays behind
            rid, rfp, _, rsp = self.reference
            state["reference"] = (rid, rfp, None, rsp)
        return state

    def _cache_folder(self) -> Optional[str]:
        if self.cache_dir is None or self.reference is None:
            return None
        return os.path.join(self.cache_dir, CACHE_SUBDIR, self.reference[1][:16])

    def _set_reference(self, case: CaseVolume) -> None:
        arr = case.channel(0)
        self.reference = (case.case_id, case_fingerprint(case, arr), arr, tuple(case.spacing))
        self.matrices = {case.case_id: np.eye(4)}

    # ------------------------------------------------------------------ per-case transforms
    def prepare(self, cases: Sequence[CaseVolume]) -> None:
        """Register every case to the first one (loading cached transforms where valid)."""
        if not cases:
            return
        self._set_reference(cases[0])
        for case in cases[1:]:
            self.transform_of(case, force_check=True)

    def transform_of(self, case: CaseVolume, force_check: bool = False) -> np.ndarray:
        """4x4 matrix reference voxel -> voxel of ``case`` (computed, or read from the cache, once)."""
        if self.reference is None:
            self._set_reference(case)
        if case.case_id in self.matrices and not force_check:
            return self.matrices[case.case_id]
        if case.case_id == self.reference[0]:
            return self.matrices.setdefault(case.case_id, np.eye(4))
        arr = case.channel(0)
        fp = case_fingerprint(case, arr)
        folder = self._cache_folder()
        key = {"algorithm_version": ALGORITHM_VERSION, "case_id": case.case_id, "fingerprint": fp,
               "reference_id": self.reference[0], "reference_fingerprint": self.reference[1],
               "grid_spacing": self.grid_spacing, "max_size": self.max_size, "iterations": self.iterations}
        path = None
        if folder is not None:
            stem = safe_name(case.case_id) + "__"
            path = os.path.join(folder, f"{stem}{fp[:16]}.json")
            entry = read_json_or_none(path)
            matrix = self._valid_entry(entry, key)
            if matrix is not None:
                self.n_loaded += 1
                self.matrices[case.case_id] = matrix
                return matrix
        if self.reference[2] is None:
            raise RuntimeError("RegistrationMatcher: the reference image is not loaded in this process; "
                               "call prepare() with all cases before starting workers")
        t0 = time.perf_counter()
        matrix, metric = register_affine(self.reference[2], self.reference[3], arr, case.spacing,
                                         self.grid_spacing, self.max_size, self.iterations)
        self.n_computed += 1
        if path is not None:
            write_json_atomic(path, dict(key, matrix=matrix.tolist(), metric=metric,
                                         seconds=round(time.perf_counter() - t0, 3)))
            remove_stale(os.path.dirname(path), safe_name(case.case_id) + "__", os.path.basename(path))
        self.matrices[case.case_id] = matrix
        return matrix

    @staticmethod
    def _valid_entry(entry, key: dict) -> Optional[np.ndarray]:
        if not isinstance(entry, dict) or any(entry.get(k) != v for k, v in key.items()):
            return None
        try:
            matrix = np.asarray(entry["matrix"], dtype=float)
        except (KeyError, TypeError, ValueError):
            return None
        if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix[:3, :3])) < 1e-6:
            return None
        return matrix

    # ------------------------------------------------------------------ matching
    def match(self, case_a: CaseVolume, point_a: np.ndarray, case_b: CaseVolume,
              rng: Optional[np.random.Generator] = None) -> Tuple[np.ndarray, float]:
        point_a = np.asarray(point_a, dtype=float)
        m_ab = self.transform_of(case_b) @ np.linalg.inv(self.transform_of(case_a))
        point_b = m_ab[:3, :3] @ point_a + m_ab[:3, 3]
        # neighbourhood of point_a (a cube of patch_points^3 samples, radius patch_radius_mm) and its image in B
        axis = np.linspace(-1.0, 1.0, self.patch_points)
        offs = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
        coords_a = point_a + offs * self.patch_radius_mm / np.asarray(case_a.spacing, dtype=float)
        coords_a = np.clip(coords_a, 0, np.asarray(case_a.shape) - 1)
        coords_b = coords_a @ m_ab[:3, :3].T + m_ab[:3, 3]
        inside = np.all((coords_b >= 0) & (coords_b <= np.asarray(case_b.shape) - 1), axis=1)
        if inside.mean() < 0.5:
            score = -1.0 if not inside.any() else 0.0
        else:
            score = local_ncc(sample_region(case_a, coords_a[inside]), sample_region(case_b, coords_b[inside]))
        return np.clip(point_b, 0, np.asarray(case_b.shape, dtype=float) - 1), score
