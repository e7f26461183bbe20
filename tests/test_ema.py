"""EMA teacher (DINO, arXiv 2104.14294, Sec. 3; docs/method.md "Teacher and losses"): theta_t <- m theta_t + (1 - m)
theta_s, buffers copied, no grads."""
import torch
from torch import nn

from nnunet_alice.pretrain.objectives.ema import EmaTeacher, unwrap


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.Dropout(0.5),
                         nn.InstanceNorm3d(4, affine=True), nn.Conv3d(4, 2, 1))


def _perturb(student):
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        student[1].running_mean.fill_(3.0)
        student[1].num_batches_tracked.fill_(7)


def test_copy_is_frozen_eval_and_independent():
    student = _net()
    teacher = EmaTeacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    teacher.train()
    assert not teacher.module.training                     # always eval: dropout off, deterministic
    x = torch.randn(2, 1, 4, 4, 4, requires_grad=True)
    y1, y2 = teacher(x), teacher(x)
    torch.testing.assert_close(y1, y2)
    assert not y1.requires_grad                             # no graph through the teacher
    for (n, pt), ps in zip(teacher.module.named_parameters(), student.parameters()):
        torch.testing.assert_close(pt, ps)
        assert pt.data_ptr() != ps.data_ptr(), n


def test_update_formula_and_buffers():
    student = _net()
    teacher = EmaTeacher(student)
    before = {n: p.clone() for n, p in teacher.module.named_parameters()}
    _perturb(student)
    m = 0.9
    teacher.update(student, m)
    for n, ps in student.named_parameters():
        expected = m * before[n] + (1 - m) * ps.detach()
        torch.testing.assert_close(dict(teacher.module.named_parameters())[n], expected)
    assert torch.all(teacher.module[1].running_mean == 3.0)
    assert int(teacher.module[1].num_batches_tracked) == 7
    teacher.update(student, 0.0)                            # m = 0: the teacher becomes the student
    for pt, ps in zip(teacher.module.parameters(), student.parameters()):
        torch.testing.assert_close(pt, ps)
    snapshot = [p.clone() for p in teacher.module.parameters()]
    _perturb(student)
    teacher.update(student, 1.0)                            # m = 1: frozen
    for pt, s in zip(teacher.module.parameters(), snapshot):
        torch.testing.assert_close(pt, s)


def test_teacher_receives_no_gradient():
    student = _net()
    teacher = EmaTeacher(student)
    x = torch.randn(2, 1, 4, 4, 4)
    loss = (student(x) - teacher(x)).pow(2).mean()
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_unwrap_ddp_and_compile_like_wrappers():
    student = _net()
    dp = nn.DataParallel(student)                           # same .module contract as DDP
    assert unwrap(dp) is student
    compiled = torch.compile(dp)
    assert unwrap(compiled) is student
    teacher = EmaTeacher(compiled)
    assert set(teacher.state_dict()) == {"module." + k for k in student.state_dict()}
    before = [p.clone() for p in teacher.module.parameters()]
    _perturb(student)
    teacher.update(compiled, 0.5)
    for pt, b, ps in zip(teacher.module.parameters(), before, student.parameters()):
        torch.testing.assert_close(pt, 0.5 * b + 0.5 * ps.detach())


def test_update_ignores_student_only_parameters_and_rejects_mismatch():
    student = _net()
    teacher = EmaTeacher(student)
    student.extra = nn.Linear(2, 2)                         # e.g. a student-only layer
    teacher.update(student, 0.5)
    other = nn.Sequential(nn.Linear(3, 3))
    try:
        teacher.update(other, 0.5)
    except (KeyError, ValueError):
        pass
    else:
        raise AssertionError("an unrelated student must be rejected")


def test_update_through_real_ddp(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        student = _net()
        ddp = DDP(student)
        teacher = EmaTeacher(ddp)
        assert not any(k.startswith("module.module.") for k in teacher.state_dict())
        before = [p.clone() for p in teacher.module.parameters()]
        _perturb(student)
        teacher.update(ddp, 0.25)
        for pt, b, ps in zip(teacher.module.parameters(), before, student.parameters()):
            torch.testing.assert_close(pt, 0.25 * b + 0.75 * ps.detach())
    finally:
        dist.destroy_process_group()


def test_weight_normed_head_is_copied_and_averaged():
    from nnunet_alice.pretrain.objectives.heads import DinoHead

    student = DinoHead(8, 16, 4, 6)
    teacher = EmaTeacher(student)
    v_t = teacher.module.last_layer.parametrizations.weight.original1
    v_s = student.last_layer.parametrizations.weight.original1
    before = v_t.clone()
    with torch.no_grad():
        v_s.mul_(2.0).add_(1.0)
    teacher.update(student, 0.8)
    torch.testing.assert_close(v_t, 0.8 * before + 0.2 * v_s.detach())
    torch.testing.assert_close(teacher.module.last_layer.weight.norm(dim=1), torch.ones(6))   # gain stays 1


def test_modules_that_keep_their_own_buffers():
    """Running statistics of a branch's own inputs (e.g. the CLS standardisation) are not copied from the student."""

    class OwnStats(nn.Module):
        keeps_own_buffers = True

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.register_buffer("running_mean", torch.zeros(3))

    student = nn.Sequential(nn.BatchNorm1d(3), OwnStats())
    teacher = EmaTeacher(student)
    assert teacher.own_buffer_names() == {"1.running_mean"}
    teacher.module[1].running_mean.fill_(5.0)
    student[1].running_mean.fill_(-1.0)
    student[0].running_mean.fill_(2.0)
    with torch.no_grad():
        student[1].lin.weight.add_(1.0)
    teacher.update(student, 0.5)
    assert torch.all(teacher.module[1].running_mean == 5.0)             # kept
    assert torch.all(teacher.module[0].running_mean == 2.0)             # ordinary buffers still follow
    torch.testing.assert_close(teacher.module[1].lin.weight, student[1].lin.weight - 0.5)   # parameters EMA'd
