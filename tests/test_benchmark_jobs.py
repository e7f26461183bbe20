"""alice_benchmark --jobs: pretrainings and cells at once give the same table as one at a time, each cell trains
into its own results folder, and an interrupt leaves no command running."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nnunet_alice.errors import AliceError
from nnunet_alice.harness import runner as runner_mod
from nnunet_alice.harness.cli import Benchmark, build_parser
from nnunet_alice.harness.config import get_budget
from bench_fakes import FakeRunner, bench, fake_env, read_csv  # noqa: F401 (fake_env is a fixture)


class CountingRunner(FakeRunner):
    """The fake runner, with pretraining and training taking a moment and the most commands seen at once."""

    def __init__(self):
        super().__init__()
        self.running = self.most = 0
        self.lock = threading.Lock()

    def __call__(self, argv, env, log):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            if argv[0] in ("alice_pretrain", "nnUNetv2_train"):
                time.sleep(0.2)
            return super().__call__(argv, env, log)
        finally:
            with self.lock:
                self.running -= 1


def _table(b):
    rows = read_csv(os.path.join(b.out, "results.csv"))
    return sorted((r["method"], r["labels"], r["seed"], r["dice"], r["status"]) for r in rows)


def test_jobs_run_at_once_and_give_the_same_table(fake_env, tmp_path):
    one, two = CountingRunner(), CountingRunner()
    b1 = bench(one, labels=("1", "all"), output=str(tmp_path / "one"))
    b2 = bench(two, labels=("1", "all"), output=str(tmp_path / "two"), jobs=2)
    rows1, rows2 = b1.run(), b2.run()
    assert one.most == 1 and two.most == 2
    assert [(r["method"], r["labels"], r["seed"]) for r in rows1] == [(r["method"], r["labels"], r["seed"])
                                                                      for r in rows2]
    assert _table(b1) == _table(b2) and len(_table(b2)) == 12
    # the two pretrainings of a seed ran at once, and every cell trained into a folder of its own
    starts = [i for i, (argv, _) in enumerate(two.calls) if argv[0] == "alice_pretrain"]
    assert len(starts) == 4
    trains = [env["nnUNet_results"] for argv, env in two.calls if argv[0] == "nnUNetv2_train"]
    assert len(trains) == len(set(trains)) == 12
    assert all(Path(t).parent.parent == Path(b2.out, "runs") for t in trains)


def test_a_failing_cell_among_parallel_ones_fails_alone(fake_env):
    runner = FakeRunner(fail=lambda argv, env: argv[0] == "nnUNetv2_train" and env["nnUNet_results"].endswith(
        os.path.join("alice", "n1_s0")))
    b = bench(runner, labels=("1",), seeds=(0, 1), jobs=3)
    rows = b.run()
    failed = [(r["method"], r["labels"], r["seed"]) for r in rows if r["status"] != "ok"]
    assert failed == [("alice", 1, 0)] and len(rows) == 6


def test_jobs_must_be_positive(fake_env):
    with pytest.raises(AliceError, match="--jobs 0"):
        bench(FakeRunner(), jobs=0)
    assert build_parser().parse_args(["--jobs", "2"]).jobs == 2


def test_an_interrupt_stops_every_running_command(fake_env, tmp_path):
    """Three real commands run in parallel tasks; Ctrl-C reaches the main thread: all are terminated at once,
    and nothing new starts until the next run."""
    budget = get_budget("tiny", labels=["1"], seeds=[0])
    b = Benchmark("993", budget, methods=["scratch"], runner=runner_mod.subprocess_runner, echo=lambda s: None,
                  jobs=3)
    pids = tmp_path / "pids"
    pids.mkdir()
    sleeper = [sys.executable, "-c", f"import os, time; open(os.path.join({str(pids)!r}, str(os.getpid())), 'w')"
                                     "; time.sleep(120)"]

    def interrupt_when_all_run():
        deadline = time.time() + 60
        while len(os.listdir(pids)) < 3 and time.time() < deadline:
            time.sleep(0.05)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    # a shell starts background jobs with SIGINT ignored, and Python then installs no KeyboardInterrupt handler:
    # give the test the handler an interactive session has
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    t0 = time.time()
    threading.Thread(target=interrupt_when_all_run, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            b._map(lambda i: b.command(f"sleeper {i}", sleeper, str(tmp_path / "logs" / f"{i}.log")), [0, 1, 2])
        assert time.time() - t0 < 60 and len(os.listdir(pids)) == 3
        for pid in map(int, os.listdir(pids)):
            state = subprocess.run(["ps", "-p", str(pid), "-o", "stat="], capture_output=True, text=True).stdout
            assert state.strip() in ("", "Z"), f"process {pid} still runs"
        rc, tail = runner_mod.subprocess_runner(sleeper, dict(os.environ), str(tmp_path / "logs" / "late.log"))
        assert rc == 143 and "stopping" in tail
    finally:
        runner_mod.allow_new()
        signal.signal(signal.SIGINT, previous)
    rc, _ = runner_mod.subprocess_runner([sys.executable, "-c", "pass"], dict(os.environ),
                                         str(tmp_path / "logs" / "after.log"))
    assert rc == 0
