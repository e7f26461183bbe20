"""Schedules against their closed forms (DINO, arXiv 2104.14294, Sec. 3 and App.; docs/method.md "Optimisation")."""
import math

import numpy as np
import pytest

from nnunet_alice.pretrain.config import PretrainConfig
from nnunet_alice.pretrain.training.schedules import (Schedules, cosine_schedule, linear_warmup_constant,
                                                      momentum_schedule)


def test_cosine_with_warmup_closed_form():
    s = cosine_schedule(1.0, 0.1, total_steps=20, warmup_steps=5, warmup_start_value=0.2)
    assert s.shape == (20,)
    assert s[0] == pytest.approx(0.2)                       # first: warm-up start
    assert s[2] == pytest.approx(0.2 + 0.8 * 2 / 5)         # linear ramp
    assert s[5] == pytest.approx(1.0)                       # warm-up end: the peak
    assert s[-1] == pytest.approx(0.1)                      # last: the floor, exactly
    j, n = 7, 15                                            # a cosine step in the middle
    assert s[5 + j] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * j / (n - 1))))
    assert np.all(np.diff(s[:6]) > 0) and np.all(np.diff(s[5:]) < 0)


def test_cosine_without_warmup_and_increasing():
    s = cosine_schedule(0.04, 0.4, total_steps=11)          # weight decay goes *up*
    assert s[0] == pytest.approx(0.04) and s[-1] == pytest.approx(0.4)
    assert s[5] == pytest.approx(0.22)                      # midpoint of a half cosine
    assert np.all(np.diff(s) > 0)


def test_cosine_degenerate_lengths():
    assert cosine_schedule(1.0, 0.0, 1).tolist() == [1.0]
    assert cosine_schedule(1.0, 0.0, 1, warmup_steps=3).tolist() == [0.0]
    s = cosine_schedule(1.0, 0.0, 4, warmup_steps=8)         # run ends inside the warm-up: slope kept
    np.testing.assert_allclose(s, [0.0, 0.125, 0.25, 0.375])
    s = cosine_schedule(1.0, 0.0, 5, warmup_steps=4)         # one cosine step left: the peak
    np.testing.assert_allclose(s, [0.0, 0.25, 0.5, 0.75, 1.0])
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, 0)
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, 3, warmup_steps=-1)


def test_linear_warmup_constant_teacher_temp():
    t = linear_warmup_constant(0.008, 0.01, warmup_steps=4, total_steps=10)
    np.testing.assert_allclose(t[:4], [0.008, 0.0085, 0.009, 0.0095])
    np.testing.assert_allclose(t[4:], 0.01)
    assert np.all(np.diff(t) >= 0)
    np.testing.assert_allclose(linear_warmup_constant(0.008, 0.01, 0, 3), 0.01)
    np.testing.assert_allclose(linear_warmup_constant(0.0, 1.0, 10, 2), [0.0, 0.1])


def test_momentum_schedule_formula():
    n = 100
    m = momentum_schedule(n, base=0.996)
    assert m.shape == (n,)
    for i in (0, 25, 50, 99):
        assert m[i] == pytest.approx(1 - 0.004 * 0.5 * (1 + math.cos(math.pi * i / n)))
    assert m[0] == pytest.approx(0.996) and m[50] == pytest.approx(0.998)
    assert np.all(np.diff(m) > 0) and m[-1] < 1.0
    assert momentum_schedule(1).tolist() == pytest.approx([0.996])


def test_schedules_from_config():
    cfg = PretrainConfig(lr=1e-3, min_lr=1e-5, warmup_fraction=0.1, warmup_teacher_temp_fraction=0.2, steps=50,
                         warmup_min_steps=0, warmup_teacher_temp_min_steps=0)      # fractions only
    s = Schedules.from_config(cfg)
    assert s.total_steps == 50
    for a in (s.lr, s.weight_decay, s.momentum, s.teacher_temp):
        assert a.shape == (50,)
    assert s.lr[0] == 0.0 and s.lr[5] == pytest.approx(1e-3) and s.lr[-1] == pytest.approx(1e-5)
    assert s.lr.max() == pytest.approx(1e-3)                # min_lr below the peak: it really decays (B9)
    assert s.weight_decay[0] == pytest.approx(0.04) and s.weight_decay[-1] == pytest.approx(0.4)
    assert s.teacher_temp[0] == pytest.approx(0.008) and s.teacher_temp[10:].min() == pytest.approx(0.01)
    assert s.teacher_temp[9] < 0.01
    assert s.momentum[0] == pytest.approx(0.996)
    v = s.at(5)
    assert v["lr"] == pytest.approx(1e-3) and isinstance(v["momentum"], float)
    assert s.at(10_000) == s.at(49)
    one = Schedules.from_config(cfg, total_steps=1)
    assert one.lr.tolist() == pytest.approx([1e-3]) and one.teacher_temp.tolist() == pytest.approx([0.01])


def test_steps_with_floor():
    from nnunet_alice.pretrain.training.schedules import steps_with_floor

    assert steps_with_floor(0.05, 50, 10_000) == 500             # the fraction wins on long runs
    assert steps_with_floor(0.05, 50, 200) == 50                 # the floor on short ones
    assert steps_with_floor(0.05, 50, 60) == 30                  # the floor is capped at half the run
    assert steps_with_floor(0.8, 50, 100) == 80                  # an explicit fraction is kept
    assert steps_with_floor(0.0, 0, 100) == 0
    assert steps_with_floor(0.001, 25, 1) == 0
    with pytest.raises(ValueError):
        steps_with_floor(-0.1, 5, 10)


def test_short_runs_keep_their_warm_ups_and_freeze():
    """At 100 steps the fractions alone give a 0-step freeze and a 3-step temperature warm-up; the floors don't."""
    cfg = PretrainConfig(steps=100)
    bare = Schedules.from_config(PretrainConfig(steps=100, warmup_min_steps=0, warmup_teacher_temp_min_steps=0,
                                                freeze_last_layer_min_steps=0))
    assert (bare.freeze_last_layer_steps, bare.teacher_temp_warmup_steps, bare.lr_warmup_steps) == (0, 3, 5)
    s = Schedules.from_config(cfg)
    assert (s.freeze_last_layer_steps, s.teacher_temp_warmup_steps, s.lr_warmup_steps) == (25, 50, 50)
    assert s.lr[49] < cfg.lr and s.lr[50] == pytest.approx(cfg.lr)
    assert s.teacher_temp[49] < cfg.teacher_temp and s.teacher_temp[50] == pytest.approx(cfg.teacher_temp)
