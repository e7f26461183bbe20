"""Trainer discovery for nnU-Net v2: the folder behind ``nnUNet_extTrainer``.

nnU-Net >= 2.8 looks up ``-tr NAME`` first inside ``nnunetv2`` and then in every
folder listed in the environment variable ``nnUNet_extTrainer`` (``os.pathsep``
separated). This package ships such a folder, ``nnunet_alice/_ext``, holding only
a one-line shim that re-exports the trainers of :mod:`nnunet_alice.trainers`.

A start-up hook (``nnunet_alice.pth`` -> :mod:`nnunet_alice._bootstrap`) calls
:func:`ensure_registered` in every interpreter of the environment. Users who opt
out with ``nnUNet_alice_no_autodiscovery=1`` can register the folder by hand::

    export nnUNet_extTrainer=$(nnunet_alice_ext_path)

This module must stay stdlib-only: it is imported at interpreter start-up.
"""
import os
import sys

ENV_VAR = "nnUNet_extTrainer"
"""Environment variable nnU-Net reads for extra trainer folders."""

OPT_OUT_VAR = "nnUNet_alice_no_autodiscovery"
"""Set to 1/true/yes/on to stop the start-up hook from touching ``ENV_VAR``."""

_TRUE_WORDS = {"1", "true", "yes", "on"}


def ext_trainer_dir() -> str:
    """Absolute path of the folder to put on ``nnUNet_extTrainer``."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ext")


def opted_out(environ=None) -> bool:
    """True if ``environ`` (default ``os.environ``) disables auto-discovery."""
    from nnunet_alice.env import getenv

    return str(getenv(OPT_OUT_VAR, "", environ) or "").strip().lower() in _TRUE_WORDS


def _norm(path: str) -> str:
    """Comparable form of a folder path (absolute, normalised, no trailing slash)."""
    return os.path.normcase(os.path.normpath(os.path.abspath(path)))


def ensure_registered(environ=None, respect_opt_out: bool = True) -> bool:
    """Append :func:`ext_trainer_dir` to ``environ[nnUNet_extTrainer]`` once.

    Keeps whatever the user already put there and does nothing if the folder
    is already listed (compared after normalisation) or, unless
    ``respect_opt_out`` is False, if the user opted out. Returns True if the
    mapping was changed.
    """
    env = os.environ if environ is None else environ
    if respect_opt_out and opted_out(env):
        return False
    folder = ext_trainer_dir()
    current = env.get(ENV_VAR, "")
    entries = [p for p in current.split(os.pathsep) if p.strip()]
    target = _norm(folder)
    if any(_norm(p) == target for p in entries):
        return False
    if current.strip():
        sep = "" if current.endswith(os.pathsep) else os.pathsep
        env[ENV_VAR] = current + sep + folder
    else:
        env[ENV_VAR] = folder
    return True


def main(argv=None) -> int:
    """Console script ``nnunet_alice_ext_path``: print the trainer folder."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in ("-h", "--help"):
        print("usage: nnunet_alice_ext_path\n\nPrint the folder to add to "
              f"{ENV_VAR}, e.g.\n  export {ENV_VAR}=$(nnunet_alice_ext_path)")
        return 0
    print(ext_trainer_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
