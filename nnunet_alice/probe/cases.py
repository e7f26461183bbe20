"""Cases of a linear probe: K labelled training cases and the test cases, in nnU-Net's preprocessed space.

* Training cases are nnU-Net's preprocessed cases (image + segmentation), read with nnU-Net's dataset class
  (``infer_dataset_class``). The K cases are the first K of a seeded permutation, the same subset
  ``alice_benchmark`` fine-tunes on for that seed (``nnunet_alice.harness.config.labelled_subset``).
* Test cases are ``imagesTs``/``labelsTs`` of the raw dataset, preprocessed in memory with the plan's own
  preprocessor (``DefaultPreprocessor.run_case``), so they are evaluated at the plan's spacing. Without them the
  last ``max(1, n // 5)`` labelled cases (sorted ids, as ``alice_benchmark --holdout``) are set aside and the K
  training cases are drawn from the others; the test set then does not depend on K or the seed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from nnunet_alice.errors import AliceError

#: preprocessed test cases, keyed by (files, sizes, mtimes, plans file, configuration): repeated probes in one
#: process (a benchmark running many checkpoints) preprocess each test case once
_TEST_CACHE: Dict[tuple, Tuple[np.ndarray, np.ndarray]] = {}


@dataclass
class TestCase:
    case_id: str
    image_files: List[str] = field(default_factory=list)   # raw files (imagesTs); empty for held-out cases
    label_file: Optional[str] = None


def clean_seg(seg) -> np.ndarray:
    """Label map (X, Y, Z) as int16; nnU-Net's -1 (outside the crop's nonzero region) is background."""
    seg = np.asarray(seg)
    seg = seg[0] if seg.ndim == 4 else seg
    seg = seg.astype(np.int16, copy=True)
    seg[seg < 0] = 0
    return seg


def raw_test_cases(raw_dataset: Optional[str], file_ending: str, num_channels: int) -> List[TestCase]:
    """Cases with a label in ``labelsTs`` and all channels in ``imagesTs``; empty if either folder is missing."""
    if not raw_dataset:
        return []
    images, labels = os.path.join(raw_dataset, "imagesTs"), os.path.join(raw_dataset, "labelsTs")
    if not (os.path.isdir(images) and os.path.isdir(labels)):
        return []
    names = set(os.listdir(images))
    out = []
    for name in sorted(os.listdir(labels)):
        if name.startswith(".") or not name.endswith(file_ending):
            continue
        case = name[: -len(file_ending)]
        files = [f"{case}_{c:04d}{file_ending}" for c in range(num_channels)]
        if all(f in names for f in files):
            out.append(TestCase(case, [os.path.join(images, f) for f in files], os.path.join(labels, name)))
    return out


class ProbeData:
    """Labels, training pool and test cases of one dataset/plans/configuration; every problem is one line."""

    def __init__(self, dataset_name: str, plans: str, configuration: str):
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
        from nnunet_alice.doctor import num_channels
        from nnunet_alice.pretrain.data.cases import load_plans

        self.dataset_name, self.plans_name, self.configuration = dataset_name, plans, configuration
        self.plans_file, self.plans_manager, self.configuration_manager, self.dataset_json = load_plans(
            dataset_name, plans, configuration)
        self.num_channels = num_channels(self.dataset_json)
        self.label_manager = self.plans_manager.get_label_manager(self.dataset_json)
        self.labels = [int(v) for v in self.label_manager.all_labels]        # class index i <-> label value
        self.ignore_label = self.label_manager.ignore_label
        names = {}
        for name, value in self.dataset_json.get("labels", {}).items():
            if isinstance(value, int) and name != "ignore":
                names.setdefault(int(value), str(name))
        self.label_names = [names.get(v, str(v)) for v in self.labels]
        dataset_json_file = os.path.join(os.path.dirname(self.plans_file), "dataset.json")
        if self.label_manager.has_regions:
            raise AliceError(f"{dataset_json_file}: region-based labels are not supported by the probe")
        if not [v for v in self.labels if v != 0]:
            raise AliceError(f"{dataset_json_file}: the dataset has no labels (no foreground class in 'labels'); "
                             f"the probe needs labelled cases")

        self.folder = os.path.join(os.path.dirname(self.plans_file), self.configuration_manager.data_identifier)
        if not os.path.isdir(self.folder):
            raise AliceError(f"{self.folder}: preprocessed data missing; run nnUNetv2_preprocess -d {dataset_name} "
                             f"-c {configuration} -plans_name {plans}")
        files = os.listdir(self.folder)
        labelled = sorted(f[: -len("_seg.b2nd")] for f in files if f.endswith("_seg.b2nd"))
        labelled = [c for c in labelled if c + ".b2nd" in files]
        if not labelled:
            raise AliceError(f"{self.folder}: the dataset has no labels (no preprocessed segmentations *_seg.b2nd); "
                             f"the probe needs labelled cases")
        self.labelled = labelled
        self._dataset = infer_dataset_class(self.folder)(self.folder, labelled)

        raw_root = os.environ.get("nnUNet_raw")
        raw_dataset = os.path.join(raw_root, dataset_name) if raw_root else None
        tests = raw_test_cases(raw_dataset, self.dataset_json.get("file_ending", ".nii.gz"), self.num_channels)
        if tests:
            self.test_source = "imagesTs/labelsTs"
            self.pool, self.tests = list(labelled), tests
        else:
            if len(labelled) < 2:
                where = raw_dataset or "$nnUNet_raw (not set)"
                raise AliceError(f"{where}: no test cases (imagesTs/labelsTs) and no room to hold any out "
                                 f"({len(labelled)} labelled case); add labelled test cases or more training cases")
            n_hold = max(1, len(labelled) // 5)
            self.test_source = "held-out training cases"
            self.pool = labelled[:-n_hold]
            self.tests = [TestCase(c) for c in labelled[-n_hold:]]

    # ------------------------------------------------------------------ selection
    def resolve_k(self, labels) -> int:
        """``labels`` (an int or ``"all"``) as a count, checked against the training pool."""
        if str(labels).strip().lower() == "all":
            return len(self.pool)
        try:
            k = int(labels)
        except (TypeError, ValueError):
            raise AliceError(f"--labels: expected a number of labelled cases or 'all', got {labels!r}") from None
        if k < 1:
            raise AliceError(f"--labels: must be >= 1, got {k}")
        if k > len(self.pool):
            held = (f", {len(self.labelled) - len(self.pool)} more are held out for testing because the dataset "
                    f"has no imagesTs/labelsTs" if len(self.pool) < len(self.labelled) else "")
            raise AliceError(f"{self.folder}: --labels {k} is larger than the number of labelled training cases "
                             f"available ({len(self.pool)}{held})")
        return k

    def training_cases(self, k: int, seed: int) -> List[str]:
        from nnunet_alice.harness.config import labelled_subset

        return labelled_subset(self.pool, k, seed)

    # ------------------------------------------------------------------ loading
    def load_training(self, case_id: str) -> Tuple[np.ndarray, np.ndarray]:
        """(image (C, X, Y, Z) float32, labels (X, Y, Z) int16) of a preprocessed labelled case."""
        data, seg, _, _ = self._dataset.load_case(case_id)
        return np.asarray(data[:], dtype=np.float32), clean_seg(seg[:])

    def load_test(self, case: TestCase) -> Tuple[np.ndarray, np.ndarray]:
        if not case.image_files:
            return self.load_training(case.case_id)
        files = case.image_files + [case.label_file]
        key = (tuple(files), tuple((os.path.getsize(f), os.path.getmtime(f)) for f in files),
               os.path.abspath(self.plans_file), os.path.getmtime(self.plans_file), self.configuration)
        if key not in _TEST_CACHE:
            preprocessor = self.configuration_manager.preprocessor_class(verbose=False)
            try:
                data, seg, _ = preprocessor.run_case(case.image_files, case.label_file, self.plans_manager,
                                                     self.configuration_manager, self.dataset_json)
            except Exception as e:  # reader errors differ per format: name the case and the first line
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise AliceError(f"{case.image_files[0]}: test case cannot be preprocessed "
                                 f"({type(e).__name__}: {first[:160]})") from None
            _TEST_CACHE[key] = (np.asarray(data, dtype=np.float32), clean_seg(seg))
        return _TEST_CACHE[key]

    # ------------------------------------------------------------------ voxels
    def class_index(self, seg: np.ndarray) -> np.ndarray:
        """Label values -> class indices (0..n-1); ignore-label voxels (and unknown values) become -1."""
        lut = np.full(int(max(int(seg.max()), max(self.labels))) + 1, -1, dtype=np.int64)
        for i, v in enumerate(self.labels):
            lut[v] = i
        return lut[seg]


def sample_voxels(classes: np.ndarray, per_class: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Up to ``per_class`` voxels of every class present in ``classes`` (class-index map, -1 = ignored).

    Returns (coords (n, 3), class indices (n,)), drawn without replacement, in a seed-determined order.
    """
    flat = classes.reshape(-1)
    coords, ys = [], []
    for c in np.unique(flat[flat >= 0]):
        idx = np.flatnonzero(flat == c)
        if len(idx) > per_class:
            idx = np.sort(rng.choice(idx, size=per_class, replace=False))
        coords.append(np.stack(np.unravel_index(idx, classes.shape), axis=1))
        ys.append(np.full(len(idx), int(c), dtype=np.int64))
    if not coords:
        return np.zeros((0, 3), dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(coords), np.concatenate(ys)
