"""Real anatomy that is available offline, as numpy volumes with label maps for two tasks.

Only numpy, scipy and nibabel are used (no SimpleITK), so the generator also runs where SimpleITK is not
installed. A source is an array in voxel-index order (x, y, z) with a 4x4 ``affine`` mapping voxel indices to
physical LPS millimetres (the frame of SimpleITK and nnU-Net).

``mni``
    The MNI ICBM152 2009c symmetric T1 average bundled in the nilearn wheel (the files behind ``load_mni152_*``,
    read with nibabel; the ``fetch_*`` functions download and are never used), 197x233x189 voxels at 1 mm,
    skull-stripped, intensities 0..1, with its grey/white matter probability maps. Two label sets:

    ``tissue`` - 0 background, 1 grey matter (GM), 2 white matter (WM): inside the brain mask (T1 > 0.2, the rule
    of ``nilearn.datasets.load_mni152_brain_mask``) a voxel is GM if p(GM) >= 0.5 and p(GM) >= p(WM), WM if
    p(WM) >= 0.5 and p(WM) > p(GM). Close to an intensity threshold.

    ``anatomy`` - regions defined by position in the template (MNI coordinates x, y, z in mm, RAS), which
    intensity alone cannot tell apart. Inside the intracranial hull (brain mask closed by 3 mm and filled) every
    voxel takes its most probable tissue among GM, WM and CSF (p(CSF) = 1 - p(GM) - p(WM)); then

    * ``deep_gm`` (5): GM inside the ellipsoid centred at (0, -8, 4) with radii (31, 30, 22) mm (caudate,
      putamen, pallidum, thalamus; the insula, cingulate and hippocampus fall outside);
    * ``cerebellar_gm`` (4): other GM with y < -30 and z < -10 + 0.35 (y + 40) (below a tentorium-like plane);
    * ``temporal_gm`` (3): other GM with |x| > 28, -72 < y < 26 and z < 2 - 0.1 (y + 20);
    * ``frontal_gm`` (1): other GM in front of a central-sulcus-like plane, y > -14 - 0.25 z;
    * ``parieto_occipital_gm`` (2): the remaining GM;
    * ``white_matter`` (6): WM;
    * ``ventricles`` (7): CSF with |x| < 32, -48 < y < 38, -18 < z < 38, more than 10 mm inside the hull, in
      connected pieces of at least 400 voxels (the lateral and third ventricles);
    * ``other_csf`` (8): the remaining CSF (sulci, fissures, cisterns).

    Left and right are deliberately not separated: the template is symmetric and nnU-Net mirrors its training
    patches, so a left/right label could not be learned from the image. The lobes are coarse planes, not an
    atlas; what matters is that they are fixed in the template and carried through each subject's deformation.

``ct``
    The head CT of the Debian package ``invesalius-examples`` (``Cranium.inv3``, an InVesalius project: a gzip'ed
    tar with ``main.plist`` and ``matrix.dat``, raw C-order int16 HU of shape (z, y, x) = 108x256x256, spacing
    x, y 0.957 mm, z 1.5 mm; no origin or direction is stored, so identity direction and zero origin are used).
    Only the ``tissue`` task: 0 background, 1 soft tissue, 2 bone, from the HU thresholds of the project's own
    masks: body = the largest 3D connected component of HU >= -142 (drops the head holder); bone = body voxels
    with HU >= 226; soft tissue = the other body voxels.
"""
from __future__ import annotations

import os
import plistlib
import tarfile
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from scipy import ndimage as ndi

from nnunet_alice.errors import AliceError

#: Where Debian's ``invesalius-examples`` puts the head CT.
CRANIUM_PATH = "/usr/share/doc/invesalius-examples/examples/Cranium.inv3"

#: Thresholds of the MNI tissue labels (module docstring).
MNI_BRAIN_THRESHOLD = 0.2
MNI_TISSUE_THRESHOLD = 0.5
#: HU thresholds of the CT labels (the InVesalius project's own masks use the same values).
CT_BODY_HU = -142
CT_BONE_HU = 226
#: Lowest and highest HU written for CT images.
CT_HU_MIN, CT_HU_MAX = -1024, 3071

SOURCES = ("mni", "ct")
TASKS = ("anatomy", "tissue")

