"""Bad inputs: each gives a one-line error naming the file (or folder) and the cause, a non-zero exit, and leaves
nothing half-written (no results folder, no preprocessed unlabeled case)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from alice_sandbox import TINY_PLANS, cli_args, make_sandbox
from alice_trainer_utils import make_trainer, trainer_box, write_malicious_checkpoint  # noqa: F401 (fixture)
from nnunet_alice.errors import AliceError
from nnunet_alice.pretrain import cli
from nnunet_alice.pretrain.data.cases import UNLABELED_SUBDIR

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sandbox(synth_dataset, tmp_path_factory):
    return make_sandbox(synth_dataset, tmp_path_factory.mktemp("bad_inputs"))


@pytest.fixture
def box(sandbox, monkeypatch, tmp_path):
    sandbox.apply(monkeypatch)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    return sandbox


def fails(capsys, args, *expected: str) -> str:
    """Run alice_pretrain in-process; assert exit != 0 and exactly one ``error:`` line containing ``expected``."""
    with pytest.raises(SystemExit) as ei:
        cli.main(args)
    assert ei.value.code not in (0, None)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, lines
    for e in expected:
        assert e in lines[0], (e, lines[0])
    return lines[0]


def nothing_written(box, *case_ids: str) -> None:
    assert not Path(os.environ["nnUNet_results"]).exists()  # not even the results folder
    out = box.dataset / UNLABELED_SUBDIR / "nnUNetPlans_3d_fullres"
    if out.is_dir():
        names = os.listdir(out)
        assert not [n for n in names if n.startswith(".tmp_")]
        for case in case_ids:
            assert not [n for n in names if n.startswith(case + ".")], names


def write_image(path: Path, array: np.ndarray, spacing=None) -> Path:
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(array)
    if spacing:
        img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))
    return path


def volume(seed=0, shape=(24, 32, 32)) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 100, shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("kind,expected", [
    ("corrupt", ["cannot be read", "Unable to determine ImageIO reader"]),
    ("empty_file", ["cannot be read (empty file;"]),
    ("2d", ["is a 2D image (shape (32, 32)), the configuration is 3D"]),
    ("4d", ["is a 4D image with 2 volumes, the dataset expects 1 channel(s)"]),
    ("constant", ["image is constant (all voxels 7.0)"]),
])
def test_bad_unlabeled_image(box, tmp_path, capsys, kind, expected):
    folder = tmp_path / "unlabeled"
    case = f"bad_{kind}"
    path = folder / f"{case}_0000.nii.gz"
    folder.mkdir()
    if kind == "corrupt":
        path.write_bytes(b"this is not a NIfTI file" * 20)
    elif kind == "empty_file":
        path.write_bytes(b"")
    elif kind == "2d":
        write_image(path, volume()[0])
    elif kind == "4d":
        import SimpleITK as sitk
        sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(volume(i)) for i in range(2)]), str(path))
    elif kind == "constant":
        write_image(path, np.full((24, 32, 32), 7, np.float32), (1.0, 1.0, 2.0))
    fails(capsys, cli_args(box, "--unlabeled", str(folder)), f"error: {path}: ", *expected)
    nothing_written(box, case)


def test_truncated_image_with_a_huge_declared_size_is_refused_before_reading(box, tmp_path, capsys):
    """A 100 kB .nii.gz whose header declares 1024^3 int16 (2.1 GB): refused from the header, in bounded memory."""
    import gzip
    import resource
    import time

    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((1024, 1024, 1024))
    header.set_data_dtype(np.int16)
    header.set_zooms((1.0, 1.0, 2.0))
    path = tmp_path / "unl" / "huge_0000.nii.gz"
    path.parent.mkdir()
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + np.random.default_rng(0).bytes(100_000)))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    fails(capsys, cli_args(box, "--unlabeled", str(path.parent)), f"error: {path}: truncated: the header declares "
          f"1024x1024x1024 voxels of int16 (2147.5 MB) but the file holds 0.1 MB of voxel data")
    assert time.perf_counter() - t0 < 60
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 500_000  # kB: never near the declared 2 GB
    nothing_written(box, "huge")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_voxels(synth_dataset, tmp_path, monkeypatch, capsys, value):
    # SimpleITK's NIfTI reader turns NaN/Inf into 0, so the check is exercised with a format that keeps them
    box = make_sandbox(synth_dataset, tmp_path / "nrrd").apply(monkeypatch)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    ds = box.dataset_json()
    ds["file_ending"] = ".nrrd"
    (box.dataset / "dataset.json").write_text(json.dumps(ds))
    a = volume()
    a[5, 6, 7] = value
    path = write_image(tmp_path / "unl" / "nonfinite_0000.nrrd", a, (1.0, 1.0, 2.0))
    fails(capsys, cli_args(box, "--unlabeled", str(path.parent)), f"{path}: contains NaN or Inf voxels")
    nothing_written(box, "nonfinite")


def test_wrong_number_of_channels(box, tmp_path, capsys):
    folder = tmp_path / "unl"
    for c in (0, 1):
        write_image(folder / f"twochan_{c:04d}.nii.gz", volume(c), (1.0, 1.0, 2.0))
    fails(capsys, cli_args(box, "--unlabeled", str(folder)), str(folder), "case twochan has channels [0, 1]",
          "the dataset expects [0]")
    nothing_written(box, "twochan")


def test_files_not_following_nnunet_naming(box, tmp_path, capsys):
    write_image(tmp_path / "unl" / "good_0000.nii.gz", volume(), (1.0, 1.0, 2.0))
    bad = write_image(tmp_path / "unl" / "scan.nii.gz", volume(1), (1.0, 1.0, 2.0))
    fails(capsys, cli_args(box, "--unlabeled", str(bad.parent)), f"{bad}: does not follow nnU-Net naming",
          "<case>_<XXXX>.nii.gz")
    nothing_written(box, "good", "scan")


def test_unlabeled_folder_without_images_or_missing(box, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    fails(capsys, cli_args(box, "--unlabeled", str(tmp_path / "empty")), f"{tmp_path / 'empty'}: --unlabeled folder "
                                                                          f"holds no images")
    fails(capsys, cli_args(box, "--unlabeled", str(tmp_path / "nope")), f"{tmp_path / 'nope'}: --unlabeled folder "
                                                                         f"does not exist")
    nothing_written(box)


# ---------------------------------------------------------------------------------------------- dataset and plans
def test_dataset_without_images(synth_dataset, tmp_path, monkeypatch, capsys):
    box = make_sandbox(synth_dataset, tmp_path / "noimg").apply(monkeypatch)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    data = box.dataset / "nnUNetPlans_3d_fullres"
    shutil.rmtree(data)
    data.mkdir()
    fails(capsys, cli_args(box), f"{data}: no preprocessed images found")
    nothing_written(box)


def test_missing_dataset_json(synth_dataset, tmp_path, monkeypatch, capsys):
    box = make_sandbox(synth_dataset, tmp_path / "nojson").apply(monkeypatch)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    (box.dataset / "dataset.json").unlink()
    fails(capsys, cli_args(box), f"{box.dataset / 'dataset.json'}: missing")
    nothing_written(box)


def with_option(args, flag: str, value: str):
    args = list(args)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


@pytest.mark.parametrize("flag,value,expected", [
    ("-p", "NoSuchPlans", "NoSuchPlans.json: plans not found; run nnUNetv2_plan_and_preprocess"),
    ("-c", "3d_nope", "unknown configuration '3d_nope' (available: 2d, 3d_fullres)"),
    ("-c", "2d", "configuration '2d' is 2D; Alice pretrains 3D configurations"),
    ("-d", "555", "unknown dataset '555'"),
])
def test_bad_dataset_plans_or_configuration(box, capsys, flag, value, expected):
    fails(capsys, with_option(cli_args(box), flag, value), expected)
    nothing_written(box)


# ---------------------------------------------------------------------------------------------- output folder
def test_continue_without_checkpoint(box, capsys):
    fails(capsys, cli_args(box, "--continue"), "checkpoint_latest.pth: --continue given but there is no checkpoint")
    nothing_written(box)


def test_unwritable_output_folder_is_refused_before_any_work(box, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setenv("nnUNet_results", str(blocker / "results"))
    write_image(tmp_path / "unl" / "early_0000.nii.gz", volume(), (1.0, 1.0, 2.0))
    fails(capsys, cli_args(box, "--unlabeled", str(tmp_path / "unl")), str(blocker / "results"),
          "output folder is not writable")
    nothing_written(box, "early")  # refused before the unlabeled images were preprocessed


# ---------------------------------------------------------------------------------------------- checkpoints
def _pretrain_once(box, capsys, *extra):
    cli.main(cli_args(box, *extra))
    capsys.readouterr()
    return Path(os.environ["nnUNet_results"], box.dataset_name, f"AlicePretrain__{TINY_PLANS}__3d_fullres")


@pytest.mark.parametrize("damage,expected", [
    ("truncated", "checksum mismatch with checkpoint_latest.pth.sha256 (the file is truncated or corrupted)"),
    ("malicious", "refused to load, the file contains pickled objects"),
])
def test_continue_from_a_damaged_checkpoint(box, tmp_path, capsys, damage, expected):
    folder = _pretrain_once(box, capsys)
    latest = folder / "checkpoint_latest.pth"
    marker = tmp_path / "pwned"
    if damage == "truncated":
        latest.write_bytes(latest.read_bytes()[:1000])
    else:
        latest.unlink()
        (folder / "checkpoint_latest.pth.sha256").unlink()
        write_malicious_checkpoint(str(latest), str(marker))
    fails(capsys, cli_args(box, "--continue", "--steps", "2"), "no usable checkpoint to continue from",
          str(latest), expected)
    assert not marker.exists()


def test_continue_with_a_checkpoint_of_another_objective(box, capsys):
    folder = _pretrain_once(box, capsys)
    args = with_option(cli_args(box, "--continue", "--head-hidden-dim", "32", "--head-bottleneck-dim", "16",
                                "--head-out-dim", "32", "--mask-block-size", "8"), "--objective", "alice")
    fails(capsys, args, str(folder / "checkpoint_latest.pth"), "--continue with settings that change the computation",
          "objective: 'mae' -> 'alice'")
    # accepted on request, the state still has to fit the objective
    fails(capsys, args + ["--allow-settings-change"], str(folder / "checkpoint_latest.pth"),
          "training state does not fit this objective")


@pytest.mark.parametrize("damage", ["truncated", "malicious", "other_network"])
def test_trainer_refuses_a_bad_pretrained_checkpoint(trainer_box, monkeypatch, tmp_path, damage):
    from nnunet_alice.trainers import nnUNetTrainerAlice_tiny

    box, ckpt = trainer_box
    path, marker = str(tmp_path / "pre.pth"), str(tmp_path / "pwned")
    plans_name = TINY_PLANS
    if damage == "truncated":
        data = open(ckpt, "rb").read()
        open(path, "wb").write(data[:-100])
        shutil.copy(ckpt + ".sha256", path + ".sha256")
        expected = "checksum mismatch"
    elif damage == "malicious":
        write_malicious_checkpoint(path, marker)
        expected = "refused to load, the file contains pickled objects"
    else:  # a checkpoint of the tiny plans into the network of the default plans
        path, plans_name = ckpt, "nnUNetPlans"
        expected = "checkpoint does not fit this plan: arch_kwargs.features_per_stage"
    t = make_trainer(nnUNetTrainerAlice_tiny, box, monkeypatch, pretrained=path, plans_name=plans_name,
                     results=tmp_path / "r")
    t.initialize()
    before = {k: v.clone() for k, v in t.network.state_dict().items()}
    with pytest.raises(AliceError) as ei:
        t.load_alice_weights()
    msg = str(ei.value)
    assert msg.startswith(path + ": ") and expected in msg and "\n" not in msg
    assert not os.path.exists(marker)
    assert all(v.equal(t.network.state_dict()[k]) for k, v in before.items())  # nothing half-loaded
