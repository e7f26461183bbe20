"""``alice_synth_data``: a small synthetic CT-like nnU-Net raw dataset (for tests and a quick first run).

Each case is a body ellipsoid (soft tissue) with two randomly placed, randomly sized organs (label 1, 2) and
noise, with slightly different voxel spacings, in nnU-Net's raw layout with ``imagesTs``/``labelsTs`` for
evaluation. Deterministic by seed. For real anatomy use ``alice_demo_data``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from typing import Optional, Sequence

import numpy as np

from nnunet_alice.errors import AliceError, cli_main


def _ellipsoid(shape, center, radii) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, center, radii)) <= 1.0


def synthetic_case(rng: np.random.Generator, shape: Sequence[int]):
    """One (image int16 HU, label uint8, spacing xyz) triple."""
    shape = tuple(int(s + rng.integers(-4, 5)) if i else int(s) for i, s in enumerate(shape))
    img = np.full(shape, -1000.0, np.float32)
    lab = np.zeros(shape, np.uint8)
    center = np.array(shape) / 2
    body = _ellipsoid(shape, center, np.array(shape) * rng.uniform(0.38, 0.46, 3))
    img[body] = rng.normal(0, 20, int(body.sum()))
    for label, (hu, rel) in enumerate([(60.0, 0.17), (250.0, 0.11)], start=1):
        c = center + rng.uniform(-0.12, 0.12, 3) * np.array(shape)
        c[2] += (-1) ** label * 0.18 * shape[2]
        organ = _ellipsoid(shape, c, np.array(shape) * rel * rng.uniform(0.8, 1.2, 3)) & body
        img[organ] = hu + rng.normal(0, 15, int(organ.sum()))
        lab[organ] = label
    img += rng.normal(0, 10, shape)
    spacing = (float(rng.uniform(0.9, 1.1)), float(rng.uniform(0.9, 1.1)), 2.0)
    return img.astype(np.int16), lab, spacing


def make_synthetic_dataset(raw_root: str, dataset_id: int = 991, name: str = "AliceSynth", num_train: int = 6,
                           num_test: int = 2, num_unlabeled: int = 0, seed: int = 0,
                           shape: Sequence[int] = (40, 48, 48), overwrite: bool = False) -> str:
    """Write ``Dataset{id}_{name}`` under ``raw_root`` atomically and return its path."""
    import SimpleITK as sitk

    target = os.path.join(raw_root, f"Dataset{dataset_id:03d}_{name}")
    if os.path.exists(target):
        if not overwrite:
            raise AliceError(f"{target}: already exists (use --overwrite)")
        shutil.rmtree(target)
    os.makedirs(raw_root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=raw_root, prefix=".tmp_synth_")
    rng = np.random.default_rng(seed)
    try:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs", "imagesUnlabeled"):
            os.makedirs(os.path.join(tmp, sub))
        splits = [("Tr", num_train, "labelsTr"), ("Ts", num_test, "labelsTs"), ("Unlabeled", num_unlabeled, None)]
        k = 0
        for split, n, label_dir in splits:
            for _ in range(n):
                img, lab, spacing = synthetic_case(rng, shape)
                case = f"synth_{k:03d}"
                k += 1
                im = sitk.GetImageFromArray(img)
                im.SetSpacing(spacing)
                sitk.WriteImage(im, os.path.join(tmp, f"images{split}", f"{case}_0000.nii.gz"))
                if label_dir:
                    lb = sitk.GetImageFromArray(lab)
                    lb.CopyInformation(im)
                    sitk.WriteImage(lb, os.path.join(tmp, label_dir, f"{case}.nii.gz"))
        with open(os.path.join(tmp, "dataset.json"), "w") as f:
            json.dump({"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ1": 1, "organ2": 2},
                       "numTraining": num_train, "file_ending": ".nii.gz",
                       "alice_synthetic": {"seed": seed, "unlabeled_folder": "imagesUnlabeled"}}, f, indent=2)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


@cli_main
def main(argv: Optional[list] = None) -> None:
    p = argparse.ArgumentParser(prog="alice_synth_data", description=__doc__)
    p.add_argument("-d", "--dataset-id", type=int, default=991)
    p.add_argument("--name", default="AliceSynth")
    p.add_argument("--num-train", type=int, default=6)
    p.add_argument("--num-test", type=int, default=2)
    p.add_argument("--num-unlabeled", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=int, nargs=3, default=[40, 48, 48])
    p.add_argument("--output", help="raw root (default $nnUNet_raw)")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    root = a.output or os.environ.get("nnUNet_raw")
    if not root:
        raise AliceError("give --output or set nnUNet_raw")
    path = make_synthetic_dataset(root, a.dataset_id, a.name, a.num_train, a.num_test, a.num_unlabeled, a.seed,
                                  a.shape, a.overwrite)
    print(path)


if __name__ == "__main__":
    main()
