"""DINO head, token projection and CLS pooling (docs/method.md "Network, tokens and heads"; docs/method.md, mapping
Alice to a CNN U-Net)."""
import pytest
import torch
from torch.nn import functional as F

from nnunet_alice.pretrain.objectives.heads import (ClsPooling, DinoHead, PreNormTap, TokenProjection, flatten_tokens,
                                                    global_pool_tokens, prenorm_conv)


def _small_head(**kw):
    torch.manual_seed(0)
    return DinoHead(16, hidden_dim=32, bottleneck_dim=8, out_dim=12, **kw)


def test_head_shapes_and_structure():
    head = _small_head()
    assert head(torch.randn(3, 16)).shape == (3, 12)             # CLS (B, C)
    assert head(torch.randn(2, 5, 16)).shape == (2, 5, 12)       # tokens (B, N, C)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 32), (32, 8)]
    assert sum(isinstance(m, torch.nn.GELU) for m in head.mlp) == 2
    assert head.last_layer.bias is None
    one = DinoHead(16, 32, 8, 12, nlayers=1)
    assert len(one.mlp) == 1
    with pytest.raises(ValueError):
        DinoHead(16, nlayers=0)


def test_init_trunc_normal():
    torch.manual_seed(0)
    head = DinoHead(256, hidden_dim=512, bottleneck_dim=256, out_dim=64)
    w = head.mlp[0].weight
    assert w.abs().max() <= 0.04 + 1e-7
    assert 0.012 < w.std().item() < 0.02                         # truncation at 2 std shrinks the std a bit
    assert torch.all(head.mlp[0].bias == 0)


def test_weight_normed_prototypes_have_unit_norm_and_fixed_gain():
    head = _small_head()
    gain = head.last_layer.parametrizations.weight.original0
    assert not gain.requires_grad
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(12))
    # after an optimiser step the prototypes are still unit vectors
    opt = torch.optim.SGD(head.parameters(), lr=10.0)
    head(torch.randn(4, 16)).pow(2).sum().backward()
    opt.step()
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(12))
    free = _small_head(norm_last_layer=False)
    assert free.last_layer.parametrizations.weight.original0.requires_grad


def test_output_equals_cosine_with_prototypes():
    head = _small_head()
    x = torch.randn(4, 16)
    z = F.normalize(head.mlp(x), dim=-1)
    w = head.last_layer.parametrizations.weight.original1
    expected = z @ (w / w.norm(dim=1, keepdim=True)).t()
    torch.testing.assert_close(head(x), expected)
    assert head(x).abs().max() <= 1 + 1e-5


def test_cancel_last_layer_gradients():
    head = _small_head(norm_last_layer=False)
    head(torch.randn(4, 16)).sum().backward()
    assert all(p.grad is not None for p in head.last_layer.parameters())
    head.cancel_last_layer_gradients()
    assert all(p.grad is None for p in head.last_layer_parameters())
    assert all(p.grad is not None for p in head.mlp.parameters())
    v = head.last_layer.parametrizations.weight.original1
    v_before = v.detach().clone()
    torch.optim.AdamW(head.parameters(), lr=1.0, weight_decay=0.5).step()
    torch.testing.assert_close(v, v_before)                      # frozen: no step, no decay


def test_token_projection_and_pooling():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 2, 3, 4)
    tokens = flatten_tokens(x)
    assert tokens.shape == (2, 24, 6)
    torch.testing.assert_close(tokens[1, 2 * 4 + 3], x[1, :, 0, 2, 3])   # voxel (0, 2, 3) in C order
    cls = global_pool_tokens(x)
    assert cls.shape == (2, 6)
    torch.testing.assert_close(cls, x.mean(dim=(2, 3, 4)))
    proj = TokenProjection(6, 10)
    out = proj(x)
    assert out.shape == (2, 24, 10)
    torch.testing.assert_close(out, tokens @ proj.proj.weight.t() + proj.proj.bias)
    assert proj(cls).shape == (2, 10)                           # a pooled vector shares the projection
    torch.testing.assert_close(proj(cls), out.mean(dim=1))      # linear: project-then-pool == pool-then-project
    assert proj(torch.randn(1, 6, 4, 4)).shape == (1, 16, 10)   # 2D plans too
    with pytest.raises(ValueError):
        proj(torch.randn(2, 5, 2, 2, 2))
    with pytest.raises(ValueError):
        global_pool_tokens(torch.randn(2, 6))


