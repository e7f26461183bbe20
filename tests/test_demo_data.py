"""Tests of ``alice_demo_data``: layout, geometry, labels, determinism, disjoint splits, nnU-Net validity, errors.

Small datasets at 4 mm keep the file fast. Sources that are not installed are skipped with the reason.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_alice.errors import AliceError
from nnunet_alice.tools import demo_data, demo_sources
from nnunet_alice.tools.demo_data import case_ids, make_demo_dataset

HAS_NILEARN = importlib.util.find_spec("nilearn") is not None
HAS_CT = os.path.isfile(demo_sources.CRANIUM_PATH)
needs_mni = pytest.mark.skipif(not HAS_NILEARN, reason="nilearn is not installed (pip install nilearn)")
needs_ct = pytest.mark.skipif(not HAS_CT, reason="Cranium.inv3 missing (apt-get install invesalius-examples)")
SOURCE_PARAMS = [pytest.param("mni", marks=needs_mni), pytest.param("ct", marks=needs_ct)]
SPACING = 4.0
COUNTS = dict(num_train=2, num_test=2, num_unlabeled=2)
LABELS = {"mni": {"background": 0, "grey_matter": 1, "white_matter": 2},
          "ct": {"background": 0, "soft_tissue": 1, "bone": 2}}


def _make(root, source, seed=0, dataset_id=990, **kw):
    args = dict(COUNTS)
    args.update(kw)
    return make_demo_dataset(str(root), dataset_id, None, source, seed=seed, spacing=SPACING, **args)


def _read(path):
    return sitk.ReadImage(str(path))


def _arrays(folder, sub):
    d = os.path.join(folder, sub)
    return {f: sitk.GetArrayFromImage(_read(os.path.join(d, f))) for f in sorted(os.listdir(d))}


@pytest.fixture(scope="module", params=SOURCE_PARAMS)
def dataset(request, tmp_path_factory):
    """(source, folder) of one small dataset per available source."""
    root = tmp_path_factory.mktemp(f"raw_{request.param}")
    return request.param, _make(root, request.param)


def test_layout_and_dataset_json(dataset):
    source, folder = dataset
    name = {"mni": "AliceDemoMNI", "ct": "AliceDemoCT"}[source]
    assert os.path.basename(folder) == f"Dataset990_{name}"
    assert sorted(os.listdir(folder)) == sorted(
        ["dataset.json", "imagesTr", "labelsTr", "imagesTs", "labelsTs", "imagesUnlabeled"])
    dj = json.load(open(os.path.join(folder, "dataset.json")))
    assert dj["channel_names"] == {"0": "T1" if source == "mni" else "CT"}
    assert dj["labels"] == LABELS[source]
    assert dj["numTraining"] == 2 and dj["file_ending"] == ".nii.gz"
    assert dj["alice_demo"]["source"] == source and dj["alice_demo"]["seed"] == 0
    assert dj["alice_demo"]["unlabeled_folder"] == "imagesUnlabeled"
    for split, img_dir, lab_dir in [("train", "imagesTr", "labelsTr"), ("test", "imagesTs", "labelsTs"),
                                    ("unlabeled", "imagesUnlabeled", None)]:
        ids = case_ids(source, split, 2)
        assert sorted(os.listdir(os.path.join(folder, img_dir))) == [f"{c}_0000.nii.gz" for c in ids]
        if lab_dir:
            assert sorted(os.listdir(os.path.join(folder, lab_dir))) == [f"{c}.nii.gz" for c in ids]
    # nothing but the dataset in the output root (no temporary folders left)
    assert os.listdir(os.path.dirname(folder)) == [os.path.basename(folder)]


def test_geometry_and_label_alignment(dataset):
    source, folder = dataset
    src = demo_sources.load_source(source)
    fg_ext = (src.fg_hi - src.fg_lo) / SPACING  # foreground extent in output voxels (x, y, z)
    for img_dir, lab_dir in [("imagesTr", "labelsTr"), ("imagesTs", "labelsTs"), ("imagesUnlabeled", None)]:
        for f in sorted(os.listdir(os.path.join(folder, img_dir))):
            img = _read(os.path.join(folder, img_dir, f))
            assert img.GetSpacing() == pytest.approx((SPACING,) * 3)
            assert img.GetPixelID() == sitk.sitkInt16
            size = np.array(img.GetSize())
            assert np.all(size >= np.floor(0.8 * fg_ext) - 1) and np.all(size <= np.ceil(1.1 * fg_ext) + 1)
            if lab_dir is None:
                continue
            lab = _read(os.path.join(folder, lab_dir, f.replace("_0000.nii.gz", ".nii.gz")))
            assert lab.GetPixelID() == sitk.sitkUInt8
            assert lab.GetSize() == img.GetSize()
            assert lab.GetSpacing() == pytest.approx(img.GetSpacing())
            assert lab.GetOrigin() == pytest.approx(img.GetOrigin())
            assert lab.GetDirection() == pytest.approx(img.GetDirection())
            # the labels sit on the anatomy: tissue intensities are ordered as expected
            a, l = sitk.GetArrayFromImage(img).astype(float), sitk.GetArrayFromImage(lab)
            means = [a[l == k].mean() for k in (0, 1, 2)]
            if source == "mni":  # T1: background < grey matter < white matter
                assert means[0] < means[1] < means[2]
            else:  # CT: air/background < soft tissue < bone, soft tissue near water
                assert means[0] < means[1] < means[2] and -200 < means[1] < 200 and means[2] > 300


def test_label_values_exactly_declared(dataset):
    source, folder = dataset
    for sub in ("labelsTr", "labelsTs"):
        for f, arr in _arrays(folder, sub).items():
            assert set(np.unique(arr).tolist()) == set(LABELS[source].values()), f


def test_splits_disjoint_and_subjects_differ(dataset):
    source, folder = dataset
    ids = [c for split in ("train", "test", "unlabeled") for c in case_ids(source, split, 2)]
    assert len(set(ids)) == len(ids)
    arrays = [a for sub in ("imagesTr", "imagesTs", "imagesUnlabeled") for a in _arrays(folder, sub).values()]
    for i in range(len(arrays)):
        for j in range(i + 1, len(arrays)):
            assert arrays[i].shape != arrays[j].shape or not np.array_equal(arrays[i], arrays[j])
    labels = list(_arrays(folder, "labelsTr").values()) + list(_arrays(folder, "labelsTs").values())
    # different anatomy, not only different noise: the label maps differ
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            assert labels[i].shape != labels[j].shape or (labels[i] != labels[j]).mean() > 0.02


def test_valid_for_nnunet(dataset):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(dataset[1], num_processes=1)


@needs_mni
def test_determinism_by_seed(tmp_path):
    a = _make(tmp_path / "a", "mni", seed=3, num_test=0, num_unlabeled=1)
    b = _make(tmp_path / "b", "mni", seed=3, num_test=0, num_unlabeled=1)
    c = _make(tmp_path / "c", "mni", seed=4, num_test=0, num_unlabeled=1)
    for sub in ("imagesTr", "labelsTr", "imagesUnlabeled"):
        xa, xb, xc = _arrays(a, sub), _arrays(b, sub), _arrays(c, sub)
        assert xa.keys() == xb.keys() == xc.keys()
        for k in xa:
            assert np.array_equal(xa[k], xb[k])
            assert xa[k].shape != xc[k].shape or not np.array_equal(xa[k], xc[k])
    # a subject depends only on (seed, split, index): more training cases leave the unlabeled pool unchanged
    d = _make(tmp_path / "d", "mni", seed=3, num_train=3, num_test=0, num_unlabeled=1)
    for k, v in _arrays(a, "imagesUnlabeled").items():
        assert np.array_equal(v, _arrays(d, "imagesUnlabeled")[k])


@needs_mni
def test_existing_dataset_needs_overwrite(tmp_path):
    folder = _make(tmp_path, "mni", num_train=1, num_test=0, num_unlabeled=0)
    with pytest.raises(AliceError, match="--overwrite"):
        _make(tmp_path, "mni", num_train=1, num_test=0, num_unlabeled=0)
    with pytest.raises(AliceError, match="already used"):
        make_demo_dataset(str(tmp_path), 990, "Other", "mni", 1, 0, 0, 0, SPACING)
    make_demo_dataset(str(tmp_path), 990, None, "mni", 2, 0, 0, 0, SPACING, overwrite=True)
    assert len(os.listdir(os.path.join(folder, "imagesTr"))) == 2
    assert os.listdir(tmp_path) == [os.path.basename(folder)]


@needs_mni
def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    real = demo_data.make_subject

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(demo_data, "make_subject", flaky)
    with pytest.raises(KeyboardInterrupt):
        _make(tmp_path, "mni")
    assert os.listdir(tmp_path) == []


def test_missing_nilearn_gives_install_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nilearn", None)  # makes "import nilearn..." raise ImportError
    monkeypatch.setitem(sys.modules, "nilearn.datasets", None)
    out = tmp_path / "raw"
    with pytest.raises(AliceError, match="pip install nilearn"):
        _make(out, "mni")
    assert not out.exists()
    with pytest.raises(SystemExit) as e:
        demo_data.main(["--output", str(out)])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "pip install nilearn" in err and err.count("\n") == 1
    assert not out.exists()


def test_missing_ct_gives_install_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo_sources, "CRANIUM_PATH", str(tmp_path / "missing.inv3"))
    out = tmp_path / "raw"
    with pytest.raises(AliceError, match="apt-get install invesalius-examples"):
        _make(out, "ct")
    with pytest.raises(SystemExit) as e:
        demo_data.main(["--source", "ct", "--output", str(out)])
    assert e.value.code != 0
    assert "apt-get install invesalius-examples" in capsys.readouterr().err
    assert not out.exists()


def test_cli_needs_an_output(monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(SystemExit) as e:
        demo_data.main([])
    assert e.value.code != 0 and "nnUNet_raw" in capsys.readouterr().err


def test_bad_arguments_are_alice_errors(tmp_path):
    for kw in (dict(spacing=0), dict(dataset_id=1000), dict(num_train=0), dict(seed=-1)):
        args = dict(output_root=str(tmp_path), source="mni", spacing=SPACING)
        args.update(kw)
        with pytest.raises(AliceError):
            make_demo_dataset(**args)
    assert os.listdir(tmp_path) == []


@needs_mni
def test_cli_writes_dataset(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    assert demo_data.main(["--num-train", "1", "--num-test", "0", "--num-unlabeled", "1", "--spacing", "6",
                           "-d", "7", "--name", "Cli", "-q"]) == 0
    folder = capsys.readouterr().out.strip()
    assert folder == os.path.join(str(tmp_path), "Dataset007_Cli")
    img = _read(os.path.join(folder, "imagesUnlabeled", "mni_un000_0000.nii.gz"))
    assert img.GetSpacing() == pytest.approx((6.0, 6.0, 6.0))
