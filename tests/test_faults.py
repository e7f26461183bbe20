"""Faults around a pretraining run: a second run on the same folder, a killed run's lock, file-system errors
(disk full, read-only cache, symlink loops, a directory where a checkpoint goes), SIGTERM/SIGINT, and the
``-h`` text. Each failure is one line ``error: PATH: cause`` (exit 2) and, where the run owns the folder, also
a line in ``training_log.txt``; the last good checkpoint always stays loadable."""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nnunet_alice.errors import AliceError
from nnunet_alice.pretrain.training import run_lock
from nnunet_alice.pretrain.training.run_lock import LOCK_NAME, RunLock

HOLD_LOCK = ("import sys, time\nfrom nnunet_alice.pretrain.training.run_lock import RunLock\n"
             "lock = RunLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(300)\n")


def start_lock_holder(folder: Path) -> subprocess.Popen:
    """Another process that holds the run lock of ``folder`` until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def stop(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, sig)
    proc.wait(30)


# ---------------------------------------------------------------------------------------------- the run lock
def test_second_lock_is_refused_naming_the_holder_and_released_lock_is_free(tmp_path):
    first = RunLock(str(tmp_path)).acquire()
    holder = json.loads((tmp_path / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(AliceError) as ei:
        RunLock(str(tmp_path)).acquire()
    msg = str(ei.value)
    assert msg.startswith(f"{tmp_path}: another alice_pretrain run writes this folder")
    assert f"pid {os.getpid()} on host {socket.gethostname()}, started {holder['started']}" in msg
    assert "\n" not in msg
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    again = RunLock(str(tmp_path)).acquire()
    assert again.stale is None  # a cleanly released lock is not reported as stale
    again.release()


def test_lock_of_another_process_is_refused_and_a_killed_holder_is_taken_over(tmp_path):
    proc = start_lock_holder(tmp_path)
    try:
        with pytest.raises(AliceError, match=f"pid {proc.pid} on host"):
            RunLock(str(tmp_path)).acquire()
    finally:
        stop(proc)  # kill -9: the lock file stays behind with the dead holder in it
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == proc.pid
    lock = RunLock(str(tmp_path)).acquire()
    assert lock.stale is not None and f"pid {proc.pid}" in lock.stale
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_without_flock_the_recorded_holder_decides(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_flock)
    lock_file = tmp_path / LOCK_NAME
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = socket.gethostname()
    lock_file.write_text(json.dumps({"pid": dead.pid, "host": here, "started": "then"}))
    lock = RunLock(str(tmp_path)).acquire()  # dead pid on this host: stale, taken over
    assert f"pid {dead.pid}" in lock.stale
    lock.release()

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_file.write_text(json.dumps({"pid": sleeper.pid, "host": here, "started": "now",
                                         "start_ticks": run_lock._process_start_ticks(sleeper.pid)}))
        with pytest.raises(AliceError, match=f"pid {sleeper.pid} on host {here}"):
            RunLock(str(tmp_path)).acquire()
        # the same pid with another start time is a reused pid: stale
        lock_file.write_text(json.dumps({"pid": sleeper.pid, "host": here, "start_ticks": 1}))
        RunLock(str(tmp_path)).acquire().release()
    finally:
        stop(sleeper)
    lock_file.write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": "now"}))
    with pytest.raises(AliceError, match=f"cannot be checked: if it is gone, remove {lock_file}"):
        RunLock(str(tmp_path)).acquire()


def _report_sigterm_handler(path):
    Path(path).write_text(repr(signal.getsignal(signal.SIGTERM)))


def test_stop_handlers_are_scoped_and_forked_workers_keep_the_default(tmp_path):
    """A forked data worker must die from SIGTERM even when stuck in C code: no Python-level handler in it."""
    import multiprocessing

    from nnunet_alice.pretrain.training import step as loop

    before = signal.getsignal(signal.SIGTERM)
    with loop.stop_between_steps():
        assert signal.getsignal(signal.SIGTERM) is not before
        child = multiprocessing.get_context("fork").Process(target=_report_sigterm_handler,
                                                            args=(str(tmp_path / "child"),))
        child.start()
        child.join(60)
    assert (tmp_path / "child").read_text() == repr(before)  # normally SIG_DFL
    assert signal.getsignal(signal.SIGTERM) is before


def _stop_worker(rank, world, port, out_dir):
    import torch
    import torch.distributed as dist

    from nnunet_alice.pretrain.training import step as loop

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        seen = [loop.pending_stop(torch.device("cpu"))]  # nobody asked
        if rank == 1:
            loop._stop["signum"] = int(signal.SIGTERM)  # only rank 1 got the signal
        seen.append(loop.pending_stop(torch.device("cpu")))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_stop_request_on_one_rank_stops_every_rank(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_stop_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [None, int(signal.SIGTERM)]


# ---------------------------------------------------------------------------------------------- -h
def test_help_shows_no_default_for_switches():
    from nnunet_alice.pretrain.cli import build_parser

    text = " ".join(build_parser().format_help().split())
    for flag in ("--no-cls", "--no-casa", "--no-recon", "--no-augment", "--continue"):
        assert flag in text
    assert "(default: True)" not in text and "(default: False)" not in text and "(default: None)" not in text
    assert "(default: 3d_fullres)" in text  # options with a value keep theirs


# ---------------------------------------------------------------------------------------------- with a dataset
@pytest.fixture(scope="module")
def sandbox(synth_dataset, tmp_path_factory):
    from alice_sandbox import make_sandbox

    return make_sandbox(synth_dataset, tmp_path_factory.mktemp("faults"))


@pytest.fixture
def box(sandbox, monkeypatch, tmp_path):
    sandbox.apply(monkeypatch)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    return sandbox


def out_folder(box) -> Path:
    from alice_sandbox import TINY_PLANS

    return Path(os.environ["nnUNet_results"], box.dataset_name, f"AlicePretrain__{TINY_PLANS}__3d_fullres")


def fails(capsys, args, *expected: str, code: int = 2) -> str:
    from nnunet_alice.pretrain import cli

    with pytest.raises(SystemExit) as ei:
        cli.main(args)
    assert ei.value.code == code
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, lines
    for e in expected:
        assert e in lines[0], (e, lines[0])
    return lines[0]


@pytest.mark.slow
def test_a_second_run_on_the_same_folder_is_refused(box, capsys):
    from alice_sandbox import cli_args

    folder = out_folder(box)
    folder.mkdir(parents=True)
    proc = start_lock_holder(folder)
    try:
        fails(capsys, cli_args(box), f"error: {folder}: another alice_pretrain run writes this folder",
              f"pid {proc.pid} on host {socket.gethostname()}, started ")
        assert not (folder / "training_log.txt").exists()  # nothing written into the other run's folder
    finally:
        stop(proc)
    from nnunet_alice.pretrain import cli

    cli.main(cli_args(box))  # the killed holder's lock is taken over
    out = capsys.readouterr().out
    assert f"took over the run lock of a run that ended without releasing it (pid {proc.pid}" in out
    assert (folder / "checkpoint_final.pth").is_file() and not (folder / LOCK_NAME).exists()


@pytest.mark.slow
def test_disk_full_while_saving_keeps_the_last_good_checkpoint(box, capsys, monkeypatch):
    from alice_sandbox import cli_args
    from nnunet_alice import checkpoint as ckpt_mod
    from nnunet_alice.checkpoint import load_checkpoint

    write = ckpt_mod.atomic_write_bytes
    calls = []

    def full_disk(path, data):
        if path.endswith(".pth"):
            calls.append(path)
            if len(calls) > 1:  # the first checkpoint fits, the second does not (its sidecars would)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        write(path, data)

    monkeypatch.setattr(ckpt_mod, "atomic_write_bytes", full_disk)
    folder = out_folder(box)
    err = fails(capsys, cli_args(box, "--save-every", "2", steps=5),
                f"error: {folder / 'checkpoint_latest.pth'}: writing checkpoint at step 4 failed (No space left on "
                f"device: the disk is full); last good checkpoint kept: {folder / 'checkpoint_latest.prev.pth'}")
    assert f"ERROR: {err[len('error: '):]}" in (folder / "training_log.txt").read_text()
    kept = load_checkpoint(str(folder / "checkpoint_latest.prev.pth"))  # verified against its sidecar
    assert kept["training_state"]["step"] == 2
    assert not (folder / "checkpoint_final.pth").exists() and not list(folder.glob(".*.tmp"))


@pytest.mark.slow
def test_read_only_preprocessed_folder_with_unlabeled_images(box, tmp_path, capsys, monkeypatch):
    from alice_sandbox import cli_args
    from nnunet_alice.pretrain.data import cases as data_mod
    from test_bad_inputs import volume, write_image

    makedirs = os.makedirs

    def read_only(path, *a, **kw):
        if data_mod.UNLABELED_SUBDIR in str(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return makedirs(path, *a, **kw)

    monkeypatch.setattr(data_mod.os, "makedirs", read_only)
    write_image(tmp_path / "unl" / "ro_0000.nii.gz", volume(), (1.0, 1.0, 2.0))
    cache = box.dataset / data_mod.UNLABELED_SUBDIR / "nnUNetPlans_3d_fullres"
    fails(capsys, cli_args(box, "--unlabeled", str(tmp_path / "unl")),
          f"error: {cache}: creating the cache of preprocessed --unlabeled images failed (Read-only file system: ",
          "make nnUNet_preprocessed writable")
    assert not Path(os.environ["nnUNet_results"]).exists()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["file", "folder"])
def test_symlink_loop_in_unlabeled(box, tmp_path, capsys, where):
    from alice_sandbox import cli_args

    folder = tmp_path / "unl"
    folder.mkdir()
    if where == "file":
        target = folder / "loop_0000.nii.gz"
        os.symlink(target, target)
        arg = folder
    else:
        target = arg = tmp_path / "unl_loop"
        os.symlink(target, target)
    fails(capsys, cli_args(box, "--unlabeled", str(arg)), f"error: {target}: ",
          "(Too many levels of symbolic links: a symbolic link loop)")
    assert not Path(os.environ["nnUNet_results"]).exists()


@pytest.mark.slow
@pytest.mark.parametrize("resume", [False, True])
def test_directory_in_place_of_the_latest_checkpoint_fails_at_start(box, capsys, resume):
    from alice_sandbox import cli_args
    from nnunet_alice.pretrain import cli

    cli.main(cli_args(box, steps=2))
    folder = out_folder(box)
    final_before = (folder / "checkpoint_final.pth").read_bytes()
    (folder / "checkpoint_latest.pth").unlink()
    (folder / "checkpoint_latest.pth").mkdir()
    capsys.readouterr()
    args = cli_args(box, *(["--continue"] if resume else []), steps=3)
    err = fails(capsys, args, f"error: {folder / 'checkpoint_latest.pth'}: is a directory, where the run writes a "
                              f"file; move it away")
    assert (folder / "checkpoint_final.pth").read_bytes() == final_before  # nothing trained, nothing rewritten
    assert f"ERROR: {err[len('error: '):]}" in (folder / "training_log.txt").read_text()


# ---------------------------------------------------------------------------------------------- signals
@pytest.mark.slow
def test_sigterm_saves_a_resumable_checkpoint_and_exits_143(box, tmp_path, capsys):
    """Slurm pre-emption: SIGTERM mid-run; ``--continue`` then ends exactly where an uninterrupted run ends."""
    from alice_sandbox import cli_args, pretrain_config
    from nnunet_alice.checkpoint import load_checkpoint
    from nnunet_alice.pretrain import cli
    from nnunet_alice.pretrain.training.run import PretrainRun
    from test_resume import max_abs_diff

    steps = 40
    args = cli_args(box, "--save-every", "1000", "--log-every", "1", steps=steps)
    folder = out_folder(box)
    proc = subprocess.Popen([sys.executable, "-m", "nnunet_alice.pretrain.cli", *args], env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        log = folder / "training_log.txt"
        while time.time() < deadline and proc.poll() is None:
            lines = log.read_text().splitlines() if log.is_file() else []
            if sum(ln.split(": ", 1)[-1].startswith("step ") for ln in lines) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be signalled"
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        stop(proc)
    assert proc.returncode == 143, err[-2000:]
    latest = load_checkpoint(str(folder / "checkpoint_latest.pth"))
    done = latest["training_state"]["step"]
    assert 2 <= done < steps and not (folder / "checkpoint_final.pth").exists()
    assert f"stopped by SIGTERM: resumable checkpoint {folder / 'checkpoint_latest.pth'} at step {done}" in err
    assert f"SIGTERM: stopped after step {done} of {steps}" in log.read_text()
    assert not (folder / LOCK_NAME).exists()

    cli.main(args + ["--continue"])
    assert f"continuing from {folder / 'checkpoint_latest.pth'} at step {done}" in capsys.readouterr().out
    reference = PretrainRun(pretrain_config(box, "mae", steps=steps, save_every=1000),
                            output_folder=str(tmp_path / "reference"))
    reference.run()
    got = load_checkpoint(str(folder / "checkpoint_final.pth"))["network_weights"]
    assert max_abs_diff(got, dict(reference.network.state_dict())) <= 1e-6


@pytest.mark.slow
def test_sigint_stops_between_steps_with_a_checkpoint(box, tmp_path, monkeypatch):
    import nnunet_alice.pretrain.training.run as runner_mod
    from alice_sandbox import pretrain_config
    from nnunet_alice.checkpoint import load_checkpoint
    from nnunet_alice.errors import RunStopped

    original = runner_mod.train_step

    def ctrl_c_during_step_3(*args, **kwargs):
        result = original(*args, **kwargs)
        if args[4] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives while step 3 (index 2) finishes
        return result

    monkeypatch.setattr(runner_mod, "train_step", ctrl_c_during_step_3)
    folder = tmp_path / "run"
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(RunStopped) as ei:
        runner_mod.PretrainRun(pretrain_config(box, "mae", steps=6, save_every=100), output_folder=str(folder)).run()
    assert ei.value.exit_code == 130 and "stopped by SIGINT" in str(ei.value)
    assert load_checkpoint(str(folder / "checkpoint_latest.pth"))["training_state"]["step"] == 3
    assert signal.getsignal(signal.SIGINT) is handler  # the previous handler is back


def test_a_dropped_lock_object_frees_the_folder(tmp_path):
    lock = RunLock(str(tmp_path)).acquire()
    del lock  # e.g. a PretrainRun built (folder locked) but never run
    RunLock(str(tmp_path)).acquire().release()
