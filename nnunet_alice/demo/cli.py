"""``alice_demo_data``: write an nnU-Net raw dataset of synthetic subjects made from real anatomy, offline.

Layout written under ``<output>/Dataset<ID>_<Name>/``::

    dataset.json                  channel_names, labels, numTraining, file_ending ".nii.gz", "alice_demo"
    imagesTr/<case>_0000.nii.gz   labelled training cases (case ids <prefix>_tr000, ...)
    labelsTr/<case>.nii.gz
    imagesTs/<case>_0000.nii.gz   held-out test cases, with labels (<prefix>_ts000, ...)
    labelsTs/<case>.nii.gz
    imagesUnlabeled/<case>_0000.nii.gz   unlabeled pool for pretraining (<prefix>_un000, ...), no labels

Subject ``i`` of split ``s`` uses ``numpy.random.default_rng([seed, code(s), i])``, so it depends only on
(source, task, seed, split, i, spacing, t2 fraction): changing ``--num-train`` does not change the test cases.
The sources and their label sets (``--task anatomy``: grey matter split by position in the template, white
matter, ventricles, other CSF; ``--task tissue``: grey/white matter) are described in ``nnunet_alice.demo.sources``, the
random variations in ``nnunet_alice.demo.augment``. Images are written with nibabel (no SimpleITK needed).

The dataset is written into a hidden temporary folder next to the target and renamed at the end, so an error
or an interrupt never leaves a half-written dataset.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np

from nnunet_alice.errors import AliceError, cli_main
from nnunet_alice.demo.augment import VARIATIONS, make_subject, uses_tissue
from nnunet_alice.demo.sources import RAS_TO_LPS, SOURCES, TASKS, load_source

DEFAULT_DATASET_ID = 990
DEFAULT_NAMES = {("mni", "anatomy"): "AliceDemoAnatomy", ("mni", "tissue"): "AliceDemoMNI",
                 ("ct", "tissue"): "AliceDemoCT"}
DEFAULT_COUNTS = {"train": 8, "test": 8, "unlabeled": 64}
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


def resolve_task(source: str, task: str | None) -> str:
    """``task`` checked against ``source``; ``None`` means ``anatomy`` where the source has it, else ``tissue``."""
    if task is None:
        return "anatomy" if source == "mni" else "tissue"
    if task not in TASKS:
        raise AliceError(f"unknown --task {task!r}: choose one of {', '.join(TASKS)}")
    if task == "anatomy" and source != "mni":
        raise AliceError(f"--task anatomy needs --source mni (the {source} source has tissue labels only); "
                         "pass --task tissue")
    return task


def _check_args(output_root, dataset_id, name, source, counts, seed, t2_fraction):
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
    if not 0.0 <= t2_fraction <= 1.0:
        raise AliceError(f"--t2-fraction must be between 0 and 1, got {t2_fraction}")
    if t2_fraction > 0 and source != "mni":
        raise AliceError("--t2-fraction needs an MR source with tissue maps (--source mni)")


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


def _dataset_json(src, task, name, seed, spacing, counts, variation) -> dict:
    """The dataset.json content (nnU-Net keys plus ``alice_demo``)."""
    return {
        "name": name,
        "description": src.descriptions[task],
        "licence": src.licence,
        "channel_names": {"0": src.channel_name if not variation.t2_fraction else "MR"},
        "labels": src.label_names(task),
        "numTraining": counts["train"],
        "file_ending": FILE_ENDING,
        "alice_demo": {
            "source": src.name,
            "task": task,
            "seed": int(seed),
            "unlabeled_folder": UNLABELED_FOLDER,
            "spacing": list(spacing),
            "num_train": counts["train"],
            "num_test": counts["test"],
            "num_unlabeled": counts["unlabeled"],
            "variation": dataclasses.asdict(variation),
        },
    }


def write_nifti(arr: np.ndarray, affine_lps: np.ndarray, path: str) -> None:
    """Write an (x, y, z) array with a voxel -> LPS affine as NIfTI (RAS affine in both qform and sform)."""
    import nibabel as nib

    affine = RAS_TO_LPS @ affine_lps
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)


def make_demo_dataset(output_root: str, dataset_id: int = DEFAULT_DATASET_ID, name: str | None = None,
                      source: str = "mni", num_train: int = DEFAULT_COUNTS["train"],
                      num_test: int = DEFAULT_COUNTS["test"], num_unlabeled: int = DEFAULT_COUNTS["unlabeled"],
                      seed: int = 0, spacing=2.0, *, task: str | None = None, t2_fraction: float = 0.0,
                      overwrite: bool = False, ct_path: str | None = None, verbose: bool = False,
                      workers: int = 1) -> str:
    """Write the demo dataset and return its folder ``<output_root>/Dataset<ID>_<name>``.

    ``task`` is ``anatomy`` (default for mni) or ``tissue``; ``name`` defaults to ``AliceDemoAnatomy`` /
    ``AliceDemoMNI`` / ``AliceDemoCT``; ``spacing`` is one number (isotropic) or three (x, y, z mm);
    ``t2_fraction`` makes that share of MR subjects T2-like; ``ct_path`` overrides the location of
    ``Cranium.inv3``; ``workers`` > 1 makes the subjects in that many forked processes (the same data). Raises
    ``AliceError`` for bad input, a missing source (with the install command), or an existing dataset when
    ``overwrite`` is false.
    """
    task = resolve_task(source, task) if source in SOURCES else task
    name = name or DEFAULT_NAMES.get((source, task), "AliceDemo")
    counts = {"train": int(num_train), "test": int(num_test), "unlabeled": int(num_unlabeled)}
    t2_fraction = float(t2_fraction)
    _check_args(output_root, dataset_id, name, source, counts, seed, t2_fraction)
    if not isinstance(workers, (int, np.integer)) or workers < 1:
        raise AliceError(f"--workers must be a positive integer, got {workers}")
    spacing = _spacing3(spacing)
    variation = dataclasses.replace(VARIATIONS[task], t2_fraction=t2_fraction)
    src = load_source(source, ct_path)  # raises before anything is written
    output_root = os.path.abspath(output_root)
    target = _target_folder(output_root, int(dataset_id), name, overwrite)
    os.makedirs(output_root, exist_ok=True)

    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=output_root)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the dataset should not be
        jobs = []
        for split, n in counts.items():
            img_dir, lab_dir, _, _ = SPLITS[split]
            os.makedirs(os.path.join(tmp, img_dir))
            if lab_dir:
                os.makedirs(os.path.join(tmp, lab_dir))
            jobs += [(split, i, case) for i, case in enumerate(case_ids(source, split, n))]
        _JOB.update(src=src, spacing=spacing, task=task, variation=variation, seed=int(seed), tmp=tmp)
        for split, case, size, contrast in _map(_make_case, jobs, workers):
            if verbose:
                print(f"  {split:9s} {case}  {'x'.join(map(str, size))}  {contrast}", flush=True)
        with open(os.path.join(tmp, "dataset.json"), "w") as f:
            json.dump(_dataset_json(src, task, name, seed, spacing, counts, variation), f, indent=2)
        _replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _JOB.clear()
    return target


#: What every subject of the dataset being written shares; set before worker processes are forked, so that they
#: inherit the loaded (and pre-smoothed) source instead of receiving it pickled.
_JOB: dict = {}


def _make_case(job) -> tuple:
    """Make and write subject ``i`` of ``split`` (its own random stream, see the module docstring)."""
    split, i, case = job
    img_dir, lab_dir, _, code = SPLITS[split]
    rng = np.random.default_rng([_JOB["seed"], code, i])
    subject = make_subject(_JOB["src"], _JOB["spacing"], rng, _JOB["task"], _JOB["variation"])
    affine = subject.grid.affine
    write_nifti(subject.image, affine, os.path.join(_JOB["tmp"], img_dir, f"{case}_0000{FILE_ENDING}"))
    if lab_dir:
        write_nifti(subject.labels, affine, os.path.join(_JOB["tmp"], lab_dir, case + FILE_ENDING))
    return split, case, subject.grid.size, subject.contrast


def _map(func, jobs, workers: int):
    """``func`` over ``jobs`` in order, in this process or in ``workers`` forked processes (same results: every
    subject has its own random stream)."""
    if workers <= 1 or len(jobs) < 2 or "fork" not in multiprocessing.get_all_start_methods():
        yield from map(func, jobs)
        return
    src = _JOB["src"]
    src.channels_for_spacing(_JOB["spacing"], with_tissue=uses_tissue(src, _JOB["variation"]))  # once, shared
    pool = multiprocessing.get_context("fork").Pool(min(int(workers), len(jobs)))
    try:
        yield from pool.imap(func, jobs)
        pool.close()
    finally:
        pool.terminate()
        pool.join()


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
        "imagesUnlabeled/) of synthetic subjects made offline from real anatomy (the MNI152 T1 average from "
        "nilearn, or the InVesalius head CT), each a random deformation of the source with its labels carried "
        "along.",
    )
    p.add_argument("--source", choices=SOURCES, default="mni",
                   help="mni: MNI ICBM152 T1 (needs 'pip install nilearn'); ct: InVesalius head CT, labels soft "
                   "tissue/bone (needs 'apt-get install invesalius-examples'). Default: mni")
    p.add_argument("--task", choices=TASKS, default=None,
                   help="anatomy: grey matter split by position in the template (frontal, parieto-occipital, "
                   "temporal, cerebellar, deep), white matter, ventricles, other CSF - not solvable by intensity, "
                   "with stronger deformations and varied contrast; tissue: grey/white matter (near an intensity "
                   "threshold). Default: anatomy for mni, tissue for ct")
    p.add_argument("-d", "--dataset-id", type=int, default=DEFAULT_DATASET_ID,
                   help=f"nnU-Net dataset id (default {DEFAULT_DATASET_ID})")
    p.add_argument("--name", default=None,
                   help="dataset name (default AliceDemoAnatomy, AliceDemoMNI for --task tissue, AliceDemoCT)")
    p.add_argument("--num-train", type=int, default=DEFAULT_COUNTS["train"],
                   help=f"labelled training cases (default {DEFAULT_COUNTS['train']})")
    p.add_argument("--num-test", type=int, default=DEFAULT_COUNTS["test"],
                   help=f"held-out test cases with labels (default {DEFAULT_COUNTS['test']})")
    p.add_argument("--num-unlabeled", type=int, default=DEFAULT_COUNTS["unlabeled"],
                   help=f"unlabeled pool cases (default {DEFAULT_COUNTS['unlabeled']})")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same data (default 0)")
    p.add_argument("--spacing", type=float, nargs="+", default=[2.0], metavar="MM",
                   help="output spacing in mm: one value (isotropic) or three (x y z). Default: 2")
    p.add_argument("--t2-fraction", type=float, default=0.0,
                   help="share of MR subjects given a T2-like contrast made from the tissue maps (default 0)")
    p.add_argument("--output", default=None,
                   help="folder that receives Dataset<ID>_<Name> (default: $nnUNet_raw)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset of the same id and name")
    p.add_argument("--ct-file", default=None, help="path of Cranium.inv3 (default: the Debian package's path)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes making subjects in parallel (the data do not depend on it). Default: 1")
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
        args.seed, args.spacing, task=args.task, t2_fraction=args.t2_fraction, overwrite=args.overwrite,
        ct_path=args.ct_file, verbose=not args.quiet, workers=args.workers,
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
