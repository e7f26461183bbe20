"""Real anatomy that is available offline, loaded as SimpleITK images with a tissue label map.

Two sources (see ``reference/environment.md`` section 3):

``mni``
    The MNI ICBM152 2009 T1 average bundled in the nilearn wheel (``load_mni152_*``; the ``fetch_*`` functions
    download and are never used), 197x233x189 voxels at 1 mm, skull-stripped, intensities 0..1.
    Labels: 0 background, 1 grey matter (GM), 2 white matter (WM), defined as

    * brain mask = T1 > 0.2 (the rule of ``nilearn.datasets.load_mni152_brain_mask``);
    * inside the brain mask a voxel is GM if p(GM) >= 0.5 and p(GM) >= p(WM), WM if p(WM) >= 0.5 and
      p(WM) > p(GM) (``load_mni152_gm_template`` / ``load_mni152_wm_template`` probabilities), i.e. the argmax of
      the two probability maps thresholded at 0.5;
    * everything else (outside the brain, CSF, ventricles, voxels with no majority tissue) is background.

``ct``
    The head CT of the Debian package ``invesalius-examples`` (``Cranium.inv3``, an InVesalius project: a gzip'ed
    tar with ``main.plist`` and ``matrix.dat``, raw C-order int16 HU of shape (z, y, x) = 108x256x256, spacing
    x, y 0.957 mm, z 1.5 mm; no origin or direction is stored, so identity direction and zero origin are used).
    Labels: 0 background, 1 soft tissue, 2 bone, from the same HU thresholds as the project's own masks:

    * body = the largest 3D connected component of HU >= -142 (this drops the head holder);
    * bone = body voxels with HU >= 226;
    * soft tissue = body voxels that are not bone.
"""
from __future__ import annotations

import os
import plistlib
import tarfile
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

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


@dataclass
class DemoSource:
    """One real volume with its label map, ready to be deformed into many demo subjects.

    ``image`` is float32 (MNI: 0..1 T1 intensities, CT: HU), ``labels`` uint8 on the same grid.
    ``fg_lo`` / ``fg_hi`` bound the labelled foreground in the source's *axis frame*: millimetres along the
    image axes (x, y, z) measured from the centre of voxel 0, so that the physical point of frame coordinate
    ``f`` is ``origin + direction @ f``.
    """

    name: str
    image: sitk.Image
    labels: sitk.Image
    label_names: dict
    channel_name: str
    fill_value: float
    fg_lo: np.ndarray
    fg_hi: np.ndarray
    description: str
    licence: str
    smoothed: dict = field(default_factory=dict)

    def image_for_spacing(self, spacing) -> sitk.Image:
        """The image low-pass filtered for resampling to ``spacing`` (mm, x y z), so the output does not alias.

        A Gaussian of FWHM sqrt(out^2 - in^2) per axis is applied once per spacing and cached.
        """
        key = tuple(round(float(s), 4) for s in spacing)
        if key not in self.smoothed:
            src_sp = np.array(self.image.GetSpacing())
            fwhm = np.sqrt(np.maximum(np.array(key) ** 2 - src_sp ** 2, 0.0))
            sigma = fwhm / 2.3548
            if np.all(sigma < 0.25 * src_sp):
                self.smoothed[key] = self.image
            else:
                self.smoothed[key] = sitk.SmoothingRecursiveGaussian(self.image, [float(s) for s in sigma])
        return self.smoothed[key]


_CACHE: dict = {}


def load_source(source: str, ct_path: str | None = None) -> DemoSource:
    """Load ``source`` ("mni" or "ct"); raises ``AliceError`` naming what to install when it is missing.

    The availability check runs on every call; the loaded volume is cached per process.
    """
    if source == "mni":
        _require_nilearn()
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


def _require_nilearn():
    """Import ``nilearn.datasets`` or raise the install hint."""
    try:
        import nilearn.datasets as nd  # noqa: F401
    except ImportError as e:
        raise AliceError(f"--source mni needs nilearn ({e}): install it with 'pip install nilearn'") from None
    return nd


