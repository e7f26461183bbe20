"""Settings of the teacher side are checked before anything runs, and the collapse monitor reads the targets."""
import math

import pytest

from nnunet_alice.errors import AliceError
from nnunet_alice.pretrain.config import PretrainConfig
from nnunet_alice.pretrain.training.monitor import CollapseMonitor


def test_defaults_are_valid():
    cfg = PretrainConfig(dataset_name="Dataset001_X").validate()
    assert (cfg.centering, cfg.cls_pool) == ("sinkhorn", "mlp")


@pytest.mark.parametrize("overrides,option", [
    ({"centering": "median"}, "--centering"),
    ({"cls_pool": "attention"}, "--cls-pool"),
    ({"teacher_temp": 0.0}, "--teacher-temp"),
    ({"warmup_teacher_temp": -0.01}, "--warmup-teacher-temp"),
    ({"student_temp": 0.0}, "--student-temp"),
    ({"momentum_teacher": 1.5}, "--momentum-teacher"),
    ({"center_momentum": -0.1}, "--center-momentum"),
    ({"freeze_last_layer_fraction": 2.0}, "--freeze-last-layer-fraction"),
    ({"warmup_min_steps": -1}, "--warmup-min-steps"),
    ({"freeze_last_layer_min_steps": -5}, "--freeze-last-layer-min-steps"),
    ({"cls_queue_size": -1}, "--cls-queue-size"),
    ({"casa_queue_size": -1}, "--casa-queue-size"),
    ({"koleo_weight": -0.1}, "--koleo-weight"),
    ({"koleo_memory": 0}, "--koleo-memory"),
    ({"intra_jitter": 1.5}, "--intra-jitter"),
    ({"sinkhorn_iterations": 0}, "--sinkhorn-iterations"),
    ({"head_out_dim": 1}, "--head-out-dim"),
    ({"head_out_dim": 36}, "CASA heads"),
    ({"lambda_casa": -1.0}, "--lambda-casa"),
    ({"grad_clip": -3.0}, "--grad-clip"),
    ({"log_every": 0}, "--log-every"),
])
def test_bad_teacher_settings_are_one_line_errors(overrides, option):
    cfg = PretrainConfig(dataset_name="Dataset001_X", **overrides)
    with pytest.raises(AliceError) as info:
        cfg.validate()
    msg = str(info.value)
    assert option in msg and "\n" not in msg


def test_start_warns_when_cls_targets_cannot_become_sharp():
    cfg = PretrainConfig(dataset_name="Dataset001_X").validate()
    assert cfg.target_warnings(2) == []                          # default queue: 4 + 2048 rows >= K = 512
    assert cfg.cls_queue_size >= cfg.head_out_dim
    no_queue = PretrainConfig(dataset_name="Dataset001_X", cls_queue_size=0).validate()
    (warning,) = no_queue.target_warnings(2)
    assert "--cls-queue-size" in warning and "0.78 ln K" in warning and "at least 508" in warning
    assert no_queue.target_warnings(256) == []                   # 512 rows from the batch alone
    assert PretrainConfig(dataset_name="X", cls_queue_size=0, centering="center").target_warnings(2) == []
    assert PretrainConfig(dataset_name="X", cls_queue_size=0, objective="mae").target_warnings(2) == []


def test_cli_refuses_unknown_choices(capsys):
    from nnunet_alice.pretrain.cli import build_parser

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["-d", "1", "--centering", "median"])
    assert info.value.code == 2 and "--centering" in capsys.readouterr().err
    args = build_parser().parse_args(["-d", "1", "--centering", "center", "--cls-queue-size", "64",
                                      "--warmup-min-steps", "10", "--cls-pool", "prenorm_mean"])
    assert (args.centering, args.cls_queue_size, args.warmup_min_steps, args.cls_pool) == ("center", 64, 10,
                                                                                           "prenorm_mean")


def test_collapse_monitor_reads_entropy_near_log_k_as_collapse():
    k = 512
    log_k = math.log(k)
    mon = CollapseMonitor(k)
    assert mon.tol == 0.05
    # near-uniform rows are a collapse whatever the batch KL says (a small batch's KL is noisy)
    assert mon.classify(0.97 * log_k, 0.03 * log_k) == "uniform"
    # Sinkhorn-Knopp at batch 2 cannot go below ln(K / 4) = 0.78 ln K: that floor is healthy
    assert mon.classify(math.log(k / 4), 0.002) is None
    # sharp rows: healthy unless they all sit on one prototype
    assert mon.classify(0.02 * log_k, 0.5 * log_k) is None
    assert mon.classify(0.02 * log_k, 0.97 * log_k) == "one-hot"
    assert mon.classify(float("nan"), 0.0) is None
    mon = CollapseMonitor(k, patience=2)
    assert mon.update({"step": 10, "teacher_entropy": 0.97 * log_k, "kl_uniform": 0.0}) is None
    warning = mon.update({"step": 20, "teacher_entropy": 0.98 * log_k, "kl_uniform": 0.0})
    assert warning and "uniform" in warning and "since step 10" in warning
