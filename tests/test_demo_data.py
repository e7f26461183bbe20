"""Tests of ``alice_demo_data``: layout, geometry, labels, determinism, disjoint splits, nnU-Net validity, errors.
The anatomy task's own properties are in ``test_demo_anatomy.py``.

Small datasets at 4 mm keep the file fast. Sources that are not installed are skipped with the reason; the CT
code path is also run on a small phantom written in the InVesalius format.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_alice.errors import AliceError
from nnunet_alice.demo import cli as demo_data, sources as demo_sources
from nnunet_alice.demo.cli import case_ids, make_demo_dataset

from demo_fixtures import LABELS, SOURCE_PARAMS, SPACING, TASK, arrays, make_small, needs_mni, read


@pytest.fixture(scope="module", params=SOURCE_PARAMS)
def dataset(request, tmp_path_factory):
    """(source, folder) of one small dataset per available source."""
    root = tmp_path_factory.mktemp(f"raw_{request.param}")
    return request.param, make_small(root, request.param)


def test_layout_and_dataset_json(dataset):
    source, folder = dataset
    name = {"mni": "AliceDemoAnatomy", "ct": "AliceDemoCT"}[source]
    assert os.path.basename(folder) == f"Dataset990_{name}"
    assert sorted(os.listdir(folder)) == sorted(
        ["dataset.json", "imagesTr", "labelsTr", "imagesTs", "labelsTs", "imagesUnlabeled"])
    dj = json.load(open(os.path.join(folder, "dataset.json")))
    assert dj["channel_names"] == {"0": "T1" if source == "mni" else "CT"}
    assert dj["labels"] == LABELS[source]
    assert dj["numTraining"] == 2 and dj["file_ending"] == ".nii.gz"
    assert dj["alice_demo"]["source"] == source and dj["alice_demo"]["seed"] == 0
    assert dj["alice_demo"]["task"] == TASK[source]
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
    lo, hi = src.fg_box(TASK[source])
    fg_ext = (hi - lo) / SPACING  # foreground extent in output voxels (x, y, z)
    for img_dir, lab_dir in [("imagesTr", "labelsTr"), ("imagesTs", "labelsTs"), ("imagesUnlabeled", None)]:
        for f in sorted(os.listdir(os.path.join(folder, img_dir))):
            img = read(os.path.join(folder, img_dir, f))
            assert img.GetSpacing() == pytest.approx((SPACING,) * 3)
            assert img.GetPixelID() == sitk.sitkInt16
            size = np.array(img.GetSize())
            assert np.all(size >= np.floor(0.8 * fg_ext) - 1) and np.all(size <= np.ceil(1.1 * fg_ext) + 1)
            if lab_dir is None:
                continue
            lab = read(os.path.join(folder, lab_dir, f.replace("_0000.nii.gz", ".nii.gz")))
            assert lab.GetPixelID() == sitk.sitkUInt8
            assert lab.GetSize() == img.GetSize()
            assert lab.GetSpacing() == pytest.approx(img.GetSpacing())
            assert lab.GetOrigin() == pytest.approx(img.GetOrigin())
            assert lab.GetDirection() == pytest.approx(img.GetDirection())
            # the labels sit on the anatomy: tissue intensities are ordered as expected
            a, l = sitk.GetArrayFromImage(img).astype(float), sitk.GetArrayFromImage(lab)
            if source == "mni":  # T1: background < CSF < grey matter < white matter
                names = LABELS["mni"]
                csf = a[np.isin(l, [names["ventricles"], names["other_csf"]])].mean()
                gm = a[np.isin(l, [v for k, v in names.items() if k.endswith("_gm")])].mean()
                assert a[l == 0].mean() < csf < gm < a[l == names["white_matter"]].mean()
            else:  # CT: air/background < soft tissue < bone, soft tissue near water
                means = [a[l == k].mean() for k in (0, 1, 2)]
                assert means[0] < means[1] < means[2] and -200 < means[1] < 200 and means[2] > 300


def test_label_values_exactly_declared(dataset):
    source, folder = dataset
    for sub in ("labelsTr", "labelsTs"):
        for f, arr in arrays(folder, sub).items():
            assert set(np.unique(arr).tolist()) == set(LABELS[source].values()), f


def test_splits_disjoint_and_subjects_differ(dataset):
    source, folder = dataset
    ids = [c for split in ("train", "test", "unlabeled") for c in case_ids(source, split, 2)]
    assert len(set(ids)) == len(ids)
    images = [a for sub in ("imagesTr", "imagesTs", "imagesUnlabeled") for a in arrays(folder, sub).values()]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert images[i].shape != images[j].shape or not np.array_equal(images[i], images[j])
    labels = list(arrays(folder, "labelsTr").values()) + list(arrays(folder, "labelsTs").values())
    # different anatomy, not only different noise: the label maps differ
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            assert labels[i].shape != labels[j].shape or (labels[i] != labels[j]).mean() > 0.02


def test_valid_for_nnunet(dataset):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(dataset[1], num_processes=1)


@needs_mni
def test_determinism_by_seed(tmp_path):
    a = make_small(tmp_path / "a", "mni", seed=3, num_test=0, num_unlabeled=1)
    b = make_small(tmp_path / "b", "mni", seed=3, num_test=0, num_unlabeled=1)
    c = make_small(tmp_path / "c", "mni", seed=4, num_test=0, num_unlabeled=1)
    for sub in ("imagesTr", "labelsTr", "imagesUnlabeled"):
        xa, xb, xc = arrays(a, sub), arrays(b, sub), arrays(c, sub)
        assert xa.keys() == xb.keys() == xc.keys()
        for k in xa:
            assert np.array_equal(xa[k], xb[k])
            assert xa[k].shape != xc[k].shape or not np.array_equal(xa[k], xc[k])
    # a subject depends only on (seed, split, index): more training cases leave the unlabeled pool unchanged
    d = make_small(tmp_path / "d", "mni", seed=3, num_train=3, num_test=0, num_unlabeled=1)
    for k, v in arrays(a, "imagesUnlabeled").items():
        assert np.array_equal(v, arrays(d, "imagesUnlabeled")[k])
    # ... and not on how many processes make the subjects
    e = make_small(tmp_path / "e", "mni", seed=3, num_test=0, num_unlabeled=1, workers=2)
    for sub in ("imagesTr", "labelsTr", "imagesUnlabeled"):
        xa, xe = arrays(a, sub), arrays(e, sub)
        assert xa.keys() == xe.keys() and all(np.array_equal(xa[k], xe[k]) for k in xa)


@needs_mni
def test_existing_dataset_needs_overwrite(tmp_path):
    folder = make_small(tmp_path, "mni", num_train=1, num_test=0, num_unlabeled=0)
    with pytest.raises(AliceError, match="--overwrite"):
        make_small(tmp_path, "mni", num_train=1, num_test=0, num_unlabeled=0)
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
        make_small(tmp_path, "mni")
    assert os.listdir(tmp_path) == []


def test_missing_nilearn_gives_install_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nilearn", None)  # makes "import nilearn..." raise ImportError
    monkeypatch.setitem(sys.modules, "nilearn.datasets", None)
    out = tmp_path / "raw"
    with pytest.raises(AliceError, match="pip install nilearn"):
        make_small(out, "mni")
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
        make_small(out, "ct")
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
    for kw in (dict(spacing=0), dict(dataset_id=1000), dict(num_train=0), dict(seed=-1), dict(workers=0)):
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
    img = read(os.path.join(folder, "imagesUnlabeled", "mni_un000_0000.nii.gz"))
    assert img.GetSpacing() == pytest.approx((6.0, 6.0, 6.0))




@needs_mni
def test_written_files_read_the_same_with_simpleitk_and_nibabel(dataset):
    """nnU-Net's SimpleITK and nibabel readers see the same array and spacing (the latter is used where
    SimpleITK is not installed)."""
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIO
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    folder = dataset[1]
    for sub, name in (("imagesTr", f"{dataset[0]}_tr000_0000.nii.gz"), ("labelsTr", f"{dataset[0]}_tr000.nii.gz")):
        path = os.path.join(folder, sub, name)
        a, pa = SimpleITKIO().read_images([path])
        b, pb = NibabelIO().read_images([path])
        assert np.array_equal(a, b) and np.allclose(pa["spacing"], pb["spacing"])


def _write_inv3(path, hu_zyx, spacing):
    """A minimal InVesalius project (gzip'ed tar with main.plist and matrix.dat), as ``read_inv3`` reads it."""
    import io
    import plistlib
    import tarfile

    meta = {"matrix": {"filename": "matrix.dat", "dtype": "int16", "shape": list(hu_zyx.shape)},
            "spacing": list(spacing)}
    with tarfile.open(path, "w:gz") as tf:
        for name, data in (("main.plist", plistlib.dumps(meta)), ("matrix.dat", hu_zyx.astype(np.int16).tobytes())):
            info = tarfile.TarInfo(f"Cranium/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_ct_path_on_a_small_phantom(tmp_path):
    """The CT source code path, on a phantom: a water ellipsoid with a bone shell and a detached head holder."""
    z, y, x = np.ogrid[:40, :64, :64]
    r = ((z - 20) / 16.0) ** 2 + ((y - 30) / 24.0) ** 2 + ((x - 32) / 24.0) ** 2
    hu = np.full((40, 64, 64), -1000, np.int16)
    hu[r <= 1.0] = 1000
    hu[r <= 0.8] = 40
    hu[:, 60:, 20:44] = 200  # holder, not connected to the head
    inv3 = tmp_path / "phantom.inv3"
    _write_inv3(inv3, hu, (2.0, 2.0, 3.0))
    demo_sources._CACHE.clear()
    folder = make_demo_dataset(str(tmp_path / "raw"), 993, None, "ct", 1, 0, 1, seed=0, spacing=4.0,
                               ct_path=str(inv3))
    demo_sources._CACHE.clear()
    dj = json.load(open(os.path.join(folder, "dataset.json")))
    assert dj["labels"] == LABELS["ct"] and dj["channel_names"] == {"0": "CT"}
    a = arrays(folder, "imagesTr")["ct_tr000_0000.nii.gz"].astype(float)
    l = arrays(folder, "labelsTr")["ct_tr000.nii.gz"]
    assert set(np.unique(l).tolist()) == {0, 1, 2}
    assert a[l == 0].mean() < -500 and -100 < a[l == 1].mean() < 150 and a[l == 2].mean() > 600
