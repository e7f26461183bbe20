"""Cases for pretraining: nnU-Net's preprocessed images (never the labels) plus an optional unlabeled pool.

Reuses nnU-Net's own machinery: dataset-name resolution, ``PlansManager``/``ConfigurationManager``, the
preprocessed blosc2 dataset class (subclassed so that only the image file is opened), and the planned
preprocessor for ``--unlabeled`` images, which are written to a separate folder
``$nnUNet_preprocessed/<Dataset>/alice_unlabeled/<data_identifier>/`` and never touch nnU-Net's data.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence

import numpy as np

from nnunet_alice.errors import AliceError, os_error_message
from nnunet_alice.pretrain.matching.base import CaseVolume
from nnunet_alice.pretrain.matching.fingerprint import read_json_or_none, write_json_atomic

UNLABELED_SUBDIR = "alice_unlabeled"
_CACHE_HINT = ("; make nnUNet_preprocessed writable, or copy the dataset's preprocessed folder to a writable place "
               "and point nnUNet_preprocessed there")


def _nnunet_path(var: str) -> str:
    value = os.environ.get(var)
    if not value:
        raise AliceError(f"environment variable {var} is not set (nnU-Net needs nnUNet_raw, "
                         f"nnUNet_preprocessed and nnUNet_results)")
    return value


def resolve_dataset_name(dataset: str | int) -> str:
    """``501`` or ``Dataset501_X`` → ``Dataset501_X``, using nnU-Net's own conversion."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    _nnunet_path("nnUNet_preprocessed")
    try:
        return maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError) as e:
        raise AliceError(f"unknown dataset {dataset!r}: not found in nnUNet_raw / nnUNet_preprocessed / "
                         f"nnUNet_results ({str(e).splitlines()[0][:120]})") from None


def load_plans(dataset_name: str, plans: str, configuration: str):
    """Return ``(plans_file, PlansManager, ConfigurationManager, dataset_json)`` or raise a one-line error."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    root = os.path.join(_nnunet_path("nnUNet_preprocessed"), dataset_name)
    plans_file = os.path.join(root, plans + ".json")
    if not os.path.isfile(plans_file):
        raise AliceError(f"{plans_file}: plans not found; run nnUNetv2_plan_and_preprocess -d {dataset_name} "
                         f"(or pass the right -p)")
    dataset_json_file = os.path.join(root, "dataset.json")
    if not os.path.isfile(dataset_json_file):
        raise AliceError(f"{dataset_json_file}: missing; run nnUNetv2_plan_and_preprocess -d {dataset_name}")
    try:
        with open(plans_file) as f:
            plans_dict = json.load(f)
        with open(dataset_json_file) as f:
            dataset_json = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise AliceError(f"{plans_file}: unreadable ({e})") from None
    pm = PlansManager(plans_dict)
    available = list(plans_dict.get("configurations", {}).keys())
    if configuration not in available:
        raise AliceError(f"{plans_file}: unknown configuration {configuration!r} (available: {', '.join(available)})")
    cm = pm.get_configuration(configuration)
    if len(cm.patch_size) != 3:
        raise AliceError(f"{plans_file}: configuration {configuration!r} is 2D; Alice pretrains 3D configurations")
    return plans_file, pm, cm, dataset_json


def _image_only_dataset_class():
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    class ImageOnlyBlosc2Dataset(nnUNetDatasetBlosc2):
        """nnU-Net's blosc2 dataset that opens the image and properties, never the segmentation."""

        def load_case(self, identifier):
            import blosc2
            data = blosc2.open(urlpath=os.path.join(self.source_folder, identifier + ".b2nd"), mode="r",
                               dparams={"nthreads": 1}, **self.mmap_kwargs)
            from batchgenerators.utilities.file_and_folder_operations import load_pickle
            properties = load_pickle(os.path.join(self.source_folder, identifier + ".pkl"))
            return data, None, None, properties

    return ImageOnlyBlosc2Dataset


@dataclass(frozen=True)
class CaseRef:
    case_id: str
    folder: str
    pool: str  # "nnunet" (the dataset's own preprocessed cases) or "unlabeled"

    @property
    def key(self) -> str:
        return self.case_id if self.pool == "nnunet" else f"{UNLABELED_SUBDIR}/{self.case_id}"


