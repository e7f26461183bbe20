"""Synthetic pairs with known correspondence for ``python -m benchmarks.correspondence`` (docs/correspondence.md).

Base volumes at 2 mm (:func:`mni_base`, :func:`ct_head_base`, :func:`phantom_base`), random smooth deformations of
them (:class:`Deformation`, :class:`CroppedDeformation` for a field of view of its own), pairs of deformed volumes
(:func:`make_pairs`) and query points with their true partners (:func:`make_queries`).
"""
from __future__ import annotations

import os
import plistlib
import tarfile
from typing import List, Tuple

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates, zoom

from nnunet_alice.pretrain.matching.base import CaseVolume

CRANIUM = "/usr/share/doc/invesalius-examples/examples/Cranium.inv3"
SPACING = (2.0, 2.0, 2.0)


# ---------------------------------------------------------------------------- base volumes
def mni_base() -> np.ndarray:
    """nilearn's bundled MNI152 T1 template at 2 mm (no download)."""
    from nilearn.datasets import load_mni152_template
    return np.asarray(load_mni152_template(resolution=2).get_fdata(), dtype=np.float32)


def ct_head_base() -> np.ndarray | None:
    """The InVesalius head CT (Debian ``invesalius-examples``) at 2 mm, HU clipped to [-1024, 2000]; None if absent."""
    if not os.path.isfile(CRANIUM):
        return None
    tf = tarfile.open(CRANIUM, "r:gz")

    def get(name):
        return tf.extractfile(next(m for m in tf.getmembers() if m.name.endswith("/" + name))).read()

    main = plistlib.loads(get("main.plist"))
    mat = main["matrix"]
    vol = np.frombuffer(get(mat["filename"]), dtype=mat["dtype"]).reshape(mat["shape"]).astype(np.float32)
    sx, sy, sz = main["spacing"]                       # array axes are (z, y, x)
    vol = np.clip(vol, -1024, 2000)
    return zoom(gaussian_filter(vol, (0.3, 0.6, 0.6)), (sz / 2.0, sy / 2.0, sx / 2.0), order=1).astype(np.float32)


def phantom_base(seed: int = 7) -> np.ndarray:
    """A 96^3 body at 2 mm: ellipsoidal body, 8 organs of distinct intensity, 3 tubes, smooth texture."""
    rng = np.random.default_rng(seed)
    n = 96
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32)] * 3, indexing="ij"), 0)

    def ellipsoid(c, r):
        return (((grid - np.asarray(c, np.float32)[:, None, None, None]) /
                 np.asarray(r, np.float32)[:, None, None, None]) ** 2).sum(0) <= 1

    vol = np.zeros((n, n, n), np.float32)
    body = ellipsoid((48, 48, 48), (42, 34, 40))
    vol[body] = 0.4
    for _ in range(8):
        c = rng.uniform(22, 74, 3)
        r = rng.uniform(5, 13, 3)
        vol[ellipsoid(c, r) & body] = rng.uniform(0.15, 1.0)
    for _ in range(3):   # tubes along random directions
        p0, d = rng.uniform(30, 66, 3), rng.normal(size=3)
        d /= np.linalg.norm(d)
        rel = grid - p0[:, None, None, None]
        along = np.tensordot(d, rel, axes=(0, 0))
        perp = np.sqrt(np.maximum((rel ** 2).sum(0) - along ** 2, 0))
        vol[(perp < rng.uniform(1.5, 3.0)) & body] = 0.9
    texture = gaussian_filter(rng.normal(size=vol.shape).astype(np.float32), 2.0)
    vol += body * 0.08 * texture / texture.std()
    return gaussian_filter(vol, 0.7)


