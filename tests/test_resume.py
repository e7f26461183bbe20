"""Faults during pretraining: interrupted runs resume exactly (``--continue``), damaged checkpoints fall back to
the previous one, a non-finite loss stops the run keeping the last good checkpoint, and a collapsed teacher is
reported. Runs on the tiny plans of ``alice_sandbox`` (a step takes ~0.1-1 s on a CPU)."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import nnunet_alice.pretrain.training.run as runner_mod
from alice_sandbox import TINY_PLANS, cli_args, make_sandbox, pretrain_config
from nnunet_alice.checkpoint import load_checkpoint
from nnunet_alice.errors import AliceError
from nnunet_alice.pretrain.training.checkpointing import FINAL, LATEST, PREVIOUS
from nnunet_alice.pretrain.training.monitor import CollapseMonitor
from nnunet_alice.pretrain.training.run import PretrainRun, settings_changes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sandbox(synth_dataset, tmp_path_factory):
    return make_sandbox(synth_dataset, tmp_path_factory.mktemp("resume"))


@pytest.fixture
def box(sandbox, monkeypatch, tmp_path):
    sandbox.apply(monkeypatch)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))  # every test its own results folder
    return sandbox


def cli_folder(box) -> Path:
    return Path(os.environ["nnUNet_results"], box.dataset_name, f"AlicePretrain__{TINY_PLANS}__3d_fullres")


class Interrupted(BaseException):
    """Stands in for a kill: not an Exception, so nothing in the runner can swallow it."""


def interrupt_at(monkeypatch, step_index: int):
    """Make ``train_step`` raise when it is called for ``step_index`` (0-based), like a kill during that step."""
    original = runner_mod.train_step

    def step(*args, **kwargs):
        if args[4] == step_index:
            raise Interrupted()
        return original(*args, **kwargs)

    monkeypatch.setattr(runner_mod, "train_step", step)
    return original


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) if a[k].numel() else 0.0 for k in a)


# ---------------------------------------------------------------------------------------------- exact resume
@pytest.mark.parametrize("objective", ["mae", "alice"])
def test_interrupted_then_continued_matches_uninterrupted(box, tmp_path, monkeypatch, objective):
    full = PretrainRun(pretrain_config(box, objective, steps=4), output_folder=str(tmp_path / "full"))
    full.run()
    expected = {k: v.clone() for k, v in full.objective.state_dict().items()}

    folder = str(tmp_path / "resumed")
    original = interrupt_at(monkeypatch, 3)  # step 4 of 4 dies; checkpoint_latest holds step 2
    with pytest.raises(Interrupted):
        PretrainRun(pretrain_config(box, objective, steps=4), output_folder=folder).run()
    assert load_checkpoint(os.path.join(folder, LATEST))["training_state"]["step"] == 2
    assert not os.path.exists(os.path.join(folder, FINAL))
    monkeypatch.setattr(runner_mod, "train_step", original)

    resumed = PretrainRun(pretrain_config(box, objective, steps=4), resume=True, output_folder=folder)
    assert resumed.start_step == 2
    saved = load_checkpoint(os.path.join(folder, LATEST))["training_state"]["objective"]
    state = resumed.objective.state_dict()
    restored = [k for k in saved if k.startswith(("teacher.", "cls_loss.", "casa_loss.", "casa.ema"))]
    if objective == "alice":  # teacher, centres and CASA's EMA target come back from the checkpoint
        assert any(k.startswith("teacher.module.network.") for k in restored)
        assert {"cls_loss.center", "casa_loss.center"} <= set(restored)
        assert any(k.startswith("casa.ema") for k in restored)
        assert all(torch.equal(state[k], saved[k]) for k in restored)
        assert not torch.equal(saved["cls_loss.center"], torch.zeros_like(saved["cls_loss.center"]))
    resumed.run()
    assert max_abs_diff(resumed.objective.state_dict(), expected) <= 1e-6
    final = load_checkpoint(os.path.join(folder, LATEST))
    assert final["training_state"]["step"] == 4
    assert [h["step"] for h in final["training_state"]["history"]] == [1, 2, 3, 4]
    log = Path(folder, "training_log.txt").read_text()
    assert f"continuing from {os.path.join(folder, LATEST)} at step 2" in log


def test_kill_9_during_training_then_continue(box, tmp_path, capsys):
    """A real ``kill -9`` of ``alice_pretrain``; ``--continue`` ends where an uninterrupted run ends."""
    steps = 12
    expected = PretrainRun(pretrain_config(box, "mae", steps=steps, save_every=1),
                           output_folder=str(tmp_path / "reference"))
    expected.run()
    folder = cli_folder(box)
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "nnunet_alice.pretrain.cli", *cli_args(box, "--save-every", "1", "--log-every", "1",
                                                                       steps=steps)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (folder / (LATEST + ".sha256")).is_file():
                time.sleep(0.3)  # somewhere in the next step or in the middle of the next checkpoint write
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (folder / FINAL).exists()

    from nnunet_alice.pretrain import cli

    cli.main(cmd[3:] + ["--continue"])  # in-process: returns normally on success
    assert "continuing from" in capsys.readouterr().out
    assert not [p for p in os.listdir(folder) if p.endswith(".tmp")]  # a write cut by the kill is cleaned up
    got = load_checkpoint(str(folder / FINAL))["network_weights"]
    assert max_abs_diff(got, {k: v for k, v in expected.network.state_dict().items()}) <= 1e-5


# ---------------------------------------------------------------------------------------------- damaged files
def test_latest_rotates_to_prev_and_both_verify(box, tmp_path):
    folder = tmp_path / "run"
    PretrainRun(pretrain_config(box, "mae", steps=3, save_every=1), output_folder=str(folder)).run()
    latest, prev = load_checkpoint(str(folder / LATEST)), load_checkpoint(str(folder / PREVIOUS))
    assert latest["training_state"]["step"] == 3 and prev["training_state"]["step"] == 2
    digest = lambda name: (folder / (name + ".sha256")).read_text().split()[0]  # noqa: E731
    assert digest(PREVIOUS) != digest(LATEST)


def test_truncated_latest_is_detected_and_previous_is_used(box, tmp_path, capsys):
    folder = tmp_path / "run"
    PretrainRun(pretrain_config(box, "mae", steps=3, save_every=1), output_folder=str(folder)).run()
    data = (folder / LATEST).read_bytes()
    (folder / LATEST).write_bytes(data[: len(data) // 2])  # a disk that filled up, a copy cut short

    run = PretrainRun(pretrain_config(box, "mae", steps=4, save_every=1), resume=True, output_folder=str(folder))
    assert run.start_step == 2
    assert any("checksum mismatch" in n and "continuing from" in n and PREVIOUS in n for n in run.notes)
    run.run()
    out = capsys.readouterr()
    assert "WARNING" in out.out and "checksum mismatch" in out.out
    assert load_checkpoint(str(folder / LATEST))["training_state"]["step"] == 4


def test_settings_changed_on_continue_are_reported():
    changed = settings_changes({"lr": 1e-3, "device": "cuda", "patch_size": [16, 16, 16], "old_only": 1},
                               {"lr": 2e-3, "device": "cpu", "patch_size": (16, 16, 16), "new_only": 2})
    assert changed == ["lr: 0.001 -> 0.002"]  # free settings and settings of another version are no change


# ---------------------------------------------------------------------------------------------- refused resumes
def test_continue_with_fewer_steps_than_done_is_refused_and_rewrites_nothing(box, capsys):
    from nnunet_alice.pretrain import cli

    cli.main(cli_args(box, "--save-every", "2", steps=4))
    folder = cli_folder(box)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir() if ".pth" in p.name}
    capsys.readouterr()
    with pytest.raises(SystemExit) as ei:
        cli.main(cli_args(box, "--continue", steps=2))
    assert ei.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert err == [f"error: {folder / LATEST}: the checkpoint is at step 4, past the 2 steps asked for; give --steps 4 "
                   f"or more to continue it (nothing was changed)"]
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir() if ".pth" in p.name} == before
    assert "ERROR: " + err[0][len("error: "):] in (folder / "training_log.txt").read_text()

    cli.main(cli_args(box, "--continue", steps=6))  # a longer run is fine, and recorded
    meta = load_checkpoint(str(folder / FINAL))["metadata"]
    assert meta["step"] == 6 and meta["settings_history"] == [{"step": 4, "changes": {"steps": [4, 6]}}]


def test_continue_with_changed_batch_or_patch_size_is_refused_unless_allowed(box, tmp_path):
    folder = str(tmp_path / "run")
    PretrainRun(pretrain_config(box, "mae", steps=2), output_folder=folder).run()
    latest = os.path.join(folder, LATEST)
    for change, expected in [({"batch_size": 2}, "batch_size: 1 -> 2"),
                             ({"patch_size": [16, 16, 24]}, "patch_size: [16, 16, 16] -> [16, 16, 24]")]:
        with pytest.raises(AliceError) as ei:
            PretrainRun(pretrain_config(box, "mae", steps=3, **change), resume=True, output_folder=folder)
        msg = str(ei.value)
        assert msg.startswith(f"{latest}: --continue with settings that change the computation ({expected})")
        assert "steps" not in msg.split("(")[1].split(")")[0]  # the length may change; it is not listed
        assert "--allow-settings-change" in msg
    assert load_checkpoint(latest)["training_state"]["step"] == 2  # untouched

    run = PretrainRun(pretrain_config(box, "mae", steps=3, batch_size=2), resume=True, output_folder=folder,
                      allow_settings_change=True)
    run.run()
    meta = load_checkpoint(latest)["metadata"]
    assert meta["settings"]["batch_size"] == 2 and meta["step"] == 3
    assert meta["settings_history"] == [{"step": 2, "changes": {"batch_size": [1, 2], "steps": [2, 3]}}]
    assert "settings changed at step 2, recorded in metadata.settings_history: batch_size: 1 -> 2; steps: 2 -> 3" \
        in Path(folder, "training_log.txt").read_text()


# ---------------------------------------------------------------------------------------------- NaN / Inf
def test_non_finite_loss_stops_with_step_and_term_and_keeps_last_good(box, tmp_path, monkeypatch, capsys):
    from nnunet_alice.pretrain import cli
    from nnunet_alice.pretrain.objectives.mae import MaeObjective

    forward = MaeObjective.forward

    def poisoned(self, batch, step):
        total, terms = forward(self, batch, step)
        if step == 2:
            total = total * float("nan")
            terms = dict(terms, recon=terms["recon"] * float("nan"))
        return total, terms

    monkeypatch.setattr(MaeObjective, "forward", poisoned)
    with pytest.raises(SystemExit) as ei:
        cli.main(cli_args(box, "--save-every", "1", steps=5))
    assert ei.value.code != 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]  # (tqdm also writes there)
    folder = cli_folder(box)
    assert len(err) == 1 and "non-finite loss at step 2: term recon" in err[0] and str(folder / LATEST) in err[0]
    assert load_checkpoint(str(folder / LATEST))["training_state"]["step"] == 2  # the last good one, intact
    assert not (folder / FINAL).exists()
    assert "ERROR: non-finite loss at step 2: term recon" in (folder / "training_log.txt").read_text()


def test_non_finite_gradient_is_caught_before_the_weights_change(box, tmp_path, monkeypatch):
    from nnunet_alice.pretrain.objectives.mae import MaeObjective

    def inf_grad(self, step):
        next(self.network.parameters()).grad.fill_(float("inf"))

    monkeypatch.setattr(MaeObjective, "before_optimizer_step", inf_grad)
    run = PretrainRun(pretrain_config(box, "mae", steps=2), output_folder=str(tmp_path / "run"))
    before = {k: v.clone() for k, v in run.network.state_dict().items()}
    with pytest.raises(AliceError, match=r"non-finite gradient at step 0: term grad_norm"):
        run.run()
    assert max_abs_diff(before, run.network.state_dict()) == 0.0


# ---------------------------------------------------------------------------------------------- collapse
def test_collapse_monitor_states():
    k = 64
    mon = CollapseMonitor(k, patience=3)
    log_k = math.log(k)
    uniform = {"teacher_entropy": 0.995 * log_k, "kl_uniform": 0.001}
    one_hot = {"teacher_entropy": 0.001, "kl_uniform": 0.999 * log_k}
    healthy = {"teacher_entropy": 0.2, "kl_uniform": 0.3}  # sharp rows, prototypes used evenly
    assert mon.classify(**{"entropy": uniform["teacher_entropy"], "kl": uniform["kl_uniform"]}) == "uniform"
    assert mon.classify(one_hot["teacher_entropy"], one_hot["kl_uniform"]) == "one-hot"
    assert mon.classify(healthy["teacher_entropy"], healthy["kl_uniform"]) is None
    assert mon.classify(0.001, 0.3) is None  # low entropy alone is what training wants

    out = [mon.update(dict(uniform, step=10 * i)) for i in range(1, 6)]
    assert out[:2] == [None, None] and out[3:] == [None, None]
    assert out[2].startswith("WARNING: teacher collapse (uniform) for 3 consecutive log intervals since step 10")
    assert mon.update(dict(healthy, step=60)) is None
    out = [mon.update(dict(one_hot, step=70 + i)) for i in range(3)]
    assert out[:2] == [None, None] and "one-hot" in out[2]  # warned again: a new episode


def test_collapsed_teacher_is_reported_in_log_and_console(box, tmp_path, monkeypatch, capsys):
    from nnunet_alice.pretrain.objectives.alice import AliceObjective

    forward = AliceObjective.forward

    def flat_teacher(self, batch, step):
        total, terms = forward(self, batch, step)
        k = self.config.head_out_dim
        return total, dict(terms, teacher_entropy=torch.tensor(math.log(k)), kl_uniform=torch.tensor(0.0))

    monkeypatch.setattr(AliceObjective, "forward", flat_teacher)
    monkeypatch.setattr(runner_mod, "CollapseMonitor", lambda k: CollapseMonitor(k, patience=2))
    folder = tmp_path / "run"
    PretrainRun(pretrain_config(box, "alice", steps=3, save_every=10), output_folder=str(folder)).run()
    log = (folder / "training_log.txt").read_text()
    assert "WARNING: teacher collapse (uniform) for 2 consecutive log intervals since step 1" in log
    assert "WARNING: teacher collapse (uniform)" in capsys.readouterr().out
