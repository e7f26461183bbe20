"""Data-loading workers that cannot deadlock, cannot outlive their parent, and are never waited on silently.

Three problems of forked batch workers, and what this module does about each:

* **OpenMP after fork.** GNU OpenMP (libgomp, torch's CPU thread pool) is not fork-safe: once the parent has run a
  parallel region, a forked child that enters one waits forever for pool threads that do not exist in the child.
  batchgeneratorsv2's spatial transform calls torch (a matmul) in the worker, and torch's ``parallel_for`` passes its
  own thread count to OpenMP, so ``threadpoolctl``/``OMP_NUM_THREADS`` do not help. :func:`init_worker` sets torch's
  own thread count to 1 first thing in the child: ``at::parallel_for`` then runs inline and never enters OpenMP.
  (Workers started by :class:`WatchedLoader` are also forked from its fetch thread, which never ran OpenMP; each
  measure alone prevents the hang, tests/test_workers.py checks both.)
* **Orphans.** A worker blocked in ``Queue.put`` outlives a parent killed with SIGKILL (it would wait for ever).
  :func:`init_worker` asks Linux to send the child SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``) and,
  where that is not available, starts a thread that exits the worker once its parent is gone.
* **Silent waits.** :class:`WatchedLoader` fetches batches in a helper thread and gives up with a one-line
  :class:`~nnunet_alice.errors.AliceError` when no batch arrives within ``timeout`` seconds (or when a worker died).
"""
from __future__ import annotations

import ctypes
import os
import queue
import signal
import sys
import threading
import time
from typing import Optional

from nnunet_alice.errors import AliceError

PR_SET_PDEATHSIG = 1
DEFAULT_DATA_TIMEOUT = 900.0  # seconds without a batch before the run stops; generous for huge first volumes


def _exit_when_orphaned(parent_pid: int, poll: float = 1.0) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(0)
        time.sleep(poll)


def init_worker(parent_pid: Optional[int]) -> None:
    """Make the current (forked) worker process safe; call it first thing in the child.

    ``parent_pid`` is the pid of the process that started the worker (recorded before the fork); ``None`` skips
    the orphan guard.
    """
    import torch

    torch.set_num_threads(1)  # torch's parallel_for runs inline: no libgomp pool inherited from the parent
    os.environ["OMP_NUM_THREADS"] = "1"  # for anything the worker starts
    if parent_pid is None:
        return
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent_pid:  # the parent died before the guard was armed
        os._exit(0)
    if not armed:
        threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class WatchedLoader:
    """``next(loader)`` with a deadline: a batch within ``timeout`` seconds, or a one-line :class:`AliceError`.

    ``loader`` is any iterator (batchgenerators' ``MultiThreadedAugmenter`` or an in-process sampler). Batches are
    fetched one at a time, in order, by a daemon thread; an exception raised while fetching is re-raised in the
    caller's thread. ``describe`` names what produces the batches (used in the message).
    """

    def __init__(self, loader, timeout: float, describe: str):
        if not timeout > 0:
            raise AliceError(f"the data timeout must be > 0 seconds, got {timeout}")
        self.loader, self.timeout, self.describe = loader, float(timeout), describe
        self._requests: "queue.Queue[bool]" = queue.Queue()
        self._results: "queue.Queue[object]" = queue.Queue()
        self._pending = False
        self._thread = threading.Thread(target=self._fetch_loop, name="alice-batch-fetch", daemon=True)
        self._thread.start()

    def _fetch_loop(self) -> None:
        while self._requests.get():
            try:
                self._results.put(next(self.loader))
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                self._results.put(_Failure(e))

    def __iter__(self):
        return self

    def __next__(self):
        if not self._pending:
            self._requests.put(True)
            self._pending = True
        try:
            item = self._results.get(timeout=self.timeout)
        except queue.Empty:
            raise AliceError(f"no batch from {self.describe} in {self.timeout:.0f} s; the data loading is stuck "
                             f"or far too slow. Try --num-workers 0 (sampling in the main process) or raise "
                             f"--data-timeout; if it only happens with workers, report it with the command "
                             f"line") from None
        self._pending = False
        if isinstance(item, _Failure):
            err = item.error
            if isinstance(err, (AliceError, StopIteration, KeyboardInterrupt)):
                raise err
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise AliceError(f"{self.describe} failed: {type(err).__name__}: {first[:200]} (the worker's "
                             f"traceback is printed above; --num-workers 0 runs sampling in this process)") from err
        return item

    def close(self) -> None:
        """Stop the fetch thread (after the current fetch) and shut down the wrapped loader's workers."""
        self._requests.put(False)
        finish = getattr(self.loader, "_finish", None)
        if finish is not None:
            finish()
