"""KoLeo spread regulariser against a memory of earlier embeddings (objectives/koleo.py)."""
import math

import pytest
import torch
from torch.nn import functional as F

from nnunet_alice.pretrain.objectives.koleo import KoLeoMemory


def _reference(z: torch.Tensor, memory: torch.Tensor) -> float:
    """DINOv2's KoLeo term written out: -1/n sum_i log min_j ||z_i - m_j||."""
    total = 0.0
    for row in z:
        total += -math.log(min(float((row - m).norm()) for m in memory))
    return total / len(z)


def test_matches_the_written_out_formula_and_fills_a_ring_buffer():
    g = torch.Generator().manual_seed(0)
    koleo = KoLeoMemory(8, memory=5)
    first = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    assert float(koleo(first)) == 0.0                       # nothing to compare with yet
    assert int(koleo.bank_len) == 4
    second = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    got = float(koleo(second))
    assert got == pytest.approx(_reference(second, first), rel=1e-5)
    assert int(koleo.bank_len) == 5                          # ring buffer: the last 5 rows
    kept = torch.cat([first, second])[-5:]
    assert sorted(map(tuple, koleo.bank.tolist())) == sorted(map(tuple, kept.tolist()))
    with pytest.raises(ValueError):
        koleo(torch.randn(4, 7))
    with pytest.raises(ValueError):
        KoLeoMemory(8, memory=0)


def test_its_gradient_moves_an_embedding_away_from_its_nearest_earlier_one():
    koleo = KoLeoMemory(3, memory=4)
    koleo(F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), dim=1))
    z = torch.tensor([[0.9, 0.1, 0.0]], requires_grad=True)
    loss = koleo(F.normalize(z, dim=1))
    loss.backward()
    moved = F.normalize(z.detach() - 0.1 * z.grad, dim=1)
    before = float((F.normalize(z.detach(), dim=1) - torch.tensor([1.0, 0.0, 0.0])).norm())
    assert float((moved - torch.tensor([1.0, 0.0, 0.0])).norm()) > before


def test_the_objective_adds_the_term_only_when_it_is_on():
    from alice_fixtures import alice_batch, schedules_for, tiny_config, tiny_network
    from nnunet_alice.pretrain.objectives.alice import AliceObjective

    cfg = tiny_config(koleo_weight=0.5, use_casa=True)
    obj = AliceObjective(tiny_network(), cfg, schedules_for(cfg))
    obj(alice_batch(2, seed=0), 0)                                     # fills the memory
    total, terms = obj(alice_batch(2, seed=1), 1)
    assert float(terms["koleo"]) != 0.0
    expected = terms["cls"] + terms["casa"] + cfg.lambda_recon * terms["recon"] + 0.5 * terms["koleo"]
    assert torch.allclose(total, expected)
    off = tiny_config(koleo_weight=0.0)
    assert "koleo" not in AliceObjective(tiny_network(), off, schedules_for(off))(alice_batch(2), 0)[1]
    no_cls = tiny_config(use_cls=False, use_casa=True)
    assert "koleo" not in AliceObjective(tiny_network(), no_cls, schedules_for(no_cls))(alice_batch(2), 0)[1]
