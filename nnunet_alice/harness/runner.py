"""How ``alice_benchmark`` runs a command: a subprocess with its output in a log file.

A runner is any callable ``(argv, env, log_path) -> (exit code, output tail)``; tests pass a fake one.
Commands may run from several threads at once (``alice_benchmark --jobs``): ``stop_all`` takes every running
command down and refuses new ones until ``allow_new``, so that an interrupted benchmark leaves no process behind.
"""
from __future__ import annotations

import os
import subprocess
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Callable, Dict, List, Set, Tuple, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_LOCK = threading.Lock()
_LIVE: Set[subprocess.Popen] = set()
_STOPPING = [False]


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def stop_all() -> None:
    """Terminate every command started by ``subprocess_runner`` that still runs; start no new one."""
    with _LOCK:
        _STOPPING[0] = True
        procs = list(_LIVE)
    for proc in procs:
        _stop(proc)


def allow_new() -> None:
    with _LOCK:
        _STOPPING[0] = False


def run_all(fn: Callable[[T], R], items: List[T], jobs: int) -> List[R]:
    """``[fn(x) for x in items]``, ``jobs`` at a time; an interrupt or error stops every running command."""
    if jobs == 1 or len(items) < 2:
        return [fn(x) for x in items]
    allow_new()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(fn, x) for x in items]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
            return [f.result() for f in futures]
        except BaseException:  # an interrupt (main thread) or an unexpected error in a task
            for f in futures:
                f.cancel()
            stop_all()
            raise


def subprocess_runner(argv: List[str], env: Dict[str, str], log_path: str) -> Tuple[int, str]:
    """Run ``argv`` with ``env``, output to ``log_path``; returns (exit code, last lines of the output)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log:
        proc, rc = None, 127
        with _LOCK:
            if _STOPPING[0]:
                log.write(f"{argv[0]}: not started, the benchmark is stopping\n")
                rc = 143
            else:
                try:
                    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
                    _LIVE.add(proc)
                except OSError as e:
                    log.write(f"{argv[0]}: {e}\n")
        try:
            rc = proc.wait() if proc else rc
        except BaseException:  # interrupted or terminated (SIGTERM -> SystemExit): take the command down too
            if proc:
                _stop(proc)
            raise
        finally:
            with _LOCK:
                _LIVE.discard(proc)
    return rc, tail_of(log_path)


def tail_of(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            text = [ln.rstrip() for ln in f.read().replace("\r", "\n").splitlines() if ln.strip()]
    except OSError:
        return ""
    return "\n".join(text[-lines:])
