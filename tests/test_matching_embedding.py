"""The ``embedding`` matcher: matching math, training, the versioned model file, the cache, the CLI, errors."""
import glob
import json
import os
import pickle

import numpy as np
import pytest
import torch

from nnunet_alice.errors import AliceError
from nnunet_alice.pretrain.config import PretrainConfig
from nnunet_alice.pretrain.matching import build_matcher
from nnunet_alice.pretrain.matching.base import CaseVolume
from nnunet_alice.embedding import EmbeddingMatcher
from nnunet_alice.embedding.cache import EmbeddingStore
from nnunet_alice.embedding.model_file import load_model, model_path, save_model
from nnunet_alice.embedding.network import AnatomicalEmbeddingNet, embed_volume
from nnunet_alice.embedding.search import CaseEmbedding, match_embeddings
from nnunet_alice.embedding.train import TrainConfig, train_embedding
from nnunet_alice.embedding.volume import normalize_intensity
from nnunet_alice.pretrain.matching.sampling import match_with_retries

TINY = {"features": [4, 8, 16], "n_conv_per_stage": 1, "fine_dim": 8, "coarse_dim": 8,
        "fine_level": 1, "coarse_level": 2}


def blobs(shape=(32, 32, 32), seed=0):
    """A structured phantom: a body with a few bright and dark blobs."""
    from scipy.ndimage import gaussian_filter
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), 0)
    c = (np.asarray(shape, np.float32) - 1) / 2
    vol = ((((g - c[:, None, None, None]) / (0.42 * np.asarray(shape))[:, None, None, None]) ** 2).sum(0) <= 1)
    vol = vol.astype(np.float32)
    for _ in range(6):
        p = rng.uniform(0.3, 0.7, 3) * np.asarray(shape)
        r = rng.uniform(2.5, 5.0)
        vol[((g - p[:, None, None, None]) ** 2).sum(0) <= r * r] = rng.uniform(0.2, 3.0)
    return gaussian_filter(vol, 0.8)


class NoRead:
    """Stands in for an image array: has a shape, fails on any voxel access."""

    def __init__(self, shape):
        self.shape = shape

    def __getitem__(self, item):
        raise AssertionError("the volume was read during matching")

    def __array__(self, *args, **kwargs):
        raise AssertionError("the volume was read during matching")


