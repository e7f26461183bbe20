"""The command-line tools as a user runs them: only ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results``
set (plus PATH and HOME), no thread or worker variables, so data workers are forked as on any user's machine.

Outputs go to a results folder of this module, so the other tests' checkpoints are never touched.
"""
import os
import sys

import pytest

from conftest import VENV_BIN

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def plain_env(ds, results):
    return {"PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", str(ds.root)), "nnUNet_raw": str(ds.raw),
            "nnUNet_preprocessed": str(ds.preprocessed), "nnUNet_results": str(results)}


def run_plain(ds, results, cmd, timeout=600):
    import subprocess

    proc = subprocess.run([str(c) for c in cmd], env=plain_env(ds, results), cwd=str(ds.root),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def plain_results(tmp_path_factory):
    return tmp_path_factory.mktemp("plain_results")


@pytest.mark.parametrize("workers", [None, 2])
def test_alice_pretrain_with_forked_workers(synth_dataset, plain_results, workers):
    ds = synth_dataset
    results = plain_results / f"w{workers}"
    extra = [] if workers is None else ["--num-workers", workers]
    proc = run_plain(ds, results, ["alice_pretrain", "-d", ds.dataset_id, "-c", "3d_fullres", "-device", "cpu",
                                   "--steps", 2, "--data-timeout", 300, *extra])
    expected = workers if workers is not None else max(0, min(8, (os.cpu_count() or 1) - 1))
    assert f"{expected} data worker(s)" in proc.stdout + proc.stderr
    folder = results / ds.dataset_name / "AlicePretrain__nnUNetPlans__3d_fullres"
    assert (folder / "checkpoint_final.pth").is_file()


def test_alice_embed_then_embedding_matcher_with_workers(synth_dataset, plain_results):
    ds = synth_dataset
    results = plain_results / "embed"
    run_plain(ds, results, ["alice_embed", "-d", ds.dataset_id, "-c", "3d_fullres", "-device", "cpu",
                            "--steps", 2, "--crop", 16, "--no-progress"])
    run_plain(ds, results, ["alice_pretrain", "-d", ds.dataset_id, "-c", "3d_fullres", "-device", "cpu",
                            "--steps", 1, "--matcher", "embedding", "--num-workers", 2, "--data-timeout", 300])
    assert (results / ds.dataset_name / "AlicePretrain__nnUNetPlans__3d_fullres" / "checkpoint_final.pth").is_file()


@pytest.mark.skipif(sys.platform != "linux", reason="nnU-Net's default workers fork on Linux")
def test_finetune_with_nnunet_default_workers(synth_dataset, plain_results):
    ds = synth_dataset
    results = plain_results / "w2"
    if not (results / ds.dataset_name / "AlicePretrain__nnUNetPlans__3d_fullres" / "checkpoint_final.pth").is_file():
        run_plain(ds, results, ["alice_pretrain", "-d", ds.dataset_id, "-c", "3d_fullres", "-device", "cpu",
                                "--steps", 1, "--num-workers", 2])
    proc = run_plain(ds, results, ["nnUNetv2_train", ds.dataset_id, "3d_fullres", "all", "-tr",
                                   "nnUNetTrainerAlice_tiny", "-device", "cpu"], timeout=800)
    out = proc.stdout + proc.stderr
    assert "Alice: loaded" in out
    assert (results / ds.dataset_name / "nnUNetTrainerAlice_tiny__nnUNetPlans__3d_fullres" / "fold_all"
            / "checkpoint_final.pth").is_file()
