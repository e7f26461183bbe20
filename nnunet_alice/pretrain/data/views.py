"""``ViewSampler``: turns cases into batches of query/key views in the data-loading workers.

Per sample (Alice Sec. 3.1, Fig. 2): a query point in volume A and, through the matcher, the anatomically
corresponding point in a *different* volume B (or in A for ``intra``); crops around both points; for each
crop one student view (augmented, then block-masked), its reconstruction target (the same spatial transform,
no intensity transform) and one teacher view (augmented independently, unmasked). The MAE objective only needs
the student query view, its target and its mask.

Augmentation is nnU-Net's own batchgeneratorsv2 training pipeline (``nnUNetTrainer.get_training_transforms``)
without mirroring (flips would break the anatomical correspondence between Q and K).

Batches are a pure function of ``(seed, rank, batch index)``: every batch seeds its own RNGs, so any number
of workers (batchgenerators' ordered ``MultiThreadedAugmenter``) yields the same stream, and a resumed run
continues it exactly.
"""
from __future__ import annotations

import os
import random
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from nnunet_alice.pretrain.data.masking import batch_block_masks
from nnunet_alice.pretrain.data.workers import DEFAULT_DATA_TIMEOUT, WatchedLoader, init_worker


def _augmentation_settings(patch_size: Sequence[int]):
    """nnU-Net's 3D rotation range, dummy-2D decision and enlarged initial patch for the given patch size."""
    from nnunetv2.configuration import ANISO_THRESHOLD
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size

    do_dummy_2d = (max(patch_size) / patch_size[0]) > ANISO_THRESHOLD
    angle = np.pi if do_dummy_2d else 30.0 / 360 * 2.0 * np.pi
    rotation = (-angle, angle)
    initial = get_patch_size(patch_size, rotation, rotation, rotation, (0.85, 1.25))
    if do_dummy_2d:
        initial[0] = patch_size[0]
    return rotation, do_dummy_2d, [int(i) for i in initial]


def build_view_transforms(patch_size: Sequence[int], augment: bool):
    """Return ``(transforms or None, crop size)``: the crop size is what the transforms turn into ``patch_size``."""
    if not augment:
        return None, list(patch_size)
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    rotation, do_dummy_2d, initial = _augmentation_settings(patch_size)
    transforms = nnUNetTrainer.get_training_transforms(
        list(patch_size), rotation, None, (), do_dummy_2d, use_mask_for_norm=None, is_cascaded=False,
        foreground_labels=[1], regions=None, ignore_label=None)
    return transforms, initial


def split_spatial_intensity(transforms):
    """Split nnU-Net's training pipeline into ``(spatial, intensity)`` composes (either may be ``None``).

    The spatial part is everything up to the ``SpatialTransform`` (and the 2D/3D conversions around it); the
    rest (noise, blur, brightness, contrast, low resolution, gamma, label clean-up) is the intensity part.
    Applying both in order is the full pipeline.
    """
    if transforms is None:
        return None, None
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform

    items = list(transforms.transforms)
    cut = max([i + 1 for i, t in enumerate(items) if isinstance(t, (SpatialTransform, Convert2DTo3DTransform))],
              default=0)
    if cut == 0:
        raise ValueError("the augmentation pipeline holds no SpatialTransform")
    return ComposeTransforms(items[:cut]), (ComposeTransforms(items[cut:]) if cut < len(items) else None)


def crop_around(image, center: np.ndarray, size: Sequence[int]) -> torch.Tensor:
    """Crop ``size`` voxels centred on ``center`` from a (C, X, Y, Z) array, zero-padded outside the volume."""
    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd

    lbs = [int(round(c - s / 2)) for c, s in zip(center, size)]
    bbox = [[lb, lb + int(s)] for lb, s in zip(lbs, size)]
    return torch.from_numpy(np.ascontiguousarray(crop_and_pad_nd(image, bbox, 0), dtype=np.float32))


