"""DINO head, token projection and CLS pooling (alice-method Sec. 2.3, issue 3 "mapping Alice to a CNN U-Net")."""
import pytest
import torch
from torch.nn import functional as F

from nnunet_alice.pretrain.heads import DinoHead, TokenProjection, flatten_tokens, global_pool_tokens


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
