"""Tests of the demo's ``anatomy`` task: every class in every subject, labels carried by the deformation, not
solvable by intensity; T2-like contrast, the task/contrast errors and defaults; the ``tissue`` task stays available.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_alice.errors import AliceError
from nnunet_alice.demo import augment as demo_augment, cli as demo_data, sources as demo_sources
from nnunet_alice.demo.cli import case_ids, make_demo_dataset

from demo_fixtures import HAS_NILEARN, LABELS, SPACING, arrays, make_small, needs_mni, read


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """("mni", folder) of one small anatomy dataset."""
    if not HAS_NILEARN:
        pytest.skip("nilearn is not installed (pip install nilearn)")
    return "mni", make_small(tmp_path_factory.mktemp("raw_mni"), "mni")


def _subject(split_code, i, seed=0, task="anatomy", spacing=SPACING, **kw):
    src = demo_sources.load_source("mni")
    return demo_augment.make_subject(src, (spacing,) * 3, np.random.default_rng([seed, split_code, i]), task, **kw)


@needs_mni
def test_tissue_task_is_still_available(tmp_path):
    folder = make_demo_dataset(str(tmp_path), 991, None, "mni", 1, 0, 0, seed=0, spacing=SPACING, task="tissue")
    assert os.path.basename(folder) == "Dataset991_AliceDemoMNI"
    dj = json.load(open(os.path.join(folder, "dataset.json")))
    assert dj["labels"] == {"background": 0, "grey_matter": 1, "white_matter": 2}
    assert dj["alice_demo"]["task"] == "tissue"
    lab = arrays(folder, "labelsTr")["mni_tr000.nii.gz"]
    assert set(np.unique(lab).tolist()) == {0, 1, 2}


@needs_mni
def test_anatomy_every_class_in_every_subject():
    classes = set(LABELS["mni"].values())
    for i in range(10):  # random fields of view, deformations and ventricle sizes
        subject = _subject(1 + i % 3, i)
        assert set(np.unique(subject.labels).tolist()) == classes, i


def _inner_template_points(src, task, size=5):
    """Per class, the template point (LPS mm) nearest the class's centroid whose size^3 neighbourhood is all
    that class (so a small mapping error cannot change its class)."""
    from scipy import ndimage as ndi

    lab = src.labels(task)
    uniform = ndi.minimum_filter(lab, size=size) == ndi.maximum_filter(lab, size=size)
    points = {}
    for k in range(1, int(lab.max()) + 1):
        idx = np.argwhere(uniform & (lab == k))
        centre = np.argwhere(lab == k).mean(axis=0)
        best = idx[np.argmin(((idx - centre) ** 2).sum(axis=1))]
        points[k] = src.affine[:3, :3] @ best + src.affine[:3, 3]
    return points


@needs_mni
def test_labels_follow_the_deformation(dataset):
    """A known template point lands, in each subject, on a voxel of the same class; the written files hold those
    labels on that geometry (read back through SimpleITK, an independent reader)."""
    source, folder = dataset
    if source != "mni":
        pytest.skip("anatomy task: mni only")
    for i, case in enumerate(case_ids("mni", "train", 2)):
        subject = _subject(1, i)  # the subject make_demo_dataset wrote for this case
        lab_img = read(os.path.join(folder, "labelsTr", case + ".nii.gz"))
        assert np.array_equal(sitk.GetArrayFromImage(lab_img), subject.labels.transpose(2, 1, 0))
        voxel = [int(s) // 3 for s in subject.grid.size]
        assert np.allclose(lab_img.TransformIndexToPhysicalPoint(voxel),
                           subject.grid.affine[:3, :3] @ np.array(voxel) + subject.grid.affine[:3, 3], atol=1e-3)

    src = demo_sources.load_source("mni")
    points = _inner_template_points(src, "anatomy")
    moved, checked = [], 0
    for i in range(3):  # 2 mm: the subject's voxels sample the template densely enough to find each point
        subject = _subject(2, i, spacing=2.0)
        src_pts = subject.transform.source_points().reshape(3, -1)
        for k, q in points.items():
            dist = np.abs(src_pts - q[:, None]).max(axis=0)
            j = int(np.argmin(dist))
            if dist[j] > 1.5:  # outside this subject's field of view
                continue
            voxel = np.unravel_index(j, subject.grid.size)
            assert subject.labels[voxel] == k, (i, k)
            undeformed = np.round(np.linalg.solve(subject.grid.affine[:3, :3], q - subject.grid.affine[:3, 3]))
            moved.append(np.abs(undeformed - np.array(voxel)).max())
            checked += 1
    assert checked >= 2 * len(points)  # most points are inside most fields of view
    assert max(moved) >= 2  # the deformation really moved the anatomy (several voxels), so the check is not trivial


def _intensity_classifier_dice(train, test, n_classes, bins=np.linspace(0.0, 1.2, 61)):
    """Mean foreground Dice on ``test`` of the best per-voxel intensity -> class table fit on ``train`` (both
    images scaled by their 99th percentile)."""
    def binned(img):
        x = img.astype(np.float32)
        return np.digitize(x / np.percentile(x, 99), bins)

    counts = np.zeros((len(bins) + 1, n_classes))
    np.add.at(counts, (binned(train.image).ravel(), train.labels.ravel()), 1)
    pred = counts.argmax(axis=1)[binned(test.image)]
    dice = [2 * np.sum((pred == k) & (test.labels == k)) / max(np.sum(pred == k) + np.sum(test.labels == k), 1)
            for k in range(1, n_classes)]
    return float(np.mean(dice))


@needs_mni
def test_intensity_alone_cannot_solve_the_anatomy_task():
    """An intensity-only classifier fit on one labelled subject does well on the tissue task and fails on the
    anatomy task; even fit on the test subject itself (the best any intensity rule can do) it fails."""
    src = demo_sources.load_source("mni")
    result = {}
    for task in ("tissue", "anatomy"):
        n = len(src.label_names(task))
        train = _subject(1, 0, task=task, spacing=3.0)
        tests = [_subject(2, i, task=task, spacing=3.0) for i in range(2)]
        result[task] = (np.mean([_intensity_classifier_dice(train, t, n) for t in tests]),
                        np.mean([_intensity_classifier_dice(t, t, n) for t in tests]))
    assert result["tissue"][0] > 0.6, result
    assert result["anatomy"][0] < result["tissue"][0] - 0.3, result
    assert result["anatomy"][1] < 0.45 < result["tissue"][1], result  # the intensity upper bound


@needs_mni
def test_t2_fraction_makes_t2_like_subjects(tmp_path):
    folder = make_demo_dataset(str(tmp_path), 992, None, "mni", 1, 0, 0, seed=0, spacing=SPACING, t2_fraction=1.0)
    dj = json.load(open(os.path.join(folder, "dataset.json")))
    assert dj["channel_names"] == {"0": "MR"} and dj["alice_demo"]["variation"]["t2_fraction"] == 1.0
    a = arrays(folder, "imagesTr")["mni_tr000_0000.nii.gz"].astype(float)
    l = arrays(folder, "labelsTr")["mni_tr000.nii.gz"]
    names = LABELS["mni"]
    csf, gm, wm = (a[l == names[k]].mean() for k in ("ventricles", "frontal_gm", "white_matter"))
    assert csf > gm > wm  # T2-like: CSF bright, white matter dark


def test_task_and_contrast_errors(tmp_path):
    for kw, msg in ((dict(source="ct", task="anatomy"), "--task tissue"), (dict(task="shape"), "unknown --task"),
                    (dict(t2_fraction=1.5), "--t2-fraction"), (dict(source="ct", task="tissue", t2_fraction=0.5),
                                                               "--t2-fraction")):
        args = dict(output_root=str(tmp_path), spacing=SPACING)
        args.update(kw)
        with pytest.raises(AliceError, match=msg):
            make_demo_dataset(**args)
    assert os.listdir(tmp_path) == []


def test_defaults_anatomy_and_a_large_unlabeled_pool():
    args = demo_data.build_parser().parse_args([])
    assert args.num_unlabeled >= 64 and args.task is None
    assert demo_data.resolve_task("mni", None) == "anatomy" and demo_data.resolve_task("ct", None) == "tissue"
