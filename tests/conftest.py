"""Shared fixtures: tiny U-Nets built directly, and one real tiny nnU-Net dataset per test session.

``synth_dataset`` generates a synthetic raw dataset with ``alice_synth_data`` and runs
``nnUNetv2_plan_and_preprocess`` on it once (≈ 45 s on 2 cores) in a session temp dir. Every subprocess gets
an explicit environment (see :class:`SynthDataset`): planning must run WITHOUT ``nnUNet_n_proc_DA`` (nnU-Net's
planner calls ``torch.set_num_threads(nnUNet_n_proc_DA)``, and 0 crashes it), training with it set to 0.
"""
from __future__ import annotations

import os
import pydoc
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pytest

VENV_BIN = str(Path(sys.executable).parent)

# ---------------------------------------------------------------------------------------------- tiny networks
PLAIN_CLASS = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
REQUIRES_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]


def tiny_arch_kwargs(features=(4, 8, 16)) -> dict:
    """Plan-style ``arch_kwargs`` (dotted class names) of a 3-stage PlainConvUNet."""
    n = len(features)
    return {
        "n_stages": n,
        "features_per_stage": list(features),
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * n,
        "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
        "n_conv_per_stage": [1] * n,
        "n_conv_per_stage_decoder": [1] * (n - 1),
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }


def build_tiny_unet(arch_kwargs: Optional[dict] = None, in_channels: int = 1, num_classes: int = 3):
    """A PlainConvUNet built directly from plan-style kwargs (dotted names resolved like nnU-Net does)."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    kw = dict(arch_kwargs or tiny_arch_kwargs())
    for k in REQUIRES_IMPORT:
        if kw.get(k) is not None:
            kw[k] = pydoc.locate(kw[k])
    return PlainConvUNet(input_channels=in_channels, num_classes=num_classes, deep_supervision=False, **kw)


def tiny_metadata(arch_kwargs: Optional[dict] = None, in_channels: int = 1) -> dict:
    return {"network_class_name": PLAIN_CLASS, "arch_kwargs": arch_kwargs or tiny_arch_kwargs(),
            "arch_kwargs_requires_import": list(REQUIRES_IMPORT), "num_input_channels": in_channels}


@pytest.fixture
def tiny_unet():
    """Factory fixture: ``tiny_unet(arch_kwargs=None, in_channels=1, num_classes=3)``."""
    return build_tiny_unet


# ---------------------------------------------------------------------------------------------- real dataset
DATASET_ID = 987
DATASET_NAME = f"Dataset{DATASET_ID}_AliceSynth"


@dataclass
class SynthDataset:
    root: Path
    raw: Path            # nnUNet_raw
    preprocessed: Path   # nnUNet_preprocessed
    results: Path        # nnUNet_results
    dataset_id: int
    dataset_name: str

    @property
    def raw_dataset(self) -> Path:
        return self.raw / self.dataset_name

    @property
    def preprocessed_dataset(self) -> Path:
        return self.preprocessed / self.dataset_name

    def env(self, n_proc_da: Optional[int] = 0, **extra: str) -> Dict[str, str]:
        """A clean environment: PATH (venv first), HOME, the three nnU-Net folders, worker settings, ``extra``.

        ``n_proc_da=None`` leaves ``nnUNet_n_proc_DA`` unset (needed for planning).
        """
        env = {
            "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", str(self.root)),
            "nnUNet_raw": str(self.raw),
            "nnUNet_preprocessed": str(self.preprocessed),
            "nnUNet_results": str(self.results),
            "nnUNet_def_n_proc": "1",
        }
        if n_proc_da is not None:
            env["nnUNet_n_proc_DA"] = str(n_proc_da)
        env.update(extra)
        return env

    def run(self, cmd: List[str], n_proc_da: Optional[int] = 0, check: bool = True, timeout: int = 600,
            **extra: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(c) for c in cmd], env=self.env(n_proc_da, **extra), cwd=str(self.root),
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n--- stdout\n"
                                 f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
        return proc


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> SynthDataset:
    """4 training + 1 test + 2 unlabeled synthetic cases (24×32×32), planned and preprocessed for 3d_fullres."""
    root = tmp_path_factory.mktemp("nnunet")
    ds = SynthDataset(root, root / "raw", root / "preprocessed", root / "results", DATASET_ID, DATASET_NAME)
    for p in (ds.raw, ds.preprocessed, ds.results):
        p.mkdir()
    ds.run(["alice_synth_data", "-d", DATASET_ID, "--num-train", 4, "--num-test", 1, "--num-unlabeled", 2,
            "--shape", 24, 32, 32, "--output", ds.raw], n_proc_da=None)
    ds.run(["nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "-np", 1], n_proc_da=None)
    assert (ds.preprocessed_dataset / "nnUNetPlans.json").is_file()
    return ds


# ---------------------------------------------------------------------------------------------- test order
def pytest_collection_modifyitems(config, items):
    """``ALICE_TEST_ORDER=reverse`` runs the test files in reverse order (tests inside a file keep theirs), so CI
    proves that no test depends on what an earlier file left behind (threads, forks, environment, files)."""
    if os.environ.get("ALICE_TEST_ORDER", "").lower() != "reverse":
        return
    files = []
    for item in items:
        if item.fspath not in files:
            files.append(item.fspath)
    rank = {f: i for i, f in enumerate(reversed(files))}
    items.sort(key=lambda it: rank[it.fspath])
