"""``alice_demo_data``: write an nnU-Net raw dataset of synthetic subjects made from real anatomy, offline.

Layout written under ``<output>/Dataset<ID>_<Name>/``::

    dataset.json                  channel_names, labels, numTraining, file_ending ".nii.gz", "alice_demo"
    imagesTr/<case>_0000.nii.gz   labelled training cases (case ids <prefix>_tr000, ...)
    labelsTr/<case>.nii.gz
    imagesTs/<case>_0000.nii.gz   held-out test cases, with labels (<prefix>_ts000, ...)
    labelsTs/<case>.nii.gz
    imagesUnlabeled/<case>_0000.nii.gz   unlabeled pool for pretraining (<prefix>_un000, ...), no labels

Subject ``i`` of split ``s`` uses ``numpy.random.default_rng([seed, code(s), i])``, so it depends only on
(source, seed, split, i, spacing): changing ``--num-train`` does not change the test cases. The sources and
their labels are described in ``demo_sources``, the random variations in ``demo_augment``.

The dataset is written into a hidden temporary folder next to the target and renamed at the end, so an error
or an interrupt never leaves a half-written dataset.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np
import SimpleITK as sitk

from nnunet_alice.errors import AliceError, cli_main
from nnunet_alice.tools.demo_augment import make_subject
from nnunet_alice.tools.demo_sources import SOURCES, load_source

DEFAULT_DATASET_ID = 990
DEFAULT_NAMES = {"mni": "AliceDemoMNI", "ct": "AliceDemoCT"}
UNLABELED_FOLDER = "imagesUnlabeled"
FILE_ENDING = ".nii.gz"
#: Split name -> (images folder, labels folder or None, case-id infix, random-stream code).
SPLITS = {
    "train": ("imagesTr", "labelsTr", "tr", 1),
    "test": ("imagesTs", "labelsTs", "ts", 2),
    "unlabeled": (UNLABELED_FOLDER, None, "un", 3),
}


def _spacing3(spacing) -> tuple[float, float, float]:
    """``spacing`` as three floats (x, y, z mm); a single number means isotropic."""
    vals = [float(spacing)] if np.isscalar(spacing) else [float(s) for s in spacing]
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3 or not all(0.25 <= v <= 20.0 for v in vals):
        raise AliceError(f"--spacing must be one or three numbers between 0.25 and 20 mm, got {spacing}")
    return tuple(vals)


def case_ids(source: str, split: str, n: int) -> list[str]:
    """The case identifiers of one split, e.g. ``mni_tr000``."""
    infix = SPLITS[split][2]
    return [f"{source}_{infix}{i:03d}" for i in range(n)]


def _check_args(output_root, dataset_id, name, source, counts, seed):
    """Validate user input; raise ``AliceError`` with the fix."""
    if not output_root:
        raise AliceError("no output folder: pass --output DIR or set the nnUNet_raw environment variable")
    if source not in SOURCES:
        raise AliceError(f"unknown --source {source!r}: choose one of {', '.join(SOURCES)}")
    if not isinstance(dataset_id, (int, np.integer)) or not 1 <= dataset_id <= 999:
        raise AliceError(f"--dataset-id must be an integer in 1..999, got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name or ""):
        raise AliceError(f"--name must be letters, digits, '_' or '-', got {name!r}")
    if counts["train"] < 1 or counts["test"] < 0 or counts["unlabeled"] < 0:
        raise AliceError("--num-train must be >= 1, --num-test and --num-unlabeled >= 0")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise AliceError(f"--seed must be a non-negative integer, got {seed}")


def _target_folder(output_root: str, dataset_id: int, name: str, overwrite: bool) -> str:
    """The dataset folder; refuses an id already used by another name, or an existing one without overwrite."""
    folder = f"Dataset{dataset_id:03d}_{name}"
    target = os.path.join(output_root, folder)
    if os.path.isdir(output_root):
        clash = [d for d in os.listdir(output_root)
                 if d.startswith(f"Dataset{dataset_id:03d}_") and d != folder
                 and os.path.isdir(os.path.join(output_root, d))]
        if clash:
            raise AliceError(f"dataset id {dataset_id} is already used by {clash[0]} in {output_root}: "
                             "choose another -d/--dataset-id or remove that folder")
    if os.path.exists(target) and not overwrite:
        raise AliceError(f"{target} exists: pass --overwrite to replace it")
    return target


def _dataset_json(src, name, seed, spacing, counts) -> dict:
    """The dataset.json content (nnU-Net keys plus ``alice_demo``)."""
    return {
        "name": name,
        "description": src.description,
        "licence": src.licence,
        "channel_names": {"0": src.channel_name},
        "labels": dict(src.label_names),
        "numTraining": counts["train"],
        "file_ending": FILE_ENDING,
        "alice_demo": {
            "source": src.name,
            "seed": int(seed),
            "unlabeled_folder": UNLABELED_FOLDER,
            "spacing": list(spacing),
            "num_train": counts["train"],
            "num_test": counts["test"],
            "num_unlabeled": counts["unlabeled"],
        },
    }


def make_demo_dataset(output_root: str, dataset_id: int = DEFAULT_DATASET_ID, name: str | None = None,
                      source: str = "mni", num_train: int = 8, num_test: int = 8, num_unlabeled: int = 16,
                      seed: int = 0, spacing=2.0, *, overwrite: bool = False, ct_path: str | None = None,
                      verbose: bool = False) -> str:
    """Write the demo dataset and return its folder ``<output_root>/Dataset<ID>_<name>``.

    ``name`` defaults to ``AliceDemoMNI`` / ``AliceDemoCT``; ``spacing`` is one number (isotropic) or three
    (x, y, z mm); ``ct_path`` overrides the location of ``Cranium.inv3``. Raises ``AliceError`` for bad input,
    a missing source (with the install command), or an existing dataset when ``overwrite`` is false.
    """
    name = name or DEFAULT_NAMES.get(source, "AliceDemo")
    counts = {"train": int(num_train), "test": int(num_test), "unlabeled": int(num_unlabeled)}
    _check_args(output_root, dataset_id, name, source, counts, seed)
    spacing = _spacing3(spacing)
    src = load_source(source, ct_path)  # raises before anything is written
    output_root = os.path.abspath(output_root)
    target = _target_folder(output_root, int(dataset_id), name, overwrite)
    os.makedirs(output_root, exist_ok=True)

    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=output_root)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the dataset should not be
        for split, n in counts.items():
            img_dir, lab_dir, _, code = SPLITS[split]
            os.makedirs(os.path.join(tmp, img_dir))
            if lab_dir:
                os.makedirs(os.path.join(tmp, lab_dir))
            for i, case in enumerate(case_ids(source, split, n)):
                rng = np.random.default_rng([int(seed), code, i])
                img, lab = make_subject(src, spacing, rng)
                sitk.WriteImage(img, os.path.join(tmp, img_dir, f"{case}_0000{FILE_ENDING}"))
                if lab_dir:
                    sitk.WriteImage(lab, os.path.join(tmp, lab_dir, case + FILE_ENDING))
                if verbose:
                    print(f"  {split:9s} {case}  {'x'.join(map(str, img.GetSize()))}", flush=True)
        with open(os.path.join(tmp, "dataset.json"), "w") as f:
            json.dump(_dataset_json(src, name, seed, spacing, counts), f, indent=2)
        _replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _replace(tmp: str, target: str) -> None:
    """Move the finished ``tmp`` folder to ``target``, replacing an existing one only after success."""
    old = None
    if os.path.exists(target):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(target))
        os.rmdir(old)
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        if old:
            os.rename(old, target)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _folder_size(path: str) -> int:
    """Total bytes of the files under ``path``."""
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def build_parser() -> argparse.ArgumentParser:
    """The ``alice_demo_data`` argument parser."""
    p = argparse.ArgumentParser(
        prog="alice_demo_data",
        description="Write an nnU-Net raw dataset (imagesTr/labelsTr/imagesTs/labelsTs + an unlabeled pool in "
        "imagesUnlabeled/) of synthetic subjects made offline from real anatomy: the MNI152 T1 with grey/white "
        "matter labels (nilearn) or the InVesalius head CT with soft-tissue/bone labels.",
    )
    p.add_argument("--source", choices=SOURCES, default="mni",
                   help="mni: MNI ICBM152 T1, labels GM/WM (needs 'pip install nilearn'); ct: InVesalius head CT, "
                   "labels soft tissue/bone (needs 'apt-get install invesalius-examples'). Default: mni")
    p.add_argument("-d", "--dataset-id", type=int, default=DEFAULT_DATASET_ID,
                   help=f"nnU-Net dataset id (default {DEFAULT_DATASET_ID})")
    p.add_argument("--name", default=None, help="dataset name (default AliceDemoMNI / AliceDemoCT)")
    p.add_argument("--num-train", type=int, default=8, help="labelled training cases (default 8)")
    p.add_argument("--num-test", type=int, default=8, help="held-out test cases with labels (default 8)")
    p.add_argument("--num-unlabeled", type=int, default=16, help="unlabeled pool cases (default 16)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same data (default 0)")
    p.add_argument("--spacing", type=float, nargs="+", default=[2.0], metavar="MM",
                   help="output spacing in mm: one value (isotropic) or three (x y z). Default: 2")
    p.add_argument("--output", default=None,
                   help="folder that receives Dataset<ID>_<Name> (default: $nnUNet_raw)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset of the same id and name")
    p.add_argument("--ct-file", default=None, help="path of Cranium.inv3 (default: the Debian package's path)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the dataset folder")
    return p


@cli_main
def main(argv=None) -> int:
    """Entry point of ``alice_demo_data``."""
    args = build_parser().parse_args(argv)
    output = args.output or os.environ.get("nnUNet_raw")
    if not output:
        raise AliceError("no output folder: pass --output DIR or set the nnUNet_raw environment variable")
    t0 = time.perf_counter()
    folder = make_demo_dataset(
        output, args.dataset_id, args.name, args.source, args.num_train, args.num_test, args.num_unlabeled,
        args.seed, args.spacing, overwrite=args.overwrite, ct_path=args.ct_file, verbose=not args.quiet,
    )
    if args.quiet:
        print(folder)
        return 0
    dt = time.perf_counter() - t0
    n = args.num_train + args.num_test + args.num_unlabeled
    print(f"wrote {folder}: {args.num_train} train, {args.num_test} test, {args.num_unlabeled} unlabeled "
          f"({n} cases, {_folder_size(folder) / 1e6:.1f} MB) in {dt:.1f} s")
    print(f"next: nnUNetv2_plan_and_preprocess -d {args.dataset_id} -c 3d_fullres --verify_dataset_integrity")
    return 0


if __name__ == "__main__":
    sys.exit(main())