class PretrainData:
    """The cases a pretraining run draws from, and how to open one as a :class:`CaseVolume`."""

    def __init__(self, dataset_name: str, plans: str, configuration: str, unlabeled_dirs: Sequence[str] = ()):
        self.dataset_name = dataset_name
        self.plans_name = plans
        self.configuration = configuration
        self.plans_file, self.plans_manager, self.configuration_manager, self.dataset_json = load_plans(
            dataset_name, plans, configuration)
        self.preprocessed_root = os.path.join(_nnunet_path("nnUNet_preprocessed"), dataset_name)
        self.spacing = tuple(float(s) for s in self.configuration_manager.spacing)
        self.num_input_channels = len(self.dataset_json.get("channel_names", self.dataset_json.get("modality", {})))
        self.cases: List[CaseRef] = []

        folder = os.path.join(self.preprocessed_root, self.configuration_manager.data_identifier)
        if not os.path.isdir(folder):
            raise AliceError(f"{folder}: preprocessed data missing; run nnUNetv2_preprocess -d {dataset_name} "
                             f"-c {configuration} -plans_name {plans}")
        ids = sorted(i[:-5] for i in os.listdir(folder) if i.endswith(".b2nd") and not i.endswith("_seg.b2nd"))
        if not ids and any(i.endswith(".npz") for i in os.listdir(folder)):
            raise AliceError(f"{folder}: holds legacy .npz data; re-run preprocessing with nnunetv2>=2.6")
        self.cases += [CaseRef(i, folder, "nnunet") for i in ids]
        for d in unlabeled_dirs:
            self.cases += self._prepare_unlabeled(d)
        if not self.cases:
            raise AliceError(f"{folder}: no preprocessed images found; run nnUNetv2_plan_and_preprocess "
                             f"-d {dataset_name} -c {configuration}")
        self._datasets: Dict[str, object] = {}

    # ------------------------------------------------------------------ loading
    def load(self, ref: CaseRef) -> CaseVolume:
        ds = self._datasets.get(ref.folder)
        if ds is None:
            ds = self._datasets[ref.folder] = _image_only_dataset_class()(ref.folder, [c.case_id for c in self.cases
                                                                                      if c.folder == ref.folder])
        data, _, _, _ = ds.load_case(ref.case_id)  # type: ignore[attr-defined]
        return CaseVolume(case_id=ref.key, image=data, spacing=self.spacing)

    def case_keys(self) -> List[str]:
        return [c.key for c in self.cases]

    # ------------------------------------------------------------------ unlabeled pool
    def _prepare_unlabeled(self, raw_dir: str) -> List[CaseRef]:
        """Preprocess raw images (nnU-Net naming) with the plan's preprocessor into our own folder (cached)."""
        file_ending = self.dataset_json["file_ending"]
        if not os.path.isdir(raw_dir):
            if not os.path.lexists(raw_dir):
                raise AliceError(f"{raw_dir}: --unlabeled folder does not exist")
            try:
                os.stat(raw_dir)
            except OSError as e:  # a symlink loop, a dangling link
                raise AliceError(os_error_message(e, raw_dir, "opening the --unlabeled folder")) from None
            raise AliceError(f"{raw_dir}: --unlabeled must be a folder, this is a file")
        pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(file_ending) + "$")
        groups: Dict[str, Dict[int, str]] = {}
        try:
            names = sorted(os.listdir(raw_dir))
        except OSError as e:
            raise AliceError(os_error_message(e, raw_dir, "listing the --unlabeled folder")) from None
        for name in names:
            if name.startswith("."):
                continue
            m = pattern.match(name)
            if m is None:
                raise AliceError(f"{os.path.join(raw_dir, name)}: does not follow nnU-Net naming "
                                 f"<case>_<XXXX>{file_ending}")
            groups.setdefault(m.group(1), {})[int(m.group(2))] = os.path.join(raw_dir, name)
        if not groups:
            raise AliceError(f"{raw_dir}: --unlabeled folder holds no images")
        out_dir = os.path.join(self.preprocessed_root, UNLABELED_SUBDIR, self.configuration_manager.data_identifier)
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            raise AliceError(os_error_message(e, out_dir, "creating the cache of preprocessed --unlabeled images")
                             + _CACHE_HINT) from None
        refs = []
        for case_id, channels in groups.items():
            if sorted(channels) != list(range(self.num_input_channels)):
                raise AliceError(f"{raw_dir}: case {case_id} has channels {sorted(channels)}, the dataset expects "
                                 f"{list(range(self.num_input_channels))}")
            files = [channels[c] for c in range(self.num_input_channels)]
            stamp = [_source_stamp(f) for f in files]
            stamp_file = os.path.join(out_dir, case_id + ".source.json")
            done = os.path.isfile(os.path.join(out_dir, case_id + ".b2nd"))
            if not done or read_json_or_none(stamp_file) != stamp:   # missing, stale or corrupt stamp: redo
                try:
                    self._preprocess_one(files, out_dir, case_id)
                    write_json_atomic(stamp_file, stamp)
                except OSError as e:
                    raise AliceError(os_error_message(e, e.filename or out_dir, f"writing preprocessed case {case_id}")
                                     + _CACHE_HINT) from None
            refs.append(CaseRef(case_id, out_dir, "unlabeled"))
        return refs

    def _preprocess_one(self, files: List[str], out_dir: str, case_id: str) -> None:
        import blosc2
        from batchgenerators.utilities.file_and_folder_operations import write_pickle
        from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params
        from nnunet_alice.pretrain.data.validation import check_image_array, check_raw_image

        cm = self.configuration_manager
        preprocessor = cm.preprocessor_class(verbose=False)
        for f in files:
            check_not_truncated(f)
        try:  # what DefaultPreprocessor.run_case does, split so that the raw image can be checked first
            raw, properties = self.plans_manager.image_reader_writer_class().read_images(files)
        except Exception as e:  # reader errors differ per format; name the file and the most telling line
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            cause = next((ln for ln in lines if "ERROR" in ln), lines[0] if lines else "not an image")
            empty = any(os.path.getsize(f) == 0 for f in files if os.path.isfile(f))
            raise AliceError(f"{files[0]}: cannot be read ({'empty file; ' if empty else ''}{type(e).__name__}: "
                             f"{cause[:160]})") from None
        check_raw_image(np.asarray(raw), properties.get("spacing"), files[0], self.num_input_channels, len(files))
        try:
            data, _, properties = preprocessor.run_case_npy(raw, None, properties, self.plans_manager, cm,
                                                            self.dataset_json)
        except Exception as e:
            raise AliceError(f"{files[0]}: cannot be preprocessed ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
        data = np.ascontiguousarray(data, dtype=np.float32)
        check_image_array(data, files[0], expected_channels=self.num_input_channels)
        blocks, chunks = comp_blosc2_params(data.shape, tuple(cm.patch_size), data.itemsize)
        tmp = tempfile.mkdtemp(dir=out_dir, prefix=".tmp_")
        try:
            blosc2.asarray(data, urlpath=os.path.join(tmp, case_id + ".b2nd"), chunks=chunks, blocks=blocks,
                           cparams={"codec": blosc2.Codec.LZ4HC, "clevel": 5, "nthreads": 1})
            write_pickle(properties, os.path.join(tmp, case_id + ".pkl"))
            for ext in (".pkl", ".b2nd"):
                os.replace(os.path.join(tmp, case_id + ext), os.path.join(out_dir, case_id + ext))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _source_stamp(path: str) -> list:
    """``[absolute path, size, mtime]`` of a raw image (the cache key); a file that cannot be opened is one line."""
    try:
        st = os.stat(path)
    except OSError as e:  # a symlink loop, a dangling link, no permission
        raise AliceError(os_error_message(e, path, "opening the image")) from None
    if not os.path.isfile(path):
        raise AliceError(f"{path}: is not a file")
    return [os.path.abspath(path), st.st_size, int(st.st_mtime)]


def _bytes_available(path: str, needed: int) -> int:
    """Bytes the file yields, counted up to ``needed``: its size, or for gzip what decompresses (in 1 MiB chunks,
    so a truncated file costs the time to read it, never the memory its header asks for)."""
    if not path.lower().endswith(".gz"):
        return os.path.getsize(path)
    total = 0
    decomp = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
    with open(path, "rb") as f:
        while total < needed:
            chunk = decomp.unconsumed_tail or f.read(1 << 20)
            if not chunk:
                break
            try:
                total += len(decomp.decompress(chunk, 1 << 24))
            except zlib.error:
                break  # corrupt data: what decompressed so far is what the file holds
            if decomp.eof:  # a concatenated gzip member may follow
                rest = decomp.unused_data
                decomp = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
                if rest:
                    total += len(decomp.decompress(rest, 1 << 24))
    return total


def check_not_truncated(path: str) -> None:
    """Refuse a NIfTI image whose header declares more voxel data than the file holds, reading only the header and
    counting (not keeping) the bytes, before the image reader allocates the declared size."""
    if not path.lower().endswith((".nii", ".nii.gz")):
        return
    try:
        import nibabel

        header: Any = nibabel.load(path).header  # the header only; voxels are read lazily
        shape = tuple(int(n) for n in header.get_data_shape())
        dtype = np.dtype(header.get_data_dtype())
        offset = int(header.get_data_offset())
    except Exception:  # not a readable NIfTI header: the image reader gives the message
        return
    declared = math.prod(shape) * dtype.itemsize
    have = _bytes_available(path, offset + declared)
    if have < offset + declared:
        raise AliceError(f"{path}: truncated: the header declares {'x'.join(map(str, shape))} voxels of {dtype} "
                         f"({declared / 1e6:.1f} MB) but the file holds {max(0, have - offset) / 1e6:.1f} MB of voxel "
                         f"data")
