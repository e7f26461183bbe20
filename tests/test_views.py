"""Pretraining data and views on a real tiny preprocessed nnU-Net dataset (session fixture ``synth_dataset``):
``PretrainData`` (images only, cached unlabeled pool, naming errors) and ``ViewSampler`` / ``make_loader``
(shapes, masks, a deterministic stream independent of the number of workers)."""
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

from nnunet_alice.errors import AliceError
from nnunet_alice.pretrain.config import PretrainConfig
from nnunet_alice.pretrain.data.cases import UNLABELED_SUBDIR, PretrainData
from nnunet_alice.pretrain.data.views import ViewSampler, make_loader

PLANS, CONFIG = "nnUNetPlans", "3d_fullres"


@pytest.fixture
def pre_copy(synth_dataset, tmp_path, monkeypatch):
    """A private copy of nnUNet_preprocessed (tests may delete or add files) set in the environment."""
    pre = tmp_path / "preprocessed"
    shutil.copytree(synth_dataset.preprocessed_dataset, pre / synth_dataset.dataset_name)
    for var, value in synth_dataset.env(n_proc_da=0).items():
        if var.startswith("nnUNet_"):
            monkeypatch.setenv(var, value)
    monkeypatch.setenv("nnUNet_preprocessed", str(pre))
    return pre / synth_dataset.dataset_name


def _data(synth_dataset, unlabeled=()):
    return PretrainData(synth_dataset.dataset_name, PLANS, CONFIG, [str(u) for u in unlabeled])


def _listing(folder):
    return {os.path.join(r, f): os.path.getmtime(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs}


# ------------------------------------------------------------------------------ PretrainData
def test_finds_the_preprocessed_cases(synth_dataset, pre_copy):
    data = _data(synth_dataset)
    assert data.case_keys() == [f"synth_{i:03d}" for i in range(4)]
    assert data.num_input_channels == 1
    assert len(data.spacing) == 3 and data.spacing[0] == pytest.approx(2.0)
    vol = data.load(data.cases[0])
    assert vol.case_id == "synth_000"
    assert vol.image.shape[0] == 1 and len(vol.image.shape) == 4
    assert np.isfinite(np.asarray(vol.image[:])).all()


def test_never_opens_segmentations(synth_dataset, pre_copy, monkeypatch):
    import blosc2

    folder = pre_copy / "nnUNetPlans_3d_fullres"
    for f in folder.glob("*_seg.b2nd"):
        f.rename(f.with_suffix(".moved"))  # any attempt to open a segmentation would now fail
    opened = []
    real_open = blosc2.open

    def recording_open(*args, **kwargs):
        opened.append(str(kwargs.get("urlpath", args[0] if args else "")))
        return real_open(*args, **kwargs)

    monkeypatch.setattr(blosc2, "open", recording_open)
    data = _data(synth_dataset)
    for ref in data.cases:
        vol = data.load(ref)
        assert float(np.asarray(vol.image[:]).std()) > 0
    sampler = ViewSampler(data, PretrainConfig(objective="mae", mask_block_size=8), [24, 32, 32], 2)
    sampler.make_batch(0)
    assert len(opened) >= 4
    assert not [p for p in opened if p.endswith("_seg.b2nd")]


def test_unlabeled_pool_is_preprocessed_into_its_own_folder_and_cached(synth_dataset, pre_copy, monkeypatch):
    raw_unlabeled = synth_dataset.raw_dataset / "imagesUnlabeled"
    nnunet_folder = pre_copy / "nnUNetPlans_3d_fullres"
    nnunet_before = _listing(nnunet_folder)

    data = _data(synth_dataset, [raw_unlabeled])
    names = sorted(f[: -len("_0000.nii.gz")] for f in os.listdir(raw_unlabeled))
    assert len(names) == 2
    assert data.case_keys() == [f"synth_{i:03d}" for i in range(4)] + [f"{UNLABELED_SUBDIR}/{n}" for n in names]
    out = pre_copy / UNLABELED_SUBDIR / "nnUNetPlans_3d_fullres"
    for n in names:
        for ext in (".b2nd", ".pkl", ".source.json"):
            assert (out / (n + ext)).is_file()
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]
    assert _listing(nnunet_folder) == nnunet_before  # nnU-Net's own data untouched
    vol = data.load(data.cases[-1])
    assert vol.case_id == f"{UNLABELED_SUBDIR}/{names[-1]}" and vol.image.shape[0] == 1

    cached = _listing(out)

    def must_not_run(*a, **k):
        raise AssertionError("the unlabeled pool was preprocessed again")

    monkeypatch.setattr(PretrainData, "_preprocess_one", must_not_run)
    again = _data(synth_dataset, [raw_unlabeled])
    assert again.case_keys() == data.case_keys()
    assert _listing(out) == cached


