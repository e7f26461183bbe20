"""One ``alice_pretrain`` run per output folder: a lock file that names its holder.

``<folder>/.alice_pretrain.lock`` holds ``{"pid", "host", "started", "command"}`` of the run that writes the
folder. Mutual exclusion comes from ``fcntl.flock`` on that file: the kernel drops the lock when its process
dies, even by ``kill -9``, so a lock left by a killed run is simply taken over (and reported). On a file
system without ``flock`` the recorded holder is checked instead: a process that no longer exists on this
host (or whose pid now belongs to a process started later) is stale; a holder on another host cannot be
checked and is refused with the command that removes the lock.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Optional

from nnunet_alice.errors import AliceError, os_error_message

LOCK_NAME = ".alice_pretrain.lock"


def _process_start_ticks(pid: int) -> Optional[int]:
    """Start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22), ``None`` if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def describe(holder: dict) -> str:
    cmd = holder.get("command") or "?"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"
            f": {cmd[:160]}")


def holder_is_stale(holder: dict) -> Optional[bool]:
    """``True``: the recorded run is gone; ``False``: it runs; ``None``: cannot tell (another host)."""
    if holder.get("host") != socket.gethostname():
        return None
    try:
        pid = int(holder["pid"])
    except (KeyError, TypeError, ValueError):
        return True
    if not _alive(pid):
        return True
    ticks = holder.get("start_ticks")
    now = _process_start_ticks(pid)
    return ticks is not None and now is not None and int(ticks) != now  # the pid was reused


class RunLock:
    """Held by the run writing ``folder``; :meth:`acquire` raises a one-line :class:`AliceError` if another holds it.

    ``stale`` is the description of a dead holder whose lock was taken over (for the run's log), else ``None``.
    """

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.fd: Optional[int] = None
        self.stale: Optional[str] = None

    def _refuse(self, holder: dict, extra: str = "") -> AliceError:
        return AliceError(f"{self.folder}: another alice_pretrain run writes this folder ({describe(holder)}){extra}; "
                          f"wait for it to finish or stop it, or use another nnUNet_results")

    def acquire(self) -> "RunLock":
        for _ in range(20):  # retried only when the file was replaced between open and flock
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise AliceError(os_error_message(e, self.path, "creating the run lock")) from None
            try:
                if self._lock_or_check(fd):
                    self.fd = fd
                    self._write_holder()
                    return self
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise AliceError(f"{self.path}: the run lock keeps changing; is another run starting right now?")

    def _lock_or_check(self, fd: int) -> bool:
        holder = _read_holder(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise self._refuse(_read_holder(fd) or holder) from None
            # no flock on this file system: decide from the recorded holder
            stale = holder_is_stale(holder) if holder else True
            if stale is False:
                raise self._refuse(holder) from None
            if stale is None:
                raise self._refuse(holder, f"; this file system has no file locks, so a run on another host cannot "
                                           f"be checked: if it is gone, remove {self.path}") from None
        else:
            try:  # the file we locked must still be the one at the path (a finishing run unlinks it)
                if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                    return False
            except FileNotFoundError:
                return False
            holder = _read_holder(fd)  # re-read under the lock
        if holder and int(holder.get("pid", -1)) != os.getpid():
            self.stale = describe(holder)
        return True

    def _write_holder(self) -> None:
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(sys.argv),
                  "start_ticks": _process_start_ticks(os.getpid())}
        data = (json.dumps(holder) + "\n").encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        os.fsync(self.fd)

    def __del__(self):  # a run object dropped without running (library use) frees its folder
        self.release()

    def release(self) -> None:
        """Remove the lock file (while still holding it, so no other run can have locked this inode) and unlock."""
        if self.fd is None:
            return
        try:
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.remove(self.path)
        except OSError:
            pass
        finally:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def _read_holder(fd: int) -> dict:
    try:
        data = os.pread(fd, 65536, 0)
        holder = json.loads(data.decode() or "{}")
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}
