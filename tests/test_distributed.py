"""Data-parallel equivalence: one Alice step on 2 gloo ranks == one step on 1 rank with the same global batch."""
import os
import re
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alice_fixtures import alice_batch, schedules_for, tiny_config, tiny_network
from nnunet_alice.pretrain.training.distributed import data_parallel
from nnunet_alice.pretrain.training.step import parameter_groups, train_step
from nnunet_alice.pretrain.objectives.alice import AliceObjective

GLOBAL_BATCH = 4
LR, WD, CLIP = 5e-3, 0.04, 3.0


def _build(use_casa: bool):
    cfg = tiny_config(casa_dropout=0.0, use_casa=use_casa)  # dropout draws differ per rank; all else must match
    torch.manual_seed(1)
    obj = AliceObjective(tiny_network(seed=0), cfg, schedules_for(cfg))
    opt = torch.optim.AdamW(parameter_groups(obj.student_modules()), lr=LR)
    return obj, opt


def _state(obj):
    state = {k: v.detach().clone() for k, v in obj.state_dict().items()}
    state.update({"grad." + k: p.grad.detach().clone() for k, p in obj.named_parameters() if p.grad is not None})
    return state


def _worker(rank, world, port, out_file, use_casa):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        obj, opt = _build(use_casa)
        ddp = data_parallel(obj, torch.device("cpu"))  # what alice_pretrain wraps the objective in
        full = alice_batch(GLOBAL_BATCH, seed=5)
        per = GLOBAL_BATCH // world
        local = {k: v[rank * per:(rank + 1) * per] for k, v in full.items()}
        train_step(obj, ddp, opt, local, 0, LR, WD, CLIP, torch.device("cpu"))
        if rank == 0:
            torch.save(_state(obj), out_file)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("use_casa", [False, True], ids=["without_casa", "with_casa"])
def test_two_ranks_match_one_rank(tmp_path, use_casa):
    """Without CASA the CASA layer and token projections get no gradient: DDP must still average
    every other gradient (training/distributed.py)."""
    out_file = str(tmp_path / "ddp_state.pt")
    mp.start_processes(_worker, args=(2, _free_port(), out_file, use_casa), nprocs=2, join=True,
                       start_method="fork" if "fork" in mp.get_all_start_methods() else "spawn")
    ddp_state = torch.load(out_file, weights_only=True)

    torch.set_num_threads(1)
    obj, opt = _build(use_casa)
    before = _state(obj)
    train_step(obj, obj, opt, alice_batch(GLOBAL_BATCH, seed=5), 0, LR, WD, CLIP, torch.device("cpu"))
    single = _state(obj)

    changed = [k for k in single if k.startswith("student.") and not torch.equal(before[k], single[k])]
    assert len(changed) > 10, "the reference step must actually change the student"
    grads = [k for k in single if k.startswith("grad.")]
    g1 = torch.cat([single[k].flatten() for k in grads])
    g2 = torch.cat([ddp_state[k].flatten() for k in grads])
    assert float((g1 - g2).norm() / g1.norm()) < 1e-5  # averaged DDP gradients == full-batch gradients
    # a conv bias in front of an instance norm has gradient 0 up to rounding, and Adam turns that rounding into a
    # full-size step of either sign: those biases (and their EMA in the teacher) are not compared
    zero = {n for n, p in obj.named_parameters(remove_duplicate=False)
            if re.search(r"network\.(encoder|decoder)\..*(\.conv|all_modules\.0)\.bias$", n)}
    assert zero and all(float(p.grad.abs().max()) < 1e-6 for n, p in obj.named_parameters()
                        if n in zero and p.grad is not None)
    zero |= {"teacher.module." + k[len("student."):] for k in zero if k.startswith("student.")}
    for k, v in single.items():
        if not k.startswith("grad.") and ".queue" not in k and not k.startswith("koleo.bank") and k not in zero:
            assert torch.allclose(v.float(), ddp_state[k].float(), rtol=1e-4, atol=1e-5), k
    # each rank keeps its own KoLeo memory (DINOv2's KoLeo is per GPU too) and queues its own rows (SwAV's queue);
    # Sinkhorn-Knopp sums over all ranks' queues
    assert int(single["koleo.bank_len"]) == 2 * int(ddp_state["koleo.bank_len"]) > 0
    assert int(single["cls_loss.queue_len"]) == 2 * int(ddp_state["cls_loss.queue_len"]) > 0
    local = ddp_state["cls_loss.queue"][: int(ddp_state["cls_loss.queue_len"])]
    assert all(any(torch.allclose(row, other, atol=1e-5) for other in single["cls_loss.queue"]) for row in local)
    # the centres saw the whole global batch on both sides
    assert torch.allclose(single["cls_loss.center"], ddp_state["cls_loss.center"], atol=1e-6)