# ------------------------------------------------------------------------------------------ DINO head reference
def test_head_matches_the_dino_paper_description():
    """DINO (arXiv 2104.14294) Sec. 3.1 / App.: 3-layer MLP (hidden 2048, GELU), output 256, l2 normalisation,
    weight-normalised linear layer with K outputs. Reference written out with plain matrix products."""
    head = _small_head()
    x = torch.randn(5, 16)
    lin = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    h = F.gelu(x @ lin[0].weight.t() + lin[0].bias)
    h = F.gelu(h @ lin[1].weight.t() + lin[1].bias)
    z = h @ lin[2].weight.t() + lin[2].bias
    z = z / z.norm(dim=1, keepdim=True)
    v = head.last_layer.parametrizations.weight.original1                 # direction; gain g = 1 (fixed)
    w = v / v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(head(x), z @ w.t())


# ------------------------------------------------------------------------------------------------ CLS pooling
def _plain(features=(8, 16, 32, 32)):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    n = len(features)
    return PlainConvUNet(1, n, features, torch.nn.Conv3d, 3, [1] + [2] * (n - 1), 2, 1, [1] * (n - 1),
                         conv_bias=True, norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True})


def _resenc(features=(8, 16, 32, 32)):
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    n = len(features)
    return ResidualEncoderUNet(1, n, features, torch.nn.Conv3d, 3, [1] + [2] * (n - 1), [1, 2, 2, 2][:n], 1,
                               [1] * (n - 1), conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
                               norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                               nonlin_kwargs={"inplace": True})


def _he_init(net, seed):
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He

    torch.manual_seed(seed)
    net.apply(InitWeights_He(1e-2))       # nnU-Net's initialisation of its planned networks
    return net.eval()


@pytest.mark.parametrize("build", [_plain, _resenc])
def test_prenorm_tap_reads_the_last_main_conv_before_its_norm(build):
    net = _he_init(build(), 0)
    tap = PreNormTap(net)
    conv = prenorm_conv(net)
    seen = {}
    conv.register_forward_hook(lambda m, i, o: seen.__setitem__("conv", o))
    net.encoder.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o[-1]))
    net(torch.randn(2, 1, 16, 16, 16))
    pre = tap.pop()
    assert pre.shape == seen["out"].shape and pre.shape[1] == tap.channels
    torch.testing.assert_close(pre, seen["conv"])                  # the conv output itself ...
    means = pre.mean(dim=(2, 3, 4))
    assert means.abs().max() > 1e-3                                # ... not centred by the norm
    if build is _resenc:                                           # main path, not the 1x1 skip projection
        assert conv.kernel_size == (3, 3, 3)
    with pytest.raises(RuntimeError):
        tap.pop()                                                  # read once per forward


def test_cls_pooling_modes_and_running_standardisation():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 2, 3, 2) + 3.0
    mean_pool = ClsPooling(6, "mean")
    torch.testing.assert_close(mean_pool(x), x.mean(dim=(2, 3, 4)))        # the plain pool, unchanged
    pool = ClsPooling(6, "prenorm_mean", momentum=0.5)
    out = pool(x)                                                          # first batch: its own moments
    v = x.mean(dim=(2, 3, 4))
    torch.testing.assert_close(out, (v - v.mean(0)) / torch.sqrt(v.var(0, unbiased=False) + 1e-5))
    assert int(pool.num_batches) == 1
    y = torch.randn(4, 6, 2, 3, 2)
    w = y.mean(dim=(2, 3, 4))
    mu, var = pool.running_mean.clone(), pool.running_var.clone()
    torch.testing.assert_close(pool(y, update_stats=True), (w - mu) / torch.sqrt(var + 1e-5))  # old stats
    torch.testing.assert_close(pool.running_mean, 0.5 * mu + 0.5 * w.mean(0))
    torch.testing.assert_close(pool.running_var, 0.5 * var + 0.5 * w.var(0, unbiased=False))
    before = pool.running_mean.clone()
    pool(x)                                                                # no update unless asked
    torch.testing.assert_close(pool.running_mean, before)
    mlp = ClsPooling(6, "prenorm_mlp", hidden_dim=10)
    assert mlp.out_dim == 10 and mlp(x).shape == (4, 10)
    weights = torch.zeros(4, 12)
    weights[:, :3] = 1.0                                                   # pool only the first 3 tokens
    torch.testing.assert_close(mlp.pool(x, weights), mlp.phi(flatten_tokens(x)[:, :3]).mean(dim=1))
    with pytest.raises(ValueError):
        ClsPooling(6, "attention")
    with pytest.raises(ValueError):
        mlp.pool(x, torch.ones(4, 5))


