"""The ``registration`` matcher: a known affine is recovered; its disk cache is keyed, validated, refreshed."""
import glob
import os
import pickle

import numpy as np
import pytest
from scipy.ndimage import affine_transform, gaussian_filter

from nnunet_alice.pretrain.matching.base import CaseVolume
from nnunet_alice.pretrain.matching.registration import RegistrationMatcher, local_ncc

SPACING = (2.0, 1.0, 1.0)      # anisotropic on purpose: catches numpy/SimpleITK axis-order mistakes


def phantom(shape=(24, 40, 40), seed=0):
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) * s for n, s in zip(shape, SPACING)],
                             indexing="ij"), 0)
    vol = np.zeros(shape, np.float32)
    centre = np.array([24.0, 20.0, 20.0])
    body = (((g - centre[:, None, None, None]) / np.array([20, 17, 15])[:, None, None, None]) ** 2).sum(0) <= 1
    vol[body] = 1.0
    for c, r, v in (([18, 14, 12], [6, 5, 4], 3.0), ([30, 25, 26], [7, 4, 5], 2.0), ([24, 12, 27], [4, 4, 3], 4.0)):
        m = (((g - np.array(c, float)[:, None, None, None]) / np.array(r, float)[:, None, None, None]) ** 2).sum(0) <= 1
        vol[m] = v
    vol += 0.05 * rng.normal(size=shape).astype(np.float32)
    return gaussian_filter(vol, 0.8)


def known_affine(angle_deg=6.0, shift_mm=(3.0, -2.0, 2.5)):
    """(B voxel -> A voxel) 3x3 and offset: B(p) = A(M p + o), rotation about the centre in mm."""
    t = np.deg2rad(angle_deg)
    rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    s = np.diag(SPACING)
    centre_mm = np.array([24.0, 20.0, 20.0])
    m = np.linalg.inv(s) @ rot @ s
    o = np.linalg.inv(s) @ (centre_mm - rot @ centre_mm + np.asarray(shift_mm))
    return m, o


def pair():
    a = phantom()
    m, o = known_affine()
    b = affine_transform(a, m, offset=o, order=1, mode="nearest")
    return CaseVolume("a", a[None], SPACING), CaseVolume("b", b[None], SPACING), m, o


def test_known_affine_is_recovered():
    ca, cb, m, o = pair()
    matcher = RegistrationMatcher()
    matcher.prepare([ca, cb])
    rng = np.random.default_rng(0)
    errors, scores = [], []
    for _ in range(20):
        pb_true = rng.uniform([8, 12, 12], [16, 28, 28])
        pa = m @ pb_true + o
        pb, score = matcher.match(ca, pa, cb)
        errors.append(np.linalg.norm((pb - pb_true) * np.asarray(SPACING)))
        scores.append(score)
    assert np.median(errors) < 1.0 and max(errors) < 2.0, errors
    assert np.median(scores) > 0.8
    # the inverse direction is consistent
    back, _ = matcher.match(cb, pb, ca)
    assert np.linalg.norm((back - pa) * np.asarray(SPACING)) < 0.1


def test_score_is_ncc_in_range():
    rng = np.random.default_rng(0)
    x = rng.normal(size=100)
    assert local_ncc(x, 3 * x + 1) == pytest.approx(1.0)
    assert local_ncc(x, -x) == pytest.approx(-1.0)
    assert local_ncc(x, np.ones(100)) == 0.0


def test_cache_is_reused_refreshed_when_stale_and_rewritten_when_corrupt(tmp_path):
    ca, cb, _, _ = pair()
    first = RegistrationMatcher(cache_dir=str(tmp_path), iterations=20)
    first.prepare([ca, cb])
    assert (first.n_computed, first.n_loaded) == (1, 0)
    files = glob.glob(str(tmp_path / "alice_registration" / "*" / "b__*.json"))
    assert len(files) == 1

    again = RegistrationMatcher(cache_dir=str(tmp_path), iterations=20)
    again.prepare([ca, cb])
    assert (again.n_computed, again.n_loaded) == (1 - 1, 1)
    assert np.allclose(again.matrices["b"], first.matrices["b"])

    # changed data -> new fingerprint -> recomputed; the stale entry is removed
    cb2 = CaseVolume("b", cb.image * 1.5 + 0.1, SPACING)
    changed = RegistrationMatcher(cache_dir=str(tmp_path), iterations=20)
    changed.prepare([ca, cb2])
    assert changed.n_computed == 1
    files2 = glob.glob(str(tmp_path / "alice_registration" / "*" / "b__*.json"))
    assert len(files2) == 1 and files2 != files

    # corrupt entry -> recomputed and rewritten
    with open(files2[0], "w") as f:
        f.write("{ not json")
    fixed = RegistrationMatcher(cache_dir=str(tmp_path), iterations=20)
    fixed.prepare([ca, cb2])
    assert (fixed.n_computed, fixed.n_loaded) == (1, 0)
    assert RegistrationMatcher._valid_entry(__import__("json").load(open(files2[0])), {}) is not None

    # a different reference case keys a different folder
    RegistrationMatcher(cache_dir=str(tmp_path), iterations=20).prepare([cb2, ca])
    assert len(os.listdir(tmp_path / "alice_registration")) == 2


def test_pickled_matcher_maps_points_without_the_reference_image():
    ca, cb, m, o = pair()
    matcher = RegistrationMatcher()
    matcher.prepare([ca, cb])
    clone = pickle.loads(pickle.dumps(matcher))
    assert clone.reference[2] is None
    p = np.array([12.0, 20.0, 20.0])
    assert np.allclose(clone.match(ca, p, cb)[0], matcher.match(ca, p, cb)[0])
