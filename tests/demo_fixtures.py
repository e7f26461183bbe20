"""What the demo-data tests share: which sources are installed, the small size they write, readers."""
from __future__ import annotations

import importlib.util
import os

import pytest
import SimpleITK as sitk

from nnunet_alice.demo import sources as demo_sources
from nnunet_alice.demo.cli import make_demo_dataset

HAS_NILEARN = importlib.util.find_spec("nilearn") is not None
HAS_CT = os.path.isfile(demo_sources.CRANIUM_PATH)
needs_mni = pytest.mark.skipif(not HAS_NILEARN, reason="nilearn is not installed (pip install nilearn)")
needs_ct = pytest.mark.skipif(not HAS_CT, reason="Cranium.inv3 missing (apt-get install invesalius-examples)")
SOURCE_PARAMS = [pytest.param("mni", marks=needs_mni), pytest.param("ct", marks=needs_ct)]
SPACING = 4.0
COUNTS = dict(num_train=2, num_test=2, num_unlabeled=2)
LABELS = {"mni": demo_sources.MNI_ANATOMY_LABELS, "ct": demo_sources.CT_TISSUE_LABELS}
TASK = {"mni": "anatomy", "ct": "tissue"}


def make_small(root, source, seed=0, dataset_id=990, **kw):
    args = dict(COUNTS)
    args.update(kw)
    return make_demo_dataset(str(root), dataset_id, None, source, seed=seed, spacing=SPACING, **args)


def read(path):
    return sitk.ReadImage(str(path))


def arrays(folder, sub):
    d = os.path.join(folder, sub)
    return {f: sitk.GetArrayFromImage(read(os.path.join(d, f))) for f in sorted(os.listdir(d))}