def _synthetic_volumes(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` different CT-like volumes (alice_synth_data's generator), z-scored like nnU-Net's CT normalisation."""
    import numpy as np

    from nnunet_alice.demo.synthetic import synthetic_case

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = synthetic_case(rng, (size + 8, size + 8, size + 8))[0].astype(np.float32)
        img = img[:size, :size, :size]
        out.append((img - img.mean()) / img.std())
    return torch.from_numpy(np.stack(out)[:, None])


def _mean_pairwise_cosine(v: torch.Tensor) -> float:
    v = F.normalize(v.float(), dim=-1)
    c = v @ v.t()
    n = c.shape[0]
    return float((c.sum() - n) / (n * (n - 1)))


@pytest.mark.parametrize("build", [_plain, _resenc])
def test_cls_tells_volumes_apart_at_initialisation(build):
    """Over 8 different volumes at initialisation: mean pairwise cosine of the CLS embeddings < 0.9 and the
    teacher's target entropy inside (0.05, 0.95) ln K at the configured step-0 temperature, for both centrings.
    The plain pool of the normed bottleneck output (``mean``, the earlier mapping) is the control that fails; the
    per-token MLP on that same output (``mlp``) passes."""
    import math

    from alice_fixtures import schedules_for, tiny_config
    from nnunet_alice.pretrain.objectives.alice import AliceObjective

    calib, vols = _synthetic_volumes(8, 32, seed=1), _synthetic_volumes(8, 32, seed=2)
    k = 512
    results = {}
    for mode in ("prenorm_mlp", "prenorm_mean", "mlp", "mean"):
        cfg = tiny_config(cls_pool=mode, head_hidden_dim=256, head_bottleneck_dim=64, head_out_dim=k,
                          patch_size=[32, 32, 32])
        obj = AliceObjective(_he_init(build(), 0), cfg, schedules_for(cfg))
        teacher = obj.teacher.module                                      # the branch that sees unmasked views
        seen = []
        teacher.head.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        with torch.no_grad():
            teacher.encode(calib, need_tokens=False)                      # standardisation from other volumes
            out = teacher.encode(vols, need_tokens=False)
        cls_in = seen[-1]                                                 # the CLS vector the head receives
        temp = float(obj.schedules.teacher_temp[0])
        entropy = {}
        for centering in ("sinkhorn", "center"):
            obj.cls_loss.centering = centering
            p = obj.cls_loss._targets(out["cls"].float(), temp)
            entropy[centering] = float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean()) / math.log(k)
        results[mode] = (_mean_pairwise_cosine(cls_in), entropy)
    for mode in ("prenorm_mlp", "prenorm_mean", "mlp"):
        cos, entropy = results[mode]
        assert cos < 0.9, (mode, results)
        assert 0.05 < entropy["sinkhorn"] < 0.95, (mode, results)             # the default centring
    assert 0.05 < results["prenorm_mlp"][1]["center"] < 0.95, results        # default pool, DINO centre at 0
    assert results["mean"][0] > 0.9, results            # InstanceNorm centred it: nearly one vector for all


def test_relative_spread_reads_how_much_the_pooled_cls_varies_between_inputs():
    g = torch.Generator().manual_seed(0)
    varied, constant = ClsPooling(6, "prenorm_mean", momentum=0.0), ClsPooling(6, "prenorm_mean", momentum=0.0)
    varied(torch.randn(8, 6, 2, 2, 2, generator=g))                        # zero-mean inputs: all variation
    constant(5.0 + 0.01 * torch.randn(8, 6, 2, 2, 2, generator=g))         # a common vector, tiny variation
    assert float(varied.relative_spread()) > 0.7
    assert float(constant.relative_spread()) < 0.01


def test_mlp_pool_does_not_depend_on_the_scale_or_bias_of_the_conv_before_the_norm():
    """``mlp`` reads the bottleneck output: rescaling the last bottleneck conv and shifting its bias changes
    nothing (InstanceNorm removes both), while the pre-norm pool moves with them."""
    from alice_fixtures import schedules_for, tiny_config
    from nnunet_alice.pretrain.objectives.alice import AliceObjective
    from nnunet_alice.pretrain.objectives.heads import prenorm_conv

    x = _synthetic_volumes(4, 32, seed=3)
    out = {}
    for mode in ("mlp", "prenorm_mlp"):
        cfg = tiny_config(cls_pool=mode, patch_size=[32, 32, 32])
        obj = AliceObjective(_he_init(_plain(), 0), cfg, schedules_for(cfg))
        student = obj.student
        with torch.no_grad():
            before = student.cls_pool.pool(_read_cls_map(student, x))
            conv = prenorm_conv(student.network)
            conv.weight.mul_(3.0)
            conv.bias.add_(1.0)
            after = student.cls_pool.pool(_read_cls_map(student, x))
        out[mode] = float((after - before).abs().max())
    assert out["mlp"] < 1e-3 < out["prenorm_mlp"], out


def _read_cls_map(student, x):
    """The map the CLS pool of ``student`` reads for input ``x``."""
    from nnunet_alice.pretrain.objectives.heads import cls_features

    f = student._features(x)
    return cls_features(student.cls_pool, f, student._prenorm)