MNI_TISSUE_LABELS = {"background": 0, "grey_matter": 1, "white_matter": 2}
MNI_ANATOMY_LABELS = {"background": 0, "frontal_gm": 1, "parieto_occipital_gm": 2, "temporal_gm": 3,
                      "cerebellar_gm": 4, "deep_gm": 5, "white_matter": 6, "ventricles": 7, "other_csf": 8}
CT_TISSUE_LABELS = {"background": 0, "soft_tissue": 1, "bone": 2}
#: MNI point (RAS mm) around which the ``anatomy`` deformation may enlarge or shrink the ventricles.
MNI_VENTRICLE_CENTRE = (0.0, -12.0, 14.0)
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class DemoSource:
    """One real volume with label maps, ready to be deformed into many demo subjects.

    ``image`` is float32 (MNI: 0..1 T1 intensities, CT: HU) in voxel order (x, y, z); ``affine`` maps voxel
    indices to physical LPS mm. ``tasks`` maps a task name to ``(labels uint8 array, label_names)``.
    ``tissue`` (MR sources) holds the GM, WM and CSF probabilities (3, x, y, z) used for contrast changes.
    ``centre`` is a physical point (LPS) around which local size changes are made (or None).
    """

    name: str
    image: np.ndarray
    affine: np.ndarray
    tasks: dict
    channel_name: str
    fill_value: float
    descriptions: dict
    licence: str
    tissue: Optional[np.ndarray] = None
    centre: Optional[np.ndarray] = None
    smoothed: dict = field(default_factory=dict)

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def direction(self) -> np.ndarray:
        return self.affine[:3, :3] / self.spacing

    def labels(self, task: str) -> np.ndarray:
        return self.tasks[task][0]

    def label_names(self, task: str) -> dict:
        return dict(self.tasks[task][1])

    def fg_box(self, task: str) -> tuple[np.ndarray, np.ndarray]:
        """Bounding box of ``labels > 0`` in the *axis frame*: mm along the image axes (x, y, z) from the centre of
        voxel 0, so that the physical point of frame coordinate ``f`` is ``origin + direction @ f``."""
        lab = self.labels(task)
        lo, hi = [], []
        for ax in range(3):
            idx = np.nonzero(lab.any(axis=tuple(a for a in range(3) if a != ax)))[0]
            lo.append(idx[0])
            hi.append(idx[-1])
        return np.array(lo) * self.spacing, np.array(hi) * self.spacing

    def channels_for_spacing(self, spacing, with_tissue: bool) -> list:
        """The image (and the tissue maps) low-pass filtered for resampling to ``spacing`` (mm, x y z).

        A Gaussian of FWHM sqrt(out^2 - in^2) per axis, so that the output does not alias; cached per spacing.
        """
        key = (tuple(round(float(s), 4) for s in spacing), bool(with_tissue))
        if key not in self.smoothed:
            fwhm = np.sqrt(np.maximum(np.array(key[0]) ** 2 - self.spacing ** 2, 0.0))
            sigma_vox = fwhm / 2.3548 / self.spacing
            vols = [self.image] + (list(self.tissue) if with_tissue and self.tissue is not None else [])
            if np.all(sigma_vox < 0.25):
                self.smoothed[key] = vols
            else:
                self.smoothed[key] = [ndi.gaussian_filter(v, sigma_vox, mode="nearest", truncate=3.0) for v in vols]
        return self.smoothed[key]


_CACHE: dict = {}


def load_source(source: str, ct_path: str | None = None) -> DemoSource:
    """Load ``source`` ("mni" or "ct"); raises ``AliceError`` naming what to install when it is missing.

    The availability check runs on every call; the loaded volume is cached per process.
    """
    if source == "mni":
        _nilearn_folder()
        key = ("mni",)
        loader = _load_mni
    elif source == "ct":
        path = ct_path or CRANIUM_PATH
        if not os.path.isfile(path):
            raise AliceError(
                f"--source ct needs the InVesalius head CT {path}, which is missing: "
                "install it with 'apt-get install invesalius-examples' (Debian/Ubuntu) or pass --ct-file"
            )
        key = ("ct", os.path.abspath(path), os.path.getmtime(path))
        loader = lambda: _load_ct(path)  # noqa: E731
    else:
        raise AliceError(f"unknown --source {source!r}: choose one of {', '.join(SOURCES)}")
    if key not in _CACHE:
        _CACHE.clear()  # keep at most one source in memory
        _CACHE[key] = loader()
    return _CACHE[key]


MNI_FILES = ("mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
             "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")