# ---------------------------------------------------------------------------- deformations
class Deformation:
    """``T(p) = c + M (p - c) + t + d(p)``: deformed-volume voxel -> base voxel (voxel units, 2 mm)."""

    def __init__(self, shape, rng: np.random.Generator, rot_deg=10.0, scale=0.08, trans_mm=8.0,
                 elastic_mm=6.0, node_mm=40.0):
        self.shape = tuple(shape)
        self.c = (np.asarray(shape, dtype=float) - 1) / 2
        ang = np.deg2rad(rng.uniform(-rot_deg, rot_deg, 3))
        m = np.eye(3)
        for axis, t in enumerate(ang):
            i, j = [k for k in range(3) if k != axis]
            r = np.eye(3)
            r[i, i], r[i, j], r[j, i], r[j, j] = np.cos(t), -np.sin(t), np.sin(t), np.cos(t)
            m = m @ r
        self.m = m @ np.diag(1 + rng.uniform(-scale, scale, 3))
        self.t = rng.uniform(-trans_mm, trans_mm, 3) / SPACING[0]
        nodes = [max(2, int(round(s * SPACING[0] / node_mm)) + 1) for s in shape]
        coarse = rng.normal(size=(3, *nodes))
        field = np.stack([zoom(coarse[k], [s / q for s, q in zip(shape, nodes)], order=3) for k in range(3)], 0)
        field = field[:, :shape[0], :shape[1], :shape[2]]
        mag = np.sqrt((field ** 2).sum(0)).max()
        self.d = (field * (elastic_mm / SPACING[0]) / max(mag, 1e-6)).astype(np.float32)

    def disp(self, p: np.ndarray) -> np.ndarray:
        return np.stack([map_coordinates(self.d[k], p.T, order=1, mode="nearest") for k in range(3)], 1)

    def forward(self, p: np.ndarray) -> np.ndarray:
        return self.c + (p - self.c) @ self.m.T + self.t + self.disp(p)

    def inverse(self, y: np.ndarray, iterations: int = 40) -> Tuple[np.ndarray, np.ndarray]:
        minv = np.linalg.inv(self.m)
        p = self.c + (y - self.c - self.t) @ minv.T
        for _ in range(iterations):
            p = self.c + (y - self.c - self.t - self.disp(p)) @ minv.T
        return p, np.linalg.norm(self.forward(p) - y, axis=1)

    def warp(self, base: np.ndarray) -> np.ndarray:
        axes = [np.arange(s, dtype=float) for s in self.shape]
        p = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        y = self.forward(p)
        return map_coordinates(base, y.T, order=1, cval=float(base.min())).reshape(self.shape).astype(np.float32)


class CroppedDeformation:
    """A :class:`Deformation` whose output is a sub-box of the frame: a scan with its own field of view."""

    def __init__(self, inner: Deformation, rng: np.random.Generator, fraction=(0.6, 0.85)):
        self.inner = inner
        self.base_shape = inner.shape
        size = [int(round(n * rng.uniform(*fraction))) for n in inner.shape]
        self.lo = np.asarray([int(rng.integers(0, n - s + 1)) for n, s in zip(inner.shape, size)], dtype=float)
        self.shape = tuple(size)

    def forward(self, p: np.ndarray) -> np.ndarray:
        return self.inner.forward(p + self.lo)

    def inverse(self, y: np.ndarray, iterations: int = 40) -> Tuple[np.ndarray, np.ndarray]:
        p, res = self.inner.inverse(y, iterations)
        return p - self.lo, res

    def warp(self, base: np.ndarray) -> np.ndarray:
        lo = self.lo.astype(int)
        return np.ascontiguousarray(self.inner.warp(base)[tuple(slice(a, a + n) for a, n in zip(lo, self.shape))])


# ---------------------------------------------------------------------------- data sets of pairs
def make_pairs(base: np.ndarray, n_pairs: int, seed: int, elastic_mm: float, crop: bool = False
               ) -> List[Tuple[CaseVolume, CaseVolume, Deformation, Deformation]]:
    """``n_pairs`` pairs (A, B, T_A, T_B): two independent deformations of ``base`` each, optionally each with a
    field of view of its own (``crop``)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_pairs):
        ta = Deformation(base.shape, rng, elastic_mm=elastic_mm)
        tb = Deformation(base.shape, rng, elastic_mm=elastic_mm)
        if crop:
            ta, tb = CroppedDeformation(ta, rng), CroppedDeformation(tb, rng)
        a = CaseVolume(f"pair{i}_a", ta.warp(base)[None], SPACING)
        b = CaseVolume(f"pair{i}_b", tb.warp(base)[None], SPACING)
        out.append((a, b, ta, tb))
    return out


def make_queries(pairs, n_queries: int, seed: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Per pair: foreground query points of A and their true partners in B (points without one dropped)."""
    from nnunet_alice.pretrain.matching.sampling import sample_query_point

    rng = np.random.default_rng(seed)
    out = []
    for a, b, ta, tb in pairs:
        pa = np.stack([sample_query_point(a, rng, margin=4) for _ in range(n_queries * 2)])
        y = ta.forward(pa)
        pb, res = tb.inverse(y)
        ok = (res < 0.05) & np.all((pb >= 0) & (pb <= np.asarray(b.shape) - 1), 1) \
            & np.all((y >= 0) & (y <= np.asarray(base_shape_of(ta)) - 1), 1)
        out.append((pa[ok][:n_queries], pb[ok][:n_queries]))
    return out


def base_shape_of(t) -> Tuple[int, ...]:
    """Shape of the frame ``t`` maps into: the base volume's, also for a :class:`CroppedDeformation`."""
    return getattr(t, "base_shape", t.shape)
