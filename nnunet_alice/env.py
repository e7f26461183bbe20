"""The package's environment variables: one naming scheme, ``nnUNet_alice_<setting>``, beside nnU-Net's own
``nnUNet_<setting>`` (``nnUNet_raw``, ``nnUNet_results``, ...).

User settings: ``nnUNet_alice_pretrained``, ``nnUNet_alice_load``, ``nnUNet_alice_lr`` (fine-tuning, docs/finetuning.md)
and ``nnUNet_alice_no_autodiscovery`` (install hook, README). ``nnUNet_alice_bench_*`` are set by ``alice_benchmark``
for its trainers (``nnunet_alice.harness.trainers``). Names from earlier versions still work, with one line on stderr
naming the new one. Stdlib only: the start-up hook imports this module in every interpreter.
"""
import os
import sys
from typing import Mapping, Optional

#: new name -> the name earlier versions read
RENAMED = {
    "nnUNet_alice_no_autodiscovery": "NNUNET_ALICE_NO_AUTODISCOVERY",
    "nnUNet_alice_bench_epochs": "ALICE_BENCH_EPOCHS",
    "nnUNet_alice_bench_iterations": "ALICE_BENCH_ITERATIONS",
    "nnUNet_alice_bench_val_iterations": "ALICE_BENCH_VAL_ITERATIONS",
    "nnUNet_alice_bench_seed": "ALICE_BENCH_SEED",
    "nnUNet_alice_bench_recipe": "ALICE_BENCH_RECIPE",
    "nnUNet_alice_bench_init": "ALICE_BENCH_INIT",
    "nnUNet_alice_bench_final_val": "ALICE_BENCH_FINAL_VAL",
}
_warned: set = set()


def getenv(name: str, default: Optional[str] = None, environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """``name`` from the environment, else its old name (with a one-time deprecation line), else ``default``."""
    env = os.environ if environ is None else environ
    if name in env:
        return env[name]
    old = RENAMED.get(name)
    if old is not None and old in env:
        if old not in _warned:
            _warned.add(old)
            print(f"nnunet_alice: {old} is deprecated and will stop working; set {name} instead", file=sys.stderr)
        return env[old]
    return default