def _nifti_to_sitk(arr: np.ndarray, affine: np.ndarray, dtype) -> sitk.Image:
    """A nibabel (x, y, z) array with a RAS affine as a SimpleITK image (LPS physical space)."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(arr, dtype=dtype).transpose(2, 1, 0)))
    ras2lps = np.diag([-1.0, -1.0, 1.0])
    m = ras2lps @ affine[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in (m / spacing).ravel()])
    img.SetOrigin([float(v) for v in ras2lps @ affine[:3, 3]])
    return img


def _fg_box(labels: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Bounding box of ``labels > 0`` (array in z, y, x order) in the axis frame (mm, x y z)."""
    lo, hi = [], []
    for ax in (2, 1, 0):  # x, y, z
        other = tuple(a for a in range(3) if a != ax)
        idx = np.nonzero(labels.any(axis=other))[0]
        lo.append(idx[0])
        hi.append(idx[-1])
    sp = np.asarray(spacing, dtype=float)
    return np.array(lo) * sp, np.array(hi) * sp


def _load_mni() -> DemoSource:
    """The nilearn MNI152 T1 with background/GM/WM labels (module docstring)."""
    nd = _require_nilearn()
    t1 = nd.load_mni152_template(resolution=1)
    gm = np.asarray(nd.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32))
    wm = np.asarray(nd.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32))
    t1_arr = np.asarray(t1.get_fdata(dtype=np.float32))
    brain = t1_arr > MNI_BRAIN_THRESHOLD
    lab = np.zeros(t1_arr.shape, np.uint8)
    lab[brain & (gm >= MNI_TISSUE_THRESHOLD) & (gm >= wm)] = 1
    lab[brain & (wm >= MNI_TISSUE_THRESHOLD) & (wm > gm)] = 2
    image = _nifti_to_sitk(t1_arr, t1.affine, np.float32)
    labels = _nifti_to_sitk(lab, t1.affine, np.uint8)
    lo, hi = _fg_box(sitk.GetArrayViewFromImage(labels), image.GetSpacing())
    return DemoSource(
        name="mni",
        image=image,
        labels=labels,
        label_names={"background": 0, "grey_matter": 1, "white_matter": 2},
        channel_name="T1",
        fill_value=0.0,
        fg_lo=lo,
        fg_hi=hi,
        description="Synthetic subjects from the MNI ICBM152 2009 T1 average (nilearn), random affine + elastic "
        "deformation, bias field, gamma, Rician noise, field of view; labels GM/WM = majority tissue "
        "(probability >= 0.5) inside the brain mask.",
        licence="MNI ICBM152 2009 template: Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging "
        "Centre, Montreal Neurological Institute, McGill University; free use with this notice. nilearn: BSD-3.",
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
    from scipy import ndimage as ndi

    hu, spacing = read_inv3(path)
    body = hu >= CT_BODY_HU
    comp, n = ndi.label(body)
    if n > 1:
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        body = comp == int(np.argmax(sizes))
    lab = body.astype(np.uint8)
    lab[body & (hu >= CT_BONE_HU)] = 2
    image = sitk.GetImageFromArray(hu.astype(np.float32))
    labels = sitk.GetImageFromArray(lab)
    for im in (image, labels):
        im.SetSpacing(spacing)
    lo, hi = _fg_box(lab, spacing)
    return DemoSource(
        name="ct",
        image=image,
        labels=labels,
        label_names={"background": 0, "soft_tissue": 1, "bone": 2},
        channel_name="CT",
        fill_value=float(CT_HU_MIN),
        fg_lo=lo,
        fg_hi=hi,
        description="Synthetic subjects from the InVesalius example head CT (Debian invesalius-examples), random "
        "affine + elastic deformation, mild bias field, contrast and noise changes, field of view; labels "
        "soft tissue / bone from HU thresholds -142 / 226 inside the largest body component.",
        licence="InVesalius example data (Debian package invesalius-examples): GPL-2.",
    )