class ViewSampler:
    """A batchgenerators-style loader (``__next__`` → batch dict) that draws views for one objective."""

    def __init__(self, data, config, patch_size: Sequence[int], batch_size: int, matcher=None,
                 rank: int = 0, start_batch: int = 0):
        self._data = data
        self.cases = list(data.cases)
        self.config = config
        self.objective = config.objective
        self.patch_size = [int(p) for p in patch_size]
        self.batch_size = int(batch_size)
        self.matcher = matcher
        self.rank = int(rank)
        self.thread_id = 0
        self.number_of_threads_in_multithreaded = 1
        self.next_batch = int(start_batch)
        self.transforms, self.crop_size = build_view_transforms(self.patch_size, config.augment)
        self._split = split_spatial_intensity(self.transforms)  # (spatial, intensity) parts for student views
        self._open: Dict[str, object] = {}
        self.parent_pid: Optional[int] = None  # set by make_loader before workers are forked

    # batchgenerators protocol -------------------------------------------------------------
    def set_thread_id(self, thread_id: int) -> None:
        """Called by batchgenerators first thing in each worker process (also the place to make it fork-safe)."""
        if self.parent_pid is not None and os.getpid() != self.parent_pid:
            init_worker(self.parent_pid)
        self.thread_id = thread_id

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        workers = max(1, self.number_of_threads_in_multithreaded or 1)
        index = self.next_batch + self.thread_id
        self.next_batch += workers
        return self.make_batch(index)

    # batches --------------------------------------------------------------------------------
    def _case(self, ref):
        vol = self._open.get(ref.key)
        if vol is None:
            vol = self._open[ref.key] = self._data.load(ref)
        return vol

    def make_batch(self, index: int) -> dict:
        """The batch number ``index`` of this rank's stream (deterministic)."""
        from threadpoolctl import threadpool_limits

        # one OpenMP/BLAS thread for sampling, as nnU-Net's own loader does (the fork-safety of the workers
        # themselves is workers.init_worker's job: threadpoolctl cannot stop torch from entering OpenMP)
        with threadpool_limits(limits=1, user_api=None):
            return self._make_batch(index)

    def _make_batch(self, index: int) -> dict:
        seed = np.random.SeedSequence([self.config.seed, self.rank, index])
        rng = np.random.default_rng(seed)
        np_state, py_state = np.random.get_state(), random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(2 ** 62)))
            np.random.seed(int(rng.integers(2 ** 31)))
            random.seed(int(rng.integers(2 ** 31)))
            try:
                samples = [self._sample(rng) for _ in range(self.batch_size)]
            finally:
                np.random.set_state(np_state)
                random.setstate(py_state)
        batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if isinstance(samples[0][k], torch.Tensor)}
        for k in ("case_q", "case_k"):
            if k in samples[0]:
                batch[k] = [s[k] for s in samples]
        batch["mask_q"] = torch.from_numpy(batch_block_masks(self.batch_size, self.patch_size,
                                                             self.config.mask_block_size, self.config.mask_ratio, rng))
        if self.objective == "alice":
            batch["mask_k"] = torch.from_numpy(batch_block_masks(self.batch_size, self.patch_size,
                                                                 self.config.mask_block_size, self.config.mask_ratio,
                                                                 rng))
        batch["batch_index"] = index
        return batch

    def _augment(self, crop: torch.Tensor) -> torch.Tensor:
        """A fully augmented view (spatial and intensity transforms): the teacher's."""
        if self.transforms is None:
            return crop
        return self.transforms(image=crop.clone())["image"]

    def _augment_student(self, crop: torch.Tensor):
        """``(student view, reconstruction target)``: one spatial transform for both, intensity only for the
        student, so the target is what the student sees before noise, blur, gamma and contrast changes."""
        spatial, intensity = self._split
        if spatial is None:
            return crop, crop
        target = spatial(image=crop.clone())["image"]
        student = target if intensity is None else intensity(image=target.clone())["image"]
        return student, target

    def _sample(self, rng: np.random.Generator) -> dict:
        ref_a = self.cases[int(rng.integers(len(self.cases)))]
        case_a = self._case(ref_a)
        if self.objective == "mae":
            point = self._random_point(case_a, rng)
            crop = crop_around(case_a.image, point, self.crop_size)
            student, target = self._augment_student(crop)
            return {"student_q": student, "target_q": target, "case_q": case_a.case_id}

        case_b = case_a
        if self.matcher.inter_volume and len(self.cases) > 1:
            j = int(rng.integers(len(self.cases) - 1))
            j = j + 1 if j >= self.cases.index(ref_a) else j
            case_b = self._case(self.cases[j])
        point_a, point_b, score, fell_back = self._match(case_a, case_b, rng)
        if fell_back:
            case_b = case_a
        crop_q = crop_around(case_a.image, point_a, self.crop_size)
        crop_k = crop_around(case_b.image, point_b, self.crop_size)
        student_q, target_q = self._augment_student(crop_q)
        teacher_q = self._augment(crop_q)
        student_k, target_k = self._augment_student(crop_k)
        teacher_k = self._augment(crop_k)
        return {
            "student_q": student_q, "target_q": target_q, "teacher_q": teacher_q,
            "student_k": student_k, "target_k": target_k, "teacher_k": teacher_k,
            "score": torch.tensor(float(score)), "fallback": torch.tensor(float(fell_back)),
            "case_q": case_a.case_id, "case_k": case_b.case_id,
        }

    def _random_point(self, case, rng: np.random.Generator) -> np.ndarray:
        """Uniform crop centre such that the crop lies inside the volume where the volume is large enough."""
        shape = np.asarray(case.shape, dtype=float)
        half = np.asarray(self.patch_size, dtype=float) / 2
        lo = np.minimum(half, shape / 2)
        hi = np.maximum(shape - half, shape / 2)
        return rng.uniform(lo, hi)

    def _match(self, case_a, case_b, rng):
        from nnunet_alice.pretrain.matching.sampling import match_with_retries

        return match_with_retries(self.matcher, case_a, case_b, rng, threshold=self.config.match_threshold,
                                  tries=self.config.match_tries, margin=np.asarray(self.patch_size) // 4)


def make_loader(sampler: ViewSampler, num_workers: int, seed: int, timeout: float = DEFAULT_DATA_TIMEOUT):
    """The batch stream: ``sampler`` in ``num_workers`` forked processes (batchgenerators' ordered
    ``MultiThreadedAugmenter``) or in this process (``num_workers <= 0``), behind a :class:`WatchedLoader` that
    stops with a one-line error when no batch arrives within ``timeout`` seconds. Call ``close()`` when done."""
    if num_workers <= 0:
        return WatchedLoader(sampler, timeout, "the view sampler (--num-workers 0, in this process)")
    from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter

    sampler.number_of_threads_in_multithreaded = num_workers
    sampler.parent_pid = os.getpid()
    augmenter = MultiThreadedAugmenter(sampler, None, num_workers, num_cached_per_queue=2,
                                       seeds=[seed + i for i in range(num_workers)],
                                       pin_memory=torch.cuda.is_available())
    return WatchedLoader(augmenter, timeout, f"the {num_workers} data worker process(es) (--num-workers)")
