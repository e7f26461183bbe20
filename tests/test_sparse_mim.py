"""SparK-style masked image modelling on the planned network (``pretrain/objectives/sparse.py``): visible-only norm
statistics, masks re-applied at every encoder output, mask tokens + densify only at masked positions, a separate
reconstruction head, the loss on masked voxels, unchanged network keys, PlainConvUNet and ResidualEncoderUNet."""
import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import tiny_arch_kwargs
from nnunet_alice.errors import AliceError
from nnunet_alice.pretrain.config import PretrainConfig
from nnunet_alice.pretrain.data.masking import batch_block_masks
from nnunet_alice.pretrain.objectives.mae import MaeObjective
from nnunet_alice.pretrain.objectives.sparse import SparseMaskedModel, block_normalise, masked_instance_norm, mim_loss

PATCH = (16, 16, 16)
PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


def planned(cls: str, seed: int = 0, in_channels: int = 1, out_channels: int = 1) -> nn.Module:
    """A network built the way nnU-Net builds it from plans (``get_network_from_plans``), tiny kwargs."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    kw = tiny_arch_kwargs()
    if cls == RESENC:
        kw["n_blocks_per_stage"] = [1, 2, 2]
        del kw["n_conv_per_stage"]
    torch.manual_seed(seed)
    return get_network_from_plans(cls, kw, ["conv_op", "norm_op", "dropout_op", "nonlin"], in_channels,
                                  out_channels, allow_init=True, deep_supervision=False)


def masks(batch=2, ratio=0.5, seed=0, block=4):
    return torch.from_numpy(batch_block_masks(batch, PATCH, block, ratio, np.random.default_rng(seed)))


def smooth(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(batch, 1, 4, 4, 4, generator=g), size=PATCH, mode="trilinear")


def encoder_outputs(net):
    """Record the output of every encoder submodule that returns a spatial tensor (name -> tensor)."""
    outs, handles = {}, []
    for name, m in net.encoder.named_modules():
        def keep(mod, inp, out, name=name):
            if torch.is_tensor(out) and out.dim() == 5:
                outs[name] = out.detach().clone()
        handles.append(m.register_forward_hook(keep))
    return outs, handles


# ------------------------------------------------------------------------------ masked statistics
def test_masked_instance_norm_equals_a_hand_computed_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 6, 5, 4, generator=g) * 3 + 2
    visible = (torch.rand(3, 1, 6, 5, 4, generator=g) > 0.6).float()
    visible[2] = 0.0  # a sample without visible voxels: output 0, no NaN
    w, b = torch.randn(4, generator=g), torch.randn(4, generator=g)
    y = masked_instance_norm(x, visible, w, b, 1e-5)
    xn, vn = x.numpy().astype(np.float64), visible.numpy()[:, 0].astype(bool)
    for i in range(3):
        for c in range(4):
            if vn[i].any():
                vals = xn[i, c][vn[i]]
                ref = (xn[i, c] - vals.mean()) / np.sqrt(vals.var() + 1e-5) * float(w[c]) + float(b[c])
                np.testing.assert_allclose(y[i, c].numpy()[vn[i]], ref[vn[i]], rtol=1e-4, atol=1e-4)
            assert not y[i, c].numpy()[~vn[i]].any()
    assert torch.isfinite(y).all()
    # with everything visible it is nnU-Net's instance norm
    full = masked_instance_norm(x, torch.ones_like(visible), w, b, 1e-5)
    assert torch.allclose(full, F.instance_norm(x, weight=w, bias=b, eps=1e-5), atol=1e-5)


def test_encoder_norms_use_visible_statistics_only():
    mask = masks(ratio=0.75)
    stats = {}
    for masking in ("spark", "zero"):
        net = planned(PLAIN)
        mim = SparseMaskedModel(net, 1, masking)
        norm = net.encoder.stages[0][0].convs[0].norm
        nn.init.ones_(norm.weight), nn.init.zeros_(norm.bias)
        seen = {}
        norm.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o.detach().clone()))
        with mim.masked(mask):
            net(smooth() * (1 - mask))
        vis = (1 - mask).bool().expand_as(seen["out"])
        stats[masking] = [float(seen["out"][i, c][vis[i, c]].mean()) for i in range(2) for c in range(4)]
    assert np.allclose(stats["spark"], 0.0, atol=1e-4)          # visible voxels are centred by their own mean
    assert np.abs(stats["zero"]).max() > 0.05                    # zeros counted in the statistics shift them


# ------------------------------------------------------------------------------ sparse encoder
@pytest.mark.parametrize("cls", [PLAIN, RESENC])
def test_masked_positions_are_zero_at_every_encoder_output_in_spark_mode(cls):
    mask = masks()
    for masking in ("spark", "zero"):
        net = planned(cls)
        mim = SparseMaskedModel(net, 1, masking)
        outs, _ = encoder_outputs(net)
        with mim.masked(mask):
            net(smooth() * (1 - mask))
        assert len(outs) >= 8
        leaked = {}
        for name, o in outs.items():
            masked_here = 1 - F.adaptive_max_pool3d(1 - mask, o.shape[2:])
            assert masked_here.sum() > 0
            leaked[name] = float((o * masked_here).abs().max())
        if masking == "spark":
            assert max(leaked.values()) == 0.0, {k: v for k, v in leaked.items() if v}
        else:
            assert max(leaked.values()) > 0.0  # the dense network fills the masked blocks


@pytest.mark.parametrize("cls", [PLAIN, RESENC])
def test_network_keys_unchanged_and_hooks_inactive_outside_the_context(cls):
    net, ref = planned(cls, seed=3), planned(cls, seed=3)
    keys = list(net.state_dict())
    mim = SparseMaskedModel(net, 1)
    assert list(net.state_dict()) == keys
    assert not any(k.startswith(("encoder", "decoder")) for k in mim.state_dict())
    x = smooth()
    with torch.no_grad():
        with mim.masked(masks()):
            sparse_out = net(x)
        assert torch.equal(net(x), ref(x))                 # outside the context: nnU-Net's network
        assert torch.equal(copy.deepcopy(net)(x), ref(x))  # an EMA-style deep copy too
        assert not torch.equal(sparse_out, ref(x))


@pytest.mark.parametrize("cls", [PLAIN, RESENC])
def test_decoder_sees_encoder_features_at_visible_positions_and_tokens_elsewhere(cls):
    net = planned(cls)
    mim = SparseMaskedModel(net, 1)
    with torch.no_grad():
        for t in mim.mask_tokens:
            t.fill_(0.5)
    raw, filled = {}, {}
    net.encoder.register_forward_hook(lambda m, i, o: raw.__setitem__("skips", [s.detach().clone() for s in o]))
    net.decoder.register_forward_pre_hook(lambda m, a: filled.__setitem__("skips", [s.detach() for s in a[0]]))
    mask = masks()
    with mim.masked(mask):
        net(smooth() * (1 - mask))
    assert len(filled["skips"]) == len(net.encoder.output_channels)
    for r, f in zip(raw["skips"], filled["skips"]):
        v = F.adaptive_max_pool3d(1 - mask, r.shape[2:]).expand_as(r).bool()
        assert torch.equal(f[v], r[v])
        assert torch.all(f[~v] == 0.5)  # densify convs start at zero: masked positions hold the token


def test_separate_head_reconstructs_and_every_addition_learns():
    net = planned(PLAIN)
    mim = SparseMaskedModel(net, 1)
    mask = masks()
    with mim.masked(mask):
        seg = net(smooth() * (1 - mask))
    rec = mim.reconstruction()
    assert rec.shape == (2, 1, *PATCH) and not torch.equal(rec, seg)
    mim_loss(rec, smooth(seed=1), mask).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mim.parameters())
    assert all(p.grad is None for p in net.decoder.seg_layers.parameters())
    with pytest.raises(RuntimeError, match="no network run"):
        mim.reconstruction()


# ------------------------------------------------------------------------------ loss and target
def test_loss_counts_masked_voxels_only():
    mask = masks(ratio=0.5)
    pred, target = smooth(seed=1), smooth(seed=2)
    base = mim_loss(pred, target, mask)
    assert float(mim_loss(pred, target + 5.0 * (1 - mask), mask)) == pytest.approx(float(base))
    assert float(mim_loss(pred, target + 5.0 * mask, mask)) > float(base) + 1.0
    p = pred.clone().requires_grad_(True)
    mim_loss(p, target, mask).backward()
    assert not p.grad[(1 - mask).bool()].any() and p.grad[mask.bool()].abs().sum() > 0


def test_block_normalised_target_is_standard_within_each_block():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 1, 10, 12, 9, generator=g) * 4 + 7
    n = block_normalise(t, 4)  # border blocks cut by the patch (10 = 4 + 4 + 2, 9 = 4 + 4 + 1)
    for sl in [(slice(0, 4), slice(0, 4), slice(0, 4)), (slice(8, 10), slice(8, 12), slice(4, 8)),
               (slice(4, 8), slice(4, 8), slice(8, 9))]:
        blk, ref = n[(0, 0) + sl], t[(0, 0) + sl]
        assert float(blk.mean()) == pytest.approx(0.0, abs=1e-4)
        expected = (ref - ref.mean()) / torch.sqrt(ref.var(unbiased=False) + 1e-6)
        assert torch.allclose(blk, expected, atol=1e-4)


@pytest.mark.parametrize("cls", [PLAIN, RESENC])
@pytest.mark.parametrize("masking", ["spark", "zero"])
def test_mae_objective_uses_the_clean_target_and_trains(cls, masking):
    cfg = PretrainConfig(objective="mae", masking=masking, mask_block_size=4).validate()
    obj = MaeObjective(planned(cls), cfg)
    assert bool(len(obj.mim.mask_tokens)) == (masking == "spark")
    mask = masks(ratio=0.5)
    view, clean = smooth(seed=4), smooth(seed=5)
    with torch.no_grad():
        loss_clean, _ = obj({"student_q": view, "target_q": clean, "mask_q": mask}, 0)
        loss_self, _ = obj({"student_q": view, "mask_q": mask}, 0)  # no target in the batch: the view itself
    assert float(loss_clean) != pytest.approx(float(loss_self))
    with torch.no_grad():
        moved, _ = obj({"student_q": view, "target_q": clean + 3.0 * (1 - mask), "mask_q": mask}, 0)
    assert float(moved) == pytest.approx(float(loss_clean), rel=1e-6)


@pytest.mark.parametrize("cls", [PLAIN, RESENC])
def test_spark_mae_objective_trains(cls):
    cfg = PretrainConfig(objective="mae", mask_block_size=4).validate()
    obj = MaeObjective(planned(cls), cfg)
    mask = masks(ratio=0.5)
    view, clean = smooth(seed=4), smooth(seed=5)
    opt = torch.optim.Adam([p for m in obj.student_modules().values() for p in m.parameters() if p.requires_grad],
                           lr=3e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss, _ = obj({"student_q": view, "target_q": clean, "mask_q": mask}, 0)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("cls", [PLAIN, RESENC])
def test_checkpoint_of_a_spark_run_loads_into_nnunets_planned_network(cls, tmp_path):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    from nnunet_alice.checkpoint import network_state_dict

    cfg = PretrainConfig(objective="mae", mask_block_size=4).validate()
    obj = MaeObjective(planned(cls), cfg)
    opt = torch.optim.Adam([p for p in obj.parameters() if p.requires_grad], lr=1e-2)
    mask = masks()
    for _ in range(2):
        opt.zero_grad()
        obj({"student_q": smooth(), "target_q": smooth(seed=1), "mask_q": mask}, 0)[0].backward()
        opt.step()
    weights = network_state_dict(obj.network)
    fresh = planned(cls, seed=99, out_channels=3)  # fine-tuning: as many outputs as labels
    assert list(weights) == list(fresh.state_dict())
    fname = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": weights}, fname)
    load_pretrained_weights(fresh, str(fname), verbose=False)
    for k, v in fresh.state_dict().items():
        if ".seg_layers." not in k:
            assert torch.equal(v, weights[k]), k
    assert not any(k.startswith("mim.") for k in weights)
    assert any(k.startswith("mim.") for k in obj.state_dict())  # the additions are training state only


def test_bad_masking_is_one_line():
    with pytest.raises(AliceError, match="--masking must be one of"):
        PretrainConfig(masking="sparse").validate()


@pytest.mark.parametrize("masking", ["spark", "zero"])
def test_alice_reconstruction_term_uses_the_clean_targets_on_masked_voxels(masking):
    from alice_fixtures import alice_batch, schedules_for, tiny_config, tiny_network
    from nnunet_alice.pretrain.objectives.alice import AliceObjective

    cfg = tiny_config(masking=masking)
    obj = AliceObjective(tiny_network(), cfg, schedules_for(cfg))
    assert "mim" in obj.student_modules() and bool(len(obj.mim.mask_tokens)) == (masking == "spark")
    batch = alice_batch(2, ratio=0.5)
    clean = {"target_q": batch["student_q"] + 1.0, "target_k": batch["student_k"] - 1.0}
    with torch.no_grad():
        rec = {name: float(obj(dict(batch, **extra), 0)[1]["recon"]) for name, extra in [
            ("view", {}), ("clean", clean),
            ("clean_moved_visible", {k: v + 3.0 * (1 - batch["mask" + k[-2:]]) for k, v in clean.items()})]}
    assert rec["clean"] != pytest.approx(rec["view"])
    assert rec["clean_moved_visible"] == pytest.approx(rec["clean"], rel=1e-6)
