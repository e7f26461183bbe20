"""One error type for everything a user can get wrong, and the CLI wrapper that prints it on one line."""
from __future__ import annotations

import errno
import functools
import sys
from typing import Optional

_OS_HINTS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ELOOP: "a symbolic link loop",
    errno.EISDIR: "a directory is in the way",
    errno.ENOTDIR: "a file is in the way of a folder",
}


class AliceError(Exception):
    """A problem with the user's input or set-up. The message is one line that names the cause and the fix."""


class RunStopped(BaseException):
    """A run stopped on request (SIGTERM, SIGINT) after saving what it could; ``exit_code`` is 128 + signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def os_error_message(e: OSError, path: Optional[str] = None, doing: str = "") -> str:
    """``PATH: <doing> failed (<strerror>: <plain cause>)`` for an ``OSError``, one line."""
    where = path or e.filename or "?"
    cause = e.strerror or str(e) or type(e).__name__
    hint = _OS_HINTS.get(e.errno)
    detail = f"{cause}: {hint}" if hint and hint.lower() != cause.lower() else cause
    return f"{where}: {doing + ' failed ' if doing else ''}({detail})"


def cli_main(func):
    """Decorate a console-script entry point: ``AliceError`` becomes one line on stderr and exit code 2;
    a run stopped by a signal exits with 128 + the signal number, as if the signal had ended it."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except AliceError as e:
            msg = " ".join(str(e).split("\n"))
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(2)
        except RunStopped as e:
            print(str(e), file=sys.stderr)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
