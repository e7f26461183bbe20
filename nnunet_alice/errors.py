"""One error type for everything a user can get wrong, and the CLI wrapper that prints it on one line."""
from __future__ import annotations

import functools
import sys


class AliceError(Exception):
    """A problem with the user's input or set-up. The message is one line that names the cause and the fix."""


def cli_main(func):
    """Decorate a console-script entry point: ``AliceError`` becomes one line on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except AliceError as e:
            msg = " ".join(str(e).split("\n"))
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
