"""Reconstruction targets from ``ViewSampler`` (real tiny preprocessed dataset, session fixture ``synth_dataset``):
the target has the student's spatial transform and none of its intensity transforms."""
import itertools

import numpy as np
import pytest
import torch

from nnunet_alice.pretrain.config import PretrainConfig
from nnunet_alice.pretrain.data.cases import PretrainData
from nnunet_alice.pretrain.data.views import ViewSampler, build_view_transforms, split_spatial_intensity

PATCH = [24, 32, 32]


@pytest.fixture
def data(synth_dataset, monkeypatch):
    for var, value in synth_dataset.env(n_proc_da=0).items():
        if var.startswith("nnUNet_"):
            monkeypatch.setenv(var, value)
    return PretrainData(synth_dataset.dataset_name, "nnUNetPlans", "3d_fullres", [])


def _sampler(data, augment=True, objective="mae", batch=4, seed=11):
    cfg = PretrainConfig(objective=objective, mask_block_size=8, seed=seed, augment=augment)
    matcher = None
    if objective == "alice":
        from nnunet_alice.pretrain.matching import build_matcher
        matcher = build_matcher("intra", cfg, cache_dir=None)
    return ViewSampler(data, cfg, PATCH, batch_size=batch, matcher=matcher)


def _corr(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm() + 1e-12))


def test_split_keeps_the_spatial_transform_first_and_intensity_after():
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform

    transforms, _ = build_view_transforms(PATCH, augment=True)
    spatial, intensity = split_spatial_intensity(transforms)
    assert any(isinstance(t, SpatialTransform) for t in spatial.transforms)
    assert not any(isinstance(t, SpatialTransform) for t in intensity.transforms)
    assert len(spatial.transforms) + len(intensity.transforms) == len(transforms.transforms)
    names = " ".join(type(getattr(t, "transform", t)).__name__ for t in intensity.transforms)
    for kind in ("GaussianNoise", "Gamma", "Contrast", "Brightness", "Blur", "LowResolution"):
        assert kind in names
    assert split_spatial_intensity(None) == (None, None)


def test_student_is_the_target_plus_the_intensity_transforms(data):
    sampler = _sampler(data)
    spatial, _ = split_spatial_intensity(sampler.transforms)

    class Shift:  # a known "intensity augmentation"
        def __call__(self, **d):
            return dict(d, image=d["image"] * 2.0 + 3.0)

    sampler.__dict__["_split"] = (spatial, Shift())
    b = sampler.make_batch(0)
    assert b["target_q"].shape == b["student_q"].shape == (4, 1, *PATCH)
    assert torch.allclose(b["student_q"], b["target_q"] * 2.0 + 3.0)


def _copy_of(view, ref):
    """Whether ``view`` is ``ref`` moved by at most one voxel per axis (crop centres of different crop sizes round
    differently), compared on the interior."""
    inner = view[..., 1:-1, 1:-1, 1:-1]
    n = view.shape[-3:]
    for d in itertools.product((-1, 0, 1), repeat=3):
        window = ref[..., 1 + d[0]:n[0] - 1 + d[0], 1 + d[1]:n[1] - 1 + d[1], 1 + d[2]:n[2] - 1 + d[2]]
        if torch.equal(inner, window):
            return True
    return False


def test_target_has_the_spatial_transform_and_no_intensity_augmentation(data):
    """Same seed with and without augmentation: same cases and centres. Where no rotation/scaling is drawn (~64 %
    of samples) the target is an exact copy of the un-augmented crop, whatever intensity augmentation the student
    got; elsewhere it is the student view without the intensity changes (correlation 1 up to those)."""
    aug, plain = _sampler(data, batch=6), _sampler(data, augment=False, batch=6)
    copies, student_changed, corr_target, corr_student = 0, 0, [], []
    for index in range(3):
        a, p = aug.make_batch(index), plain.make_batch(index)
        assert a["case_q"] == p["case_q"]
        for t, s, ref in zip(a["target_q"], a["student_q"], p["student_q"]):
            if _copy_of(t, ref):
                copies += 1
                student_changed += int(not _copy_of(s, ref))
            corr_target.append(_corr(t, ref))
            corr_student.append(_corr(s, ref))
    assert copies >= 6            # of 18 samples
    assert student_changed >= 2   # ... among which the student view was intensity-augmented
    assert np.mean(corr_target) > 0.5


def test_no_augment_target_is_the_view_and_alice_batches_carry_both_targets(data):
    b = _sampler(data, augment=False).make_batch(0)
    assert torch.equal(b["target_q"], b["student_q"])
    a = _sampler(data, objective="alice", batch=2).make_batch(0)
    for v in ("q", "k"):
        assert a[f"target_{v}"].shape == a[f"student_{v}"].shape == (2, 1, *PATCH)
        assert np.mean([_corr(t, s) for t, s in zip(a[f"target_{v}"], a[f"student_{v}"])]) > 0.5