def _nilearn_folder() -> str:
    """Where nilearn is installed (without importing it), or raise the install hint."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("nilearn")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise AliceError("--source mni needs nilearn (not installed): install it with 'pip install nilearn'")
    return list(spec.submodule_search_locations)[0]


def _mni_volumes() -> tuple:
    """(T1, p(GM), p(WM), RAS affine) of the MNI template, each volume float32 scaled to a maximum of 1, as
    nilearn's ``load_mni152_template`` / ``_gm_template`` / ``_wm_template`` (resolution 1) return them.

    The files bundled in the nilearn wheel are read with nibabel, which spares nilearn's import (and its version
    checks of scikit-learn and friends); if a nilearn release moved them, its functions are used.
    """
    folder = os.path.join(_nilearn_folder(), "datasets", "data")
    paths = [os.path.join(folder, f) for f in MNI_FILES]
    if all(os.path.isfile(p) for p in paths):
        import nibabel as nib

        images = [nib.load(p) for p in paths]
        vols = [np.asarray(im.get_fdata(dtype=np.float32)) for im in images]
        affine = images[0].affine
    else:
        try:
            import nilearn.datasets as nd
        except ImportError as e:
            raise AliceError(f"--source mni needs nilearn ({e}): install it with 'pip install nilearn'") from None
        images = [nd.load_mni152_template(resolution=1), nd.load_mni152_gm_template(resolution=1),
                  nd.load_mni152_wm_template(resolution=1)]
        vols = [np.asarray(im.get_fdata(dtype=np.float32)) for im in images]
        affine = images[0].affine
    return (*[v / np.float32(v.max()) for v in vols], np.asarray(affine, dtype=float))


def mni_anatomy_labels(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, ras_affine: np.ndarray) -> np.ndarray:
    """The ``anatomy`` label map of the MNI template (module docstring); arrays in (x, y, z) voxel order."""
    if not np.allclose(ras_affine[:3, :3], np.diag(np.diag(ras_affine[:3, :3]))):
        raise AliceError("the MNI template is expected to be axis-aligned")
    axes = [ras_affine[a, a] * np.arange(t1.shape[a]) + ras_affine[a, 3] for a in range(3)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    hull = ndi.binary_fill_holes(ndi.binary_closing(t1 > MNI_BRAIN_THRESHOLD, iterations=3))
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    grey = hull & (gm >= wm) & (gm >= csf)  # the most probable tissue (ties: GM, then WM)
    white = hull & ~grey & (wm >= csf)
    fluid = hull & ~grey & ~white
    deep = grey & ((x / 31.0) ** 2 + ((y + 8) / 30.0) ** 2 + ((z - 4) / 22.0) ** 2 <= 1.0)
    rest = grey & ~deep
    cerebellar = rest & (y < -30) & (z < -10 + 0.35 * (y + 40))
    rest &= ~cerebellar
    temporal = rest & (np.abs(x) > 28) & (y > -72) & (y < 26) & (z < 2 - 0.1 * (y + 20))
    rest &= ~temporal
    frontal = rest & (y > -14 - 0.25 * z)
    parieto_occipital = rest & ~frontal
    # depth below the hull's surface, on a grid of every second voxel (the 10 mm threshold needs no more)
    sub = np.abs(np.diag(ras_affine)[:3]) * 2
    depth = ndi.distance_transform_edt(hull[::2, ::2, ::2], sampling=sub)
    depth = depth.repeat(2, 0).repeat(2, 1).repeat(2, 2)[:t1.shape[0], :t1.shape[1], :t1.shape[2]]
    candidates = fluid & (np.abs(x) < 32) & (y > -48) & (y < 38) & (z > -18) & (z < 38) & (depth > 10)
    comp, _ = ndi.label(candidates)
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    ventricles = np.isin(comp, np.nonzero(sizes >= 400)[0])
    lab = np.zeros(t1.shape, np.uint8)
    names = MNI_ANATOMY_LABELS
    for name, mask in (("frontal_gm", frontal), ("parieto_occipital_gm", parieto_occipital),
                       ("temporal_gm", temporal), ("cerebellar_gm", cerebellar), ("deep_gm", deep),
                       ("white_matter", white), ("ventricles", ventricles), ("other_csf", fluid & ~ventricles)):
        lab[mask] = names[name]
    return lab


def _load_mni() -> DemoSource:
    """The nilearn MNI152 T1 with its ``tissue`` and ``anatomy`` labels (module docstring)."""
    t1_arr, gm, wm, ras_affine = _mni_volumes()
    brain = t1_arr > MNI_BRAIN_THRESHOLD
    tissue_lab = np.zeros(t1_arr.shape, np.uint8)
    tissue_lab[brain & (gm >= MNI_TISSUE_THRESHOLD) & (gm >= wm)] = 1
    tissue_lab[brain & (wm >= MNI_TISSUE_THRESHOLD) & (wm > gm)] = 2
    anatomy_lab = mni_anatomy_labels(t1_arr, gm, wm, ras_affine)
    hull = ndi.gaussian_filter((anatomy_lab > 0).astype(np.float32), 1.0)
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * hull
    affine = RAS_TO_LPS @ ras_affine
    deformation = ("random affine, two-scale elastic deformation and ventricle size change, per-tissue contrast, "
                   "bias field, gamma, Rician noise, field of view")
    return DemoSource(
        name="mni",
        image=t1_arr,
        affine=affine,
        tasks={"tissue": (tissue_lab, MNI_TISSUE_LABELS), "anatomy": (anatomy_lab, MNI_ANATOMY_LABELS)},
        channel_name="T1",
        fill_value=0.0,
        descriptions={
            "tissue": "Synthetic subjects from the MNI ICBM152 2009 T1 average (nilearn), random affine + elastic "
            "deformation, bias field, gamma, Rician noise, field of view; labels GM/WM = majority tissue "
            "(probability >= 0.5) inside the brain mask.",
            "anatomy": f"Synthetic subjects from the MNI ICBM152 2009 T1 average (nilearn), {deformation}; labels: "
            "grey matter split by position in the template (frontal, parieto-occipital, temporal, cerebellar, "
            "deep), white matter, ventricles and other CSF, carried through each subject's deformation.",
        },
        licence="MNI ICBM152 2009 template: Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging "
        "Centre, Montreal Neurological Institute, McGill University; free use with this notice. nilearn: BSD-3.",
        tissue=np.stack([gm, wm, csf]).astype(np.float32),
        centre=(RAS_TO_LPS @ np.array([*MNI_VENTRICLE_CENTRE, 1.0]))[:3],
    )


def read_inv3(path: str) -> tuple[np.ndarray, tuple]:
    """Read an InVesalius ``.inv3`` project: the int16 HU array (z, y, x) and its spacing (x, y, z) in mm."""
    try:
        with tarfile.open(path, "r:*") as tf:
            members = {m.name.rsplit("/", 1)[-1]: m for m in tf.getmembers() if m.isfile()}
            meta = plistlib.loads(tf.extractfile(members["main.plist"]).read())
            mat = meta["matrix"]
            raw = tf.extractfile(members[mat["filename"]]).read()
    except (OSError, KeyError, tarfile.TarError, plistlib.InvalidFileException) as e:
        raise AliceError(f"cannot read the InVesalius project {path}: {e}; reinstall invesalius-examples") from None
    arr = np.frombuffer(raw, dtype=np.dtype(mat["dtype"])).reshape(mat["shape"])
    return arr, tuple(float(s) for s in meta["spacing"])


def _load_ct(path: str) -> DemoSource:
    """The InVesalius head CT with background/soft-tissue/bone labels (module docstring)."""
    hu_zyx, spacing = read_inv3(path)
    hu = np.ascontiguousarray(hu_zyx.transpose(2, 1, 0))  # to (x, y, z)
    body = hu >= CT_BODY_HU
    comp, n = ndi.label(body)
    if n > 1:
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        body = comp == int(np.argmax(sizes))
    lab = body.astype(np.uint8)
    lab[body & (hu >= CT_BONE_HU)] = 2
    affine = np.diag([*spacing, 1.0])
    return DemoSource(
        name="ct",
        image=hu.astype(np.float32),
        affine=affine,
        tasks={"tissue": (lab, CT_TISSUE_LABELS)},
        channel_name="CT",
        fill_value=float(CT_HU_MIN),
        descriptions={
            "tissue": "Synthetic subjects from the InVesalius example head CT (Debian invesalius-examples), random "
            "affine + elastic deformation, mild bias field, contrast and noise changes, field of view; labels "
            "soft tissue / bone from HU thresholds -142 / 226 inside the largest body component.",
        },
        licence="InVesalius example data (Debian package invesalius-examples): GPL-2.",
    )
