"""Query-point sampling and match-with-retries: foreground/margins, thresholds, intra fallback."""
import numpy as np
import pytest

from nnunet_alice.pretrain.matching.base import CaseVolume, Matcher
from nnunet_alice.pretrain.matching.intra import IntraVolumeMatcher
from nnunet_alice.pretrain.matching.sampling import (ForegroundSampler, match_with_retries, otsu_threshold,
                                                     sample_query_point)


def cube_case(case_id="c", n=32, lo=8, hi=24):
    img = np.zeros((1, n, n, n), np.float32)
    img[0, lo:hi, lo:hi, lo:hi] = 100.0
    img += np.random.default_rng(0).normal(0, 1, img.shape).astype(np.float32)
    return CaseVolume(case_id, img, (1.0, 1.0, 1.0))


class ScriptedMatcher(Matcher):
    """Returns the given scores in turn and a fixed offset point."""
    name = "scripted"

    def __init__(self, scores):
        self.scores = list(scores)
        self.calls = 0

    def match(self, case_a, point_a, case_b, rng=None):
        s = self.scores[min(self.calls, len(self.scores) - 1)]
        self.calls += 1
        return np.asarray(point_a, float) + 1.0, s


def test_otsu_separates_two_modes():
    rng = np.random.default_rng(1)
    v = np.concatenate([rng.normal(0, 1, 5000), rng.normal(10, 1, 2000)])
    assert 3 < otsu_threshold(v) < 7


def test_query_points_are_foreground_and_inside_margin():
    case = cube_case()
    rng = np.random.default_rng(0)
    pts = np.stack([sample_query_point(case, rng, margin=10) for _ in range(200)])
    assert np.all(pts >= 10) and np.all(pts <= 32 - 1 - 10)
    assert np.all(pts == np.round(pts))
    vals = case.image[0][tuple(pts.astype(int).T)]
    assert np.all(vals > 50)                      # on the bright cube, never on background
    # per-axis margin larger than half the volume on one axis: that axis collapses to its centre
    p = ForegroundSampler().sample(case, rng, margin=(20, 2, 2))
    assert p[0] == pytest.approx(15.5, abs=0.5)


def test_sampler_without_foreground_inside_margin_still_returns_a_point():
    case = cube_case(lo=0, hi=3)
    p = sample_query_point(case, np.random.default_rng(0), margin=8)
    assert np.all(p >= 8) and np.all(p <= 23)


def test_low_scores_fall_back_to_intra_after_every_try():
    a, b = cube_case("a"), cube_case("b")
    m = ScriptedMatcher([0.1])
    pa, pb, score, fell_back = match_with_retries(m, a, b, np.random.default_rng(0), threshold=0.7, tries=5)
    assert fell_back and np.array_equal(pa, pb) and score == pytest.approx(0.1)
    assert m.calls == 5


def test_retries_until_threshold_then_accepts():
    a, b = cube_case("a"), cube_case("b")
    m = ScriptedMatcher([0.2, 0.5, 0.9])
    pa, pb, score, fell_back = match_with_retries(m, a, b, np.random.default_rng(0), threshold=0.7, tries=10)
    assert not fell_back and score == pytest.approx(0.9)
    assert np.allclose(pb, pa + 1.0)
    assert m.calls == 3                                   # stops at the first score over the threshold


def test_nan_scores_never_pass():
    a, b = cube_case("a"), cube_case("b")
    rng = np.random.default_rng(0)
    good, bad = ScriptedMatcher([0.95]), ScriptedMatcher([float("nan")])
    assert [match_with_retries(good, a, b, rng, tries=4)[3] for _ in range(3)] == [False] * 3
    assert match_with_retries(bad, a, b, rng, tries=4)[3] is True
    assert (good.calls, bad.calls) == (3, 4)


def test_match_point_is_clipped_into_case_b():
    a, b = cube_case("a", n=32), cube_case("b", n=20, lo=2, hi=18)

    class Far(Matcher):
        def match(self, case_a, point_a, case_b, rng=None):
            return np.array([50.0, -3.0, 10.0]), 0.99

    _, pb, _, fell_back = match_with_retries(Far(), a, b, np.random.default_rng(0))
    assert not fell_back and np.array_equal(pb, [19.0, 0.0, 10.0])


def test_intra_matcher_always_passes():
    a = cube_case("a")
    m = IntraVolumeMatcher(jitter=0.0)
    pa, pb, score, fell_back = match_with_retries(m, a, a, np.random.default_rng(0))
    assert not fell_back and score == 1.0 and np.array_equal(pa, pb)
