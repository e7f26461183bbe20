"""Data-loading workers: no OpenMP deadlock after fork, no orphans after the parent is killed, no silent waits.

The deadlock and orphan tests run their parent in a subprocess, so thread settings and forks of this test
process are never involved.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from nnunet_alice.errors import AliceError
from nnunet_alice.pretrain.data.workers import WatchedLoader

# A sampler with the batchgenerators protocol that does what ViewSampler's augmentation does in a worker: torch
# element-wise ops and matmuls large enough for torch to use its OpenMP pool. The parent warms that pool (2 threads)
# before forking.
PARENT = textwrap.dedent("""
    import os, sys, time, torch
    from nnunet_alice.pretrain.data.views import ViewSampler, make_loader

    class Sampler:
        number_of_threads_in_multithreaded = 1
        parent_pid = None
        set_thread_id = ViewSampler.set_thread_id
        def __iter__(self):
            return self
        def __next__(self):
            a = torch.randn(64, 64, 64)
            return {"x": (a * 2 + 1).exp().sum().reshape(1) + (a @ a).sum()}

    torch.set_num_threads(2)
    a = torch.randn(64, 64, 64)
    for _ in range(5):
        (a * 2 + 1).exp().sum() + (a @ a).sum()  # the parent's OpenMP pool is now running
    loader = make_loader(Sampler(), 2, seed=0, timeout=float(sys.argv[1]))
    if sys.argv[3] == "main":
        loader.loader._start()  # fork from the thread that ran OpenMP (the loader would fork from its own thread)
    next(loader)
    print("PIDS", " ".join(str(p.pid) for p in loader.loader._processes), flush=True)
    if sys.argv[2] == "stay":
        time.sleep(600)
    for _ in range(3):
        next(loader)
    loader.close()
    print("OK", flush=True)
""")


def _parent(tmp_path, timeout, mode, fork_from="main"):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "nnUNet_n_proc"))}
    return subprocess.Popen([sys.executable, str(script), str(timeout), mode, fork_from], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except OSError:
        return True


@pytest.mark.parametrize("fork_from", ["main", "loader"])
def test_forked_workers_use_torch_after_the_parent_used_openmp(tmp_path, fork_from):
    proc = _parent(tmp_path, 60, "finish", fork_from)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "OK" in out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_workers_exit_when_their_parent_is_killed(tmp_path):
    proc = _parent(tmp_path, 120, "stay")
    line = ""
    deadline = time.time() + 180
    while time.time() < deadline and not line.startswith("PIDS"):
        line = proc.stdout.readline()
        assert line or proc.poll() is None, proc.stderr.read()[-2000:]
    pids = [int(p) for p in line.split()[1:]]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 15
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    survivors = [p for p in pids if _alive(p)]
    for p in survivors:
        os.kill(p, signal.SIGKILL)
    assert not survivors, f"workers {survivors} outlived their parent"


class _Blocking:
    def __init__(self, first=1):
        self.left = first

    def __next__(self):
        if self.left:
            self.left -= 1
            return {"i": self.left}
        time.sleep(3600)


def test_watchdog_stops_a_silent_wait_with_one_line():
    loader = WatchedLoader(_Blocking(first=1), timeout=1.0, describe="the 2 data worker process(es)")
    assert next(loader) == {"i": 0}
    t0 = time.time()
    with pytest.raises(AliceError) as e:
        next(loader)
    assert time.time() - t0 < 10
    msg = str(e.value)
    assert "\n" not in msg and "no batch from the 2 data worker process(es) in 1 s" in msg
    assert "--num-workers 0" in msg and "--data-timeout" in msg


def test_watchdog_passes_errors_of_the_loader_on():
    class Broken:
        def __next__(self):
            raise RuntimeError("One or more background workers are no longer alive.\nmore")

    with pytest.raises(AliceError, match=r"data workers failed: RuntimeError: One or more background workers"):
        next(WatchedLoader(Broken(), timeout=30, describe="data workers"))

    class Refusing:
        def __next__(self):
            raise AliceError("case_1.b2nd: unreadable")

    with pytest.raises(AliceError, match="^case_1.b2nd: unreadable$"):
        next(WatchedLoader(Refusing(), timeout=30, describe="data workers"))


def test_watchdog_keeps_the_order_of_batches():
    loader = WatchedLoader(iter(range(5)), timeout=30, describe="x")
    assert [next(loader) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(StopIteration):
        next(loader)
    with pytest.raises(AliceError, match="must be > 0"):
        WatchedLoader(iter(()), timeout=0, describe="x")