def test_changed_unlabeled_source_is_preprocessed_again(synth_dataset, pre_copy, tmp_path):
    src = tmp_path / "unl"
    shutil.copytree(synth_dataset.raw_dataset / "imagesUnlabeled", src)
    _data(synth_dataset, [src])
    first = sorted(src.iterdir())[0]
    st = first.stat()
    os.utime(first, (st.st_atime, st.st_mtime - 100))
    second = sorted(src.iterdir())[1].name[: -len("_0000.nii.gz")]
    out = pre_copy / UNLABELED_SUBDIR / "nnUNetPlans_3d_fullres"
    (out / (second + ".source.json")).write_text('[["half-wri')      # a stamp cut short: redo, never crash
    calls = []
    real = PretrainData._preprocess_one

    def counting(self, files, out_dir, case_id):
        calls.append(case_id)
        return real(self, files, out_dir, case_id)

    PretrainData._preprocess_one = counting
    try:
        _data(synth_dataset, [src])
    finally:
        PretrainData._preprocess_one = real
    assert sorted(calls) == sorted([first.name[: -len("_0000.nii.gz")], second])
    assert json.loads((out / (second + ".source.json")).read_text())[0][1] > 0   # rewritten whole


@pytest.mark.parametrize("bad_name", ["scan.nii.gz", "case_0000.nii", "case_000.nii.gz"])
def test_bad_unlabeled_name_is_named(synth_dataset, pre_copy, tmp_path, bad_name):
    src = tmp_path / "unl"
    shutil.copytree(synth_dataset.raw_dataset / "imagesUnlabeled", src)
    shutil.copy(next(src.iterdir()), src / bad_name)
    with pytest.raises(AliceError) as ei:
        _data(synth_dataset, [src])
    msg = str(ei.value)
    assert str(src / bad_name) in msg and "nnU-Net naming" in msg
    assert not (pre_copy / UNLABELED_SUBDIR).exists()  # nothing written before the check


def test_unlabeled_folder_errors(synth_dataset, pre_copy, tmp_path):
    with pytest.raises(AliceError, match="does not exist"):
        _data(synth_dataset, [tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(AliceError, match="holds no images"):
        _data(synth_dataset, [tmp_path / "empty"])


# ------------------------------------------------------------------------------ ViewSampler
PATCH = [24, 32, 32]


@pytest.fixture
def data(synth_dataset, pre_copy):
    return _data(synth_dataset)


def _sampler(data, seed=7, **kw):
    cfg = PretrainConfig(objective="mae", mask_block_size=8, mask_ratio=0.75, seed=seed, **kw)
    return ViewSampler(data, cfg, PATCH, batch_size=2)


def _same(a, b):
    return (a["batch_index"] == b["batch_index"] and a["case_q"] == b["case_q"]
            and torch.equal(a["student_q"], b["student_q"]) and torch.equal(a["mask_q"], b["mask_q"]))


def test_mae_batch_shapes_and_masks(data):
    b = _sampler(data).make_batch(0)
    assert b["student_q"].shape == (2, 1, *PATCH) and b["student_q"].dtype == torch.float32
    assert b["mask_q"].shape == (2, 1, *PATCH)
    assert "mask_k" not in b and "student_k" not in b  # MAE needs only the query view
    assert b["batch_index"] == 0 and len(b["case_q"]) == 2
    assert set(b["case_q"]) <= set(data.case_keys())
    for m in b["mask_q"]:
        assert float(m.mean()) == pytest.approx(0.75)  # 3*4*4 blocks of 8^3, 36 masked
    assert not torch.equal(b["mask_q"][0], b["mask_q"][1])
    assert torch.isfinite(b["student_q"]).all() and float(b["student_q"].std()) > 0


def test_batches_are_a_function_of_seed_and_index(data):
    np_state, py_state, torch_state = np.random.get_state(), random.getstate(), torch.get_rng_state()
    s1, s2 = _sampler(data), _sampler(data)
    b3 = s1.make_batch(3)
    s1.make_batch(0)
    assert _same(b3, s2.make_batch(3))  # same (seed, index), other instance, other history
    assert not torch.equal(b3["student_q"], s1.make_batch(4)["student_q"])
    assert not torch.equal(b3["mask_q"], s1.make_batch(4)["mask_q"])
    assert not torch.equal(b3["student_q"], _sampler(data, seed=8).make_batch(3)["student_q"])
    # global RNGs are left as they were
    assert np.array_equal(np.random.get_state()[1], np_state[1]) and random.getstate() == py_state
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_thread_id_stepping_interleaves_the_stream(data):
    ref = _sampler(data)
    expected = [ref.make_batch(i) for i in range(4)]
    workers = []
    for t in range(2):  # what each worker copy does inside MultiThreadedAugmenter
        s = _sampler(data)
        s.number_of_threads_in_multithreaded = 2
        s.set_thread_id(t)
        workers.append(s)
    got = [next(workers[i % 2]) for i in range(4)]  # the augmenter's ordered round robin
    assert [g["batch_index"] for g in got] == [0, 1, 2, 3]
    assert all(_same(g, e) for g, e in zip(got, expected))


def test_same_stream_through_zero_and_two_workers(data):
    serial = make_loader(_sampler(data), 0, seed=7)
    expected = [next(serial) for _ in range(4)]
    assert [e["batch_index"] for e in expected] == [0, 1, 2, 3]
    loader = make_loader(_sampler(data), 2, seed=7)
    try:
        got = [next(loader) for _ in range(4)]
    finally:
        loader.close()
    assert [g["batch_index"] for g in got] == [0, 1, 2, 3]
    assert all(_same(g, e) for g, e in zip(got, expected))


def test_start_batch_resumes_the_stream(data):
    cfg = PretrainConfig(objective="mae", mask_block_size=8, seed=7)
    resumed = ViewSampler(data, cfg, PATCH, batch_size=2, start_batch=5)
    assert _same(next(resumed), _sampler(data).make_batch(5))