# ---------------------------------------------------------------------------- matching math
def fourier_maps(shape, stride, shift, w, phase):
    """Unit vectors of random Fourier features at the map-cell centres of a case, content shifted by ``shift``."""
    axes = [np.arange(-(-n // stride)) * float(stride) for n in shape]
    x = np.stack(np.meshgrid(*axes, indexing="ij"), -1) - np.asarray(shift)
    arg = x @ w.T + phase
    v = np.concatenate([np.sin(arg), np.cos(arg)], -1)
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    return np.moveaxis(v, -1, 0)


def test_coarse_to_fine_search_recovers_a_known_shift():
    rng = np.random.default_rng(0)
    shape, shift = (48, 48, 48), np.array([3.0, -5.0, 4.0])   # B(x) = A(x - shift): p in A <-> p + shift in B
    wc, pc = rng.normal(0, 2 * np.pi / 60, (8, 3)), rng.uniform(0, 2 * np.pi, 8)
    wf, pf = rng.normal(0, 2 * np.pi / 16, (8, 3)), rng.uniform(0, 2 * np.pi, 8)

    def emb(s):
        return CaseEmbedding(coarse=fourier_maps(shape, 8, s, wc, pc).astype(np.float32),
                             fine=fourier_maps(shape, 2, s, wf, pf).astype(np.float16),
                             scale=np.ones(3), case_shape=shape, coarse_stride=8, fine_stride=2)

    ea, eb = emb(np.zeros(3)), emb(shift)
    errors = []
    for _ in range(20):
        pa = rng.uniform(12, 36, 3)
        pb, score = match_embeddings(ea, pa, eb, top_k=4)
        errors.append(np.linalg.norm(pb - (pa + shift)))
        assert 0.9 < score <= 1.0
    assert np.median(errors) < 0.6 and max(errors) < 1.5, errors


def random_embedding(rng, shape):
    """Unrelated unit vectors: 16-d coarse map at stride 8, 16-d fine map at stride 2 (fp16, as cached)."""
    def rand(stride, dtype):
        v = rng.normal(size=(16,) + tuple(-(-n // stride) for n in shape))
        return (v / np.linalg.norm(v, axis=0, keepdims=True)).astype(dtype)

    return CaseEmbedding(rand(8, np.float32), rand(2, np.float16), np.ones(3), shape, 8, 2)


def test_cycle_check_rejects_inconsistent_matches():
    rng = np.random.default_rng(4)
    shape = (32, 32, 32)
    store = EmbeddingStore(None, "r" * 64, 2.0)
    for cid in ("a", "b"):
        store.memory[cid] = random_embedding(rng, shape)
    vol = np.zeros((1,) + shape, np.float32)
    a, b = CaseVolume("a", vol, (1.0, 1.0, 1.0)), CaseVolume("b", vol, (1.0, 1.0, 1.0))
    checked, plain = EmbeddingMatcher(store), EmbeddingMatcher(store, cycle_tolerance_mm=None)
    scores = [(checked.match(a, p, b)[1], plain.match(a, p, b)[1]) for p in rng.uniform(4, 28, (10, 3))]
    assert all(c == p or c <= 0.0 < p for c, p in scores)          # a score is kept or capped at 0
    assert sum(c <= 0.0 for c, _ in scores) >= 6                  # unrelated maps mostly fail the cycle check
    assert np.array_equal(checked.match(a, np.array([9.0, 9.0, 9.0]), b)[0],
                          plain.match(a, np.array([9.0, 9.0, 9.0]), b)[0])    # the point itself is unchanged


def test_unrelated_maps_give_low_scores():
    rng = np.random.default_rng(1)
    shape = (32, 32, 32)
    ea, eb = random_embedding(rng, shape), random_embedding(rng, shape)
    _, score = match_embeddings(ea, np.array([16.0, 16.0, 16.0]), eb)
    assert score < 0.7


# ---------------------------------------------------------------------------- network, training, model file
def test_network_shapes_and_unit_norm():
    net = AnatomicalEmbeddingNet(TINY)
    coarse, fine = embed_volume(net, torch.rand(18, 20, 13))
    assert coarse.shape == (8, 5, 5, 4) and fine.shape == (8, 9, 10, 7)
    assert torch.allclose(fine.norm(dim=0), torch.ones(9, 10, 7), atol=1e-4)


def test_training_decreases_the_loss():
    vols = [normalize_intensity(blobs(seed=s)) for s in (0, 1)]
    cfg = TrainConfig(steps=40, batch_size=1, lr=5e-3, num_hard=64, seed=0)
    cfg.pair.crop, cfg.pair.points = (32, 32, 32), 48
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # tiny convolutions: one thread, immune to a busy machine
    try:
        _, history = train_embedding(vols, arch=TINY, cfg=cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    losses = np.array([h["loss"] for h in history])
    assert np.all(np.isfinite(losses))
    assert losses[-10:].mean() < 0.85 * losses[:10].mean(), losses


def test_trained_embedding_recovers_a_known_translation():
    """End to end on a small volume: train, embed both cases, match; the shift is found within ~2 mm."""
    from scipy.ndimage import shift as nd_shift
    from nnunet_alice.pretrain.matching.sampling import sample_query_point

    shape, spacing, shift = (40, 40, 40), (2.0, 2.0, 2.0), np.array([3.0, -2.0, 2.0])
    base = blobs(shape, seed=0)
    vols = [normalize_intensity(base)] + [normalize_intensity(blobs(shape, seed=s)) for s in (1, 2)]
    # all negatives: on a 40^3 toy with 150 steps, hard-negative mining (the default) has too few steps to pay off
    cfg = TrainConfig(steps=150, batch_size=1, lr=5e-3, seed=0, num_hard=None)
    cfg.pair.points = 128
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net, _ = train_embedding(vols, arch=TINY, cfg=cfg, progress=False)
        a = CaseVolume("a", base[None], spacing)
        b = CaseVolume("b", nd_shift(base, shift, order=1, mode="nearest")[None], spacing)   # b(x) = a(x - shift)
        matcher = EmbeddingMatcher(EmbeddingStore(net, "t" * 64, 2.0))
        with torch.no_grad():
            matcher.prepare([a, b])
    finally:
        torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    errors = []
    for _ in range(30):
        pa = sample_query_point(a, rng, margin=6)
        pb, _ = matcher.match(a, pa, b)
        errors.append(np.linalg.norm((pb - (pa + shift)) * np.asarray(spacing)))
    identity_error = np.linalg.norm(shift * np.asarray(spacing))                      # 8.2 mm
    assert np.median(errors) < 0.5 * identity_error, (np.median(errors), identity_error)


@pytest.mark.parametrize("fov_prob", [0.0, 1.0])
def test_training_pairs_correspond_inside_both_fields_of_view(fov_prob):
    from scipy.ndimage import map_coordinates
    from nnunet_alice.embedding.pairs import PairConfig, make_pair
    from nnunet_alice.embedding.train import foreground_points

    vol = normalize_intensity(blobs((32, 32, 32), seed=2))
    cfg = PairConfig(crop=(32, 32, 32), points=64, fov_prob=fov_prob, fov_range=(0.6, 0.8))
    rng = np.random.default_rng(0)
    corrs, zero_fraction = [], []
    for _ in range(4):
        c1, c2, _, _, u1, u2 = make_pair(torch.from_numpy(vol), vol, foreground_points(vol), rng, cfg)
        a = map_coordinates(c1[0].numpy(), u1.T, order=1)
        b = map_coordinates(c2[0].numpy(), u2.T, order=1)
        assert len(u1) > 16
        corrs.append(np.corrcoef(a, b)[0, 1])
        zero_fraction.append(float((c1 == 0).float().mean() + (c2 == 0).float().mean()) / 2)
        assert np.all(np.abs(a) > 0) and np.all(np.abs(b) > 0)          # points lie inside both fields of view
    assert np.median(corrs) > 0.8, corrs                                  # same anatomy at u1 and u2
    if fov_prob == 1.0:
        assert min(zero_fraction) > 0.3                                   # 0.6-0.8 per axis: most of the crop cut
    else:
        assert max(zero_fraction) < 0.05


def test_model_file_round_trip_and_format_check(tmp_path):
    net = AnatomicalEmbeddingNet(TINY).eval()
    path = str(tmp_path / "m" / "checkpoint_final.pth")
    digest = save_model(path, net, {"target_spacing": 2.0})
    loaded, ckpt, digest2 = load_model(path)
    assert digest == digest2 and ckpt["format"] == "nnunet_alice.embedding" and ckpt["format_version"] == 1
    assert "package_version" in ckpt
    x = torch.rand(16, 16, 16)
    assert torch.allclose(embed_volume(net, x)[1], embed_volume(loaded, x)[1], atol=1e-6)
    from nnunet_alice.checkpoint import save_checkpoint
    save_checkpoint(path, {"network_weights": {}, "format": "something_else"})
    with pytest.raises(AliceError, match="not an Alice embedding model"):
        load_model(path)


# ---------------------------------------------------------------------------- cache
def test_embedding_cache_reused_and_refreshed(tmp_path):
    torch.manual_seed(0)
    net = AnatomicalEmbeddingNet(TINY)
    case = CaseVolume("c1", blobs((24, 24, 24))[None], (1.0, 1.0, 1.0))   # 1 mm -> 2 mm embedding grid
    store = EmbeddingStore(net, "a" * 64, 2.0, root=str(tmp_path))
    emb = store.refresh(case)
    assert store.n_computed == 1 and emb.fine.dtype == np.float16 and emb.fine.shape[1:] == (6, 6, 6)
    files = glob.glob(str(tmp_path / "alice_embeddings" / "aaaaaaaaaaaaaaaa" / "c1__*.npz"))
    assert len(files) == 1

    again = EmbeddingStore(net, "a" * 64, 2.0, root=str(tmp_path))
    assert np.array_equal(again.refresh(case).fine, emb.fine) and (again.n_loaded, again.n_computed) == (1, 0)

    changed = CaseVolume("c1", case.image * 2.0, case.spacing)            # data changed -> new key
    again.refresh(changed)
    assert again.n_computed == 1
    files2 = glob.glob(str(tmp_path / "alice_embeddings" / "aaaaaaaaaaaaaaaa" / "c1__*.npz"))
    assert len(files2) == 1 and files2 != files

    with open(files2[0], "wb") as f:                                     # corrupt file -> recomputed
        f.write(b"garbage")
    third = EmbeddingStore(net, "a" * 64, 2.0, root=str(tmp_path))
    third.refresh(changed)
    assert (third.n_computed, third.n_loaded) == (1, 0)
    assert EmbeddingStore(net, "a" * 64, 2.0, root=str(tmp_path))._read(files2[0], "x", (24, 24, 24)) is None

    other_model = EmbeddingStore(net, "b" * 64, 2.0, root=str(tmp_path))  # model changed -> new folder
    other_model.refresh(changed)
    assert other_model.n_computed == 1 and (tmp_path / "alice_embeddings" / ("b" * 16)).is_dir()


# ---------------------------------------------------------------------------- matcher from config, errors
def test_missing_model_is_a_one_line_error_naming_alice_embed(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    cfg = PretrainConfig(dataset_name="Dataset990_Toy", matcher="embedding", configuration="3d_fullres")
    with pytest.raises(AliceError) as e:
        build_matcher("embedding", cfg, cache_dir=str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "alice_embed -d Dataset990_Toy -c 3d_fullres" in msg


def test_matcher_from_config_matches_from_memory(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)     # then the cache goes to cache_dir
    cfg = PretrainConfig(dataset_name="Dataset990_Toy", matcher="embedding", device="cpu")
    torch.manual_seed(0)
    save_model(model_path("Dataset990_Toy", cfg.plans, cfg.configuration), AnatomicalEmbeddingNet(TINY),
               {"target_spacing": 1.0})
    matcher = build_matcher("embedding", cfg, cache_dir=str(tmp_path / "pre"))
    a = CaseVolume("a", blobs(seed=0)[None], (1.0, 1.0, 1.0))
    b = CaseVolume("b", np.roll(blobs(seed=0), 3, axis=1)[None], (1.0, 1.0, 1.0))
    matcher.prepare([a, b])
    assert matcher.store.n_computed == 2
    assert len(glob.glob(str(tmp_path / "pre" / "alice_embeddings" / "*" / "*.npz"))) == 2
    worker = pickle.loads(pickle.dumps(matcher))            # what a data-loading worker receives
    assert worker.store.net is None
    a.image, b.image = NoRead(a.image.shape), NoRead(b.image.shape)   # matching must not read the volumes again
    rng = np.random.default_rng(0)
    for _ in range(5):
        pb, score = worker.match(a, rng.uniform(8, 24, 3), b)
        assert np.all(pb >= 0) and np.all(pb <= 31) and -1.0 <= score <= 1.0


def test_matcher_with_retries_on_known_embeddings_finds_the_shift():
    rng = np.random.default_rng(3)
    shape, shift = (40, 40, 40), np.array([-2.0, 3.0, 1.0])
    wc, pc = rng.normal(0, 2 * np.pi / 60, (8, 3)), rng.uniform(0, 2 * np.pi, 8)
    wf, pf = rng.normal(0, 2 * np.pi / 16, (8, 3)), rng.uniform(0, 2 * np.pi, 8)
    store = EmbeddingStore(None, "k" * 64, 2.0)
    for cid, s in (("a", np.zeros(3)), ("b", shift)):
        store.memory[cid] = CaseEmbedding(fourier_maps(shape, 8, s, wc, pc).astype(np.float32),
                                          fourier_maps(shape, 2, s, wf, pf).astype(np.float16),
                                          np.ones(3), shape, 8, 2)
    vol = blobs(shape)[None]
    a, b = CaseVolume("a", vol, (1.0, 1.0, 1.0)), CaseVolume("b", vol, (1.0, 1.0, 1.0))
    matcher = EmbeddingMatcher(store)
    for _ in range(5):
        pa, pb, score, fell_back = match_with_retries(matcher, a, b, rng, threshold=0.7, margin=8)
        assert not fell_back and score > 0.8 and np.linalg.norm(pb - (pa + shift)) < 1.5


# ---------------------------------------------------------------------------- CLI end to end
def _fake_preprocessed_dataset(root, name="Dataset990_Toy", n=3):
    import blosc2
    from batchgenerators.utilities.file_and_folder_operations import write_pickle
    ds = os.path.join(root, name)
    folder = os.path.join(ds, "nnUNetPlans_3d_fullres")
    os.makedirs(folder)
    plans = {"dataset_name": name, "plans_name": "nnUNetPlans", "configurations": {"3d_fullres": {
        "data_identifier": "nnUNetPlans_3d_fullres", "patch_size": [32, 32, 32], "spacing": [2.0, 2.0, 2.0],
        "batch_size": 2, "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
        "architecture": {"network_class_name": "x", "arch_kwargs": {}, "_kw_requires_import": []}}}}
    with open(os.path.join(ds, "nnUNetPlans.json"), "w") as f:
        json.dump(plans, f)
    with open(os.path.join(ds, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "CT"}, "labels": {"background": 0}, "file_ending": ".nii.gz"}, f)
    for i in range(n):
        blosc2.asarray(blobs(seed=i)[None].astype(np.float32), urlpath=os.path.join(folder, f"case_{i}.b2nd"))
        write_pickle({"spacing": [2.0, 2.0, 2.0]}, os.path.join(folder, f"case_{i}.pkl"))
    return ds


def test_alice_embed_cli_writes_model_plot_log_and_cache(tmp_path, monkeypatch):
    from nnunet_alice.embedding.cli import main
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    ds = _fake_preprocessed_dataset(str(tmp_path / "nnUNet_preprocessed"))
    threads = torch.get_num_threads()
    try:
        main(["-d", "990", "-c", "3d_fullres", "--steps", "3", "-device", "cpu", "--crop", "32", "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "nnUNet_results" / "Dataset990_Toy" / "AliceEmbed__nnUNetPlans__3d_fullres"
    for name in ("checkpoint_final.pth", "checkpoint_final.pth.sha256", "loss.png", "training_log.txt"):
        assert (out / name).is_file(), name
    _, ckpt, digest = load_model(str(out / "checkpoint_final.pth"))
    assert ckpt["training"]["steps"] == 3 and ckpt["dataset_name"] == "Dataset990_Toy"
    cached = glob.glob(os.path.join(ds, "alice_embeddings", digest[:16], "*.npz"))
    assert len(cached) == 3
    # the pretraining side finds the model and reuses the cache
    cfg = PretrainConfig(dataset_name="Dataset990_Toy", matcher="embedding", device="cpu")
    matcher = build_matcher("embedding", cfg, cache_dir=os.path.join(ds, "alice_matching"))  # as the runner does
    from nnunet_alice.pretrain.data.cases import PretrainData
    data = PretrainData("Dataset990_Toy", "nnUNetPlans", "3d_fullres")
    matcher.prepare([data.load(r) for r in data.cases])
    assert (matcher.store.n_loaded, matcher.store.n_computed) == (3, 0)


def test_alice_embed_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from nnunet_alice.embedding.cli import main
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["-d", "990", "-c", "3d_fullres", "-device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "nnUNet_preprocessed" in err
