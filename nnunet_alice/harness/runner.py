"""How ``alice_benchmark`` runs a command: a subprocess with its output in a log file.

A runner is any callable ``(argv, env, log_path) -> (exit code, output tail)``; tests pass a fake one.
"""
from __future__ import annotations

import os
import subprocess
from typing import Dict, List, Tuple


def subprocess_runner(argv: List[str], env: Dict[str, str], log_path: str) -> Tuple[int, str]:
    """Run ``argv`` with ``env``, output to ``log_path``; returns (exit code, last lines of the output)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log:
        try:
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        except OSError as e:
            log.write(f"{argv[0]}: {e}\n")
            proc = None
        try:
            rc = proc.wait() if proc else 127
        except BaseException:  # interrupted or terminated (SIGTERM -> SystemExit): take the command down too
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    return rc, tail_of(log_path)


def tail_of(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            text = [ln.rstrip() for ln in f.read().replace("\r", "\n").splitlines() if ln.strip()]
    except OSError:
        return ""
    return "\n".join(text[-lines:])
