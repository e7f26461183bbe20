"""alice_benchmark arms: init-matched controls, shared and per-seed pretraining, the long budget's matrix and the
probe column (fake command runner, tests/bench_fakes.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path


from nnunet_alice.harness import report as bench_report
from nnunet_alice.harness.config import METHODS, get_budget
from nnunet_alice.harness.cli import Benchmark
from bench_fakes import fake_env  # noqa: F401 (a fixture)
from bench_fakes import FakeRunner, arg, bench, cell_method, read_csv, tool_of


def test_controls_share_initial_weights_and_pretraining(fake_env):
    """scratch_recipe and init0 (controls) and alice_all (load scope all) reuse what the other arms made."""
    runner = FakeRunner()
    b = bench(runner, methods=("scratch", "scratch_recipe", "init0", "alice", "alice_all"), labels=("1",),
              seeds=(0, 1, 2))
    rows = b.run()
    assert len(rows) == 15 and all(r["status"] == "ok" for r in rows)
    pre = [argv for argv, _ in runner.calls if argv[0] == "alice_pretrain"]
    assert sorted(arg(argv, "--seed") for argv in pre) == ["0", "1", "2"]  # alice only; alice_all shares it
    trains = {(cell_method(env), int(env["nnUNet_alice_bench_seed"])): env
              for argv, env in runner.calls if argv[0] == "nnUNetv2_train"}
    for seed in (0, 1, 2):
        env = {m: trains[(m, seed)] for m in ("scratch", "scratch_recipe", "init0", "alice", "alice_all")}
        assert len({e["nnUNet_alice_bench_init"] for e in env.values()}) == 1
        assert env["scratch_recipe"]["nnUNet_alice_pretrained"] == "none"
        assert env["scratch_recipe"]["nnUNet_alice_bench_recipe"] == "pretrained"
        assert env["init0"]["nnUNet_alice_pretrained"] == b.init_file(seed)
        assert env["alice_all"]["nnUNet_alice_pretrained"] == env["alice"]["nnUNet_alice_pretrained"] == \
            b.checkpoint("alice", seed)
        assert (env["alice_all"]["nnUNet_alice_load"], env["alice"]["nnUNet_alice_load"]) == ("all", "encoder")
    assert {r["recipe"] for r in rows if r["method"] == "scratch"} == {"nnunet"}
    assert METHODS["alice_sawtooth"].schedule == "sawtooth" and METHODS["alice_sawtooth"].shares == "alice"


def test_pretrained_arm_under_nnunets_schedule_shares_the_checkpoint(fake_env):
    """alice_nnunet: the alice checkpoint fine-tuned with nnU-Net's own schedule; results.md says who used what."""
    runner = FakeRunner()
    b = bench(runner, methods=("scratch", "alice", "alice_nnunet"), labels=("1",), seeds=(0, 1))
    rows = b.run()
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    assert sorted(arg(argv, "--seed") for argv, _ in runner.calls if argv[0] == "alice_pretrain") == ["0", "1"]
    trains = {(cell_method(env), int(env["nnUNet_alice_bench_seed"])): env
              for argv, env in runner.calls if argv[0] == "nnUNetv2_train"}
    for seed in (0, 1):
        ours, theirs = trains[("alice_nnunet", seed)], trains[("alice", seed)]
        assert ours["nnUNet_alice_pretrained"] == theirs["nnUNet_alice_pretrained"] == b.checkpoint("alice", seed)
        assert (ours["nnUNet_alice_bench_recipe"], theirs["nnUNet_alice_bench_recipe"]) == ("nnunet", "pretrained")
    sentence = bench_report.recipes_sentence(rows)
    parts = sentence.split(";")
    assert len(parts) == 2
    nnunet_part, = (p for p in parts if "nnU-Net's own schedule" in p)
    pretrained_part, = (p for p in parts if "pretrained weights" in p)
    assert "`scratch`" in nnunet_part and "`alice_nnunet`" in nnunet_part
    assert "`alice`" in pretrained_part
    assert "`alice_nnunet`" not in pretrained_part
    assert sentence in Path(b.out, "results.md").read_text()


def test_whole_network_arm_under_nnunets_schedule(fake_env):
    """alice_all_nnunet is stock nnU-Net's -pretrained_weights: alice's checkpoint, encoder + decoder loaded,
    nnU-Net's own schedule, no second pretraining; the recipes sentence tells it apart from alice_nnunet."""
    runner = FakeRunner()
    b = bench(runner, methods=("scratch", "alice", "alice_nnunet", "alice_all_nnunet"), labels=("1",), seeds=(0,))
    rows = b.run()
    assert [r["status"] for r in rows] == ["ok"] * 4
    assert len([argv for argv, _ in runner.calls if argv[0] == "alice_pretrain"]) == 1
    trains = {cell_method(env): (argv, env) for argv, env in runner.calls if argv[0] == "nnUNetv2_train"}
    ours, encoder_only = trains["alice_all_nnunet"][1], trains["alice_nnunet"][1]
    assert ours["nnUNet_alice_pretrained"] == encoder_only["nnUNet_alice_pretrained"] == b.checkpoint("alice", 0)
    assert (ours["nnUNet_alice_load"], encoder_only["nnUNet_alice_load"]) == ("all", "encoder")
    assert ours["nnUNet_alice_bench_recipe"] == "nnunet" and arg(trains["alice_all_nnunet"][0], "-tr") == \
        "nnUNetTrainerAlice_bench"
    parts = bench_report.recipes_sentence(rows).split(";")
    whole, = (p for p in parts if "`alice_all_nnunet`" in p)
    assert "nnU-Net's own schedule" in whole and "encoder + decoder loaded" in whole and "`alice_nnunet`" not in whole
    assert any("`alice_nnunet`" in p and "`scratch`" in p and "decoder loaded" not in p for p in parts)


def test_encoder_lr_arms_pass_their_peak_and_schedule(fake_env, monkeypatch):
    """alice_enclr reuses alice's checkpoint under the encoder-LR trainer at peak 1e-2; scratch_enclr is its
    from-scratch control; arms without a peak of their own leave the recipe's; results.md names both recipes."""
    monkeypatch.delenv("nnUNet_alice_lr", raising=False)
    runner = FakeRunner()
    b = bench(runner, methods=("scratch", "alice", "alice_enclr", "scratch_enclr"), labels=("1",), seeds=(0,))
    rows = b.run()
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert [arg(argv, "--seed") for argv, _ in runner.calls if argv[0] == "alice_pretrain"] == ["0"]
    trains = {cell_method(env): (argv, env) for argv, env in runner.calls if argv[0] == "nnUNetv2_train"}
    for m in ("alice_enclr", "scratch_enclr"):
        argv, env = trains[m]
        assert arg(argv, "-tr") == "nnUNetTrainerAlice_encLR_bench"
        assert (env["nnUNet_alice_lr"], env["nnUNet_alice_bench_recipe"]) == ("0.01", "pretrained")
    assert trains["alice_enclr"][1]["nnUNet_alice_pretrained"] == trains["alice"][1]["nnUNet_alice_pretrained"]
    assert trains["scratch_enclr"][1]["nnUNet_alice_pretrained"] == "none"
    assert "nnUNet_alice_lr" not in trains["alice"][1] and arg(trains["alice"][0], "-tr") == "nnUNetTrainerAlice_bench"
    sentence = bench_report.recipes_sentence(rows)
    enclr_part, = (p for p in sentence.split(";") if "`alice_enclr`" in p)
    assert "peak 0.01" in enclr_part and "encoder at 0.1 x" in enclr_part and "`scratch_enclr`" in enclr_part
    assert "`alice`" not in enclr_part
    assert {r["peak_lr"] for r in rows if r["method"].endswith("enclr")} == {0.01}
    assert sentence in Path(b.out, "results.md").read_text()


def test_sawtooth_arm_at_nnunets_peak(fake_env, monkeypatch):
    """alice_sawtooth_1e2 fine-tunes alice's checkpoint under the sawtooth trainer at peak 1e-2 (no second
    pretraining); alice_sawtooth keeps the recipe's own peak; the report names the schedule and the peak."""
    monkeypatch.delenv("nnUNet_alice_lr", raising=False)
    runner = FakeRunner()
    b = bench(runner, methods=("alice", "alice_sawtooth", "alice_sawtooth_1e2"), labels=("1",), seeds=(0,))
    rows = b.run()
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert len([argv for argv, _ in runner.calls if argv[0] == "alice_pretrain"]) == 1
    trains = {cell_method(env): (argv, env) for argv, env in runner.calls if argv[0] == "nnUNetv2_train"}
    for m in ("alice_sawtooth", "alice_sawtooth_1e2"):
        assert arg(trains[m][0], "-tr") == "nnUNetTrainerAlice_sawtooth_bench"
        assert trains[m][1]["nnUNet_alice_pretrained"] == trains["alice"][1]["nnUNet_alice_pretrained"]
    assert trains["alice_sawtooth_1e2"][1]["nnUNet_alice_lr"] == "0.01"
    assert "nnUNet_alice_lr" not in trains["alice_sawtooth"][1]
    part, = (p for p in bench_report.recipes_sentence(rows).split(";") if "`alice_sawtooth_1e2`" in p)
    assert "peak 0.01" in part and "sawtooth" in part and "`alice_sawtooth`" not in part


def test_one_pretraining_per_arm_when_the_budget_says_so(fake_env):
    runner = FakeRunner()
    budget = get_budget("tiny", labels=["1"], seeds=[0, 1, 2], pretrain_per_seed=False)
    b = Benchmark("993", budget, methods=["scratch", "alice"], runner=runner, echo=lambda s: None)
    b.run()
    assert [arg(argv, "--seed") for argv, _ in runner.calls if argv[0] == "alice_pretrain"] == ["0"]
    assert [arg(argv, "--seed") for argv, _ in runner.calls if tool_of(argv) == "init"] == ["0"]
    inits = {env["nnUNet_alice_bench_init"] for argv, env in runner.calls if argv[0] == "nnUNetv2_train"}
    assert inits == {b.init_file(0)}
    assert "once per arm, from the initial weights of seed 0" in Path(b.out, "results.md").read_text()


def test_pretrain_per_seed_flag_overrides_the_budget(fake_env):
    """``--pretrain-per-seed`` turns the long budget's one shared pretraining into one per seed, each from the
    seed's own initial weights; scratch cells then start from their seed's weights too."""
    from nnunet_alice.harness.cli import build_parser

    args = build_parser().parse_args(["--budget", "long", "--pretrain-per-seed", "--seeds", "1", "2"])
    assert args.pretrain_per_seed is True and build_parser().parse_args([]).pretrain_per_seed is None
    assert build_parser().parse_args(["--no-pretrain-per-seed"]).pretrain_per_seed is False
    runner = FakeRunner()
    budget = get_budget("long", labels=["1"], seeds=args.seeds, pretrain_per_seed=args.pretrain_per_seed)
    b = Benchmark("993", budget, methods=["scratch", "alice_nnunet"], runner=runner, echo=lambda s: None)
    b.run()
    assert sorted(arg(argv, "--seed") for argv, _ in runner.calls if argv[0] == "alice_pretrain") == ["1", "2"]
    inits = sorted(env["nnUNet_alice_bench_init"] for argv, env in runner.calls if argv[0] == "nnUNetv2_train")
    assert inits == sorted([b.init_file(1)] * 2 + [b.init_file(2)] * 2)
    assert get_budget("long", pretrain_per_seed=None).pretrain_per_seed is False


def test_long_budget_run_matrix(fake_env):
    """--budget long: scratch, alice_nnunet, mae_nnunet x labels 1 / all x seeds 0-2; one 3,000-step pretraining
    per objective (from seed 0's draw); 3,000 fine-tuning iterations per cell under nnU-Net's schedule."""
    runner = FakeRunner()
    b = Benchmark("993", get_budget("long"), runner=runner, echo=lambda s: None)
    rows = b.run()
    assert len(rows) == 18 and all(r["status"] == "ok" for r in rows)
    assert {(r["method"], r["seed"]) for r in rows} == {(m, s) for m in ("scratch", "alice_nnunet", "mae_nnunet")
                                                         for s in (0, 1, 2)}
    assert len({r["labels"] for r in rows}) == 2
    pre = [argv for argv, _ in runner.calls if argv[0] == "alice_pretrain"]
    assert sorted("--objective" in argv and arg(argv, "--objective") == "mae" for argv in pre) == [False, True]
    assert {(arg(argv, "--steps"), arg(argv, "--seed")) for argv in pre} == {("3000", "0")}
    trains = [env for argv, env in runner.calls if argv[0] == "nnUNetv2_train"]
    assert len(trains) == 18
    assert {(int(e["nnUNet_alice_bench_epochs"]) * int(e["nnUNet_alice_bench_iterations"]),
             e["nnUNet_alice_bench_recipe"]) for e in trains} == {(3000, "nnunet")}


def test_probe_column(fake_env, monkeypatch):
    import nnunet_alice.harness.cli as benchmark

    monkeypatch.setattr(benchmark, "probe_available", lambda: True)
    runner = FakeRunner()
    b = bench(runner, methods=("scratch", "init0", "alice", "alice_all"), labels=("1",), seeds=(0,), probe=True)
    rows = b.run()
    probes = [argv for argv, _ in runner.calls if tool_of(argv) == "probe"]
    # one probe per starting checkpoint: alice and alice_all share one; scratch and init0 share the initial
    # weights (scratch loads them as its initialisation)
    assert sorted(arg(argv, "--checkpoint") for argv in probes) == sorted([b.checkpoint("alice", 0), b.init_file(0)])
    assert {arg(argv, "--features") for argv in probes} == {"encoder"}
    got = {r["method"]: r.get("probe_dice") for r in rows}
    assert got["scratch"] == got["alice"] == got["alice_all"] == got["init0"] == 0.3
    text = Path(b.out, "results.md").read_text()
    assert "Linear probe" in text and "encoder features" in text
    table = {r["method"]: r for r in read_csv(os.path.join(b.out, "results.csv"))}
    assert table["scratch"]["probe_dice"] == "0.3000" and table["alice"]["probe_features"] == "encoder"
    # a finished cell probed with the old (decoder) features is probed again on resume, the cell is not retrained
    metrics = Path(b.cell_dir("alice", 1, 0), "metrics.json")
    old = json.loads(metrics.read_text())
    metrics.write_text(json.dumps({**old, "probe_features": "decoder"}))
    for f in Path(b.out, "probe").rglob("*.json"):
        f.unlink()
    runner.calls.clear()
    b.run()
    assert [tool_of(argv) for argv, _ in runner.calls].count("probe") == 1  # alice's checkpoint, re-probed once
    assert not [argv for argv, _ in runner.calls if argv[0] == "nnUNetv2_train"]


def test_probe_step_calls_the_probe_interface(tmp_path, monkeypatch):
    import sys
    import types

    from nnunet_alice.harness import steps as bench_steps

    calls = []
    fake = types.ModuleType("nnunet_alice.probe.cli")
    fake.probe_checkpoint = lambda *a, **kw: calls.append((a, kw)) or {"mean_dice": 0.42, "dice": {"1": 0.4},
                                                                         "tensor": object()}
    monkeypatch.setitem(sys.modules, "nnunet_alice.probe.cli", fake)
    monkeypatch.setattr(bench_steps, "probe_available", lambda: True)
    out = tmp_path / "p" / "probe.json"
    assert bench_steps.main(["probe", "-d", "993", "-p", "P", "-c", "3d_fullres", "--checkpoint", "ck.pth",
                             "--labels", "2", "--seed", "1", "-o", str(out)]) == 0
    assert calls[0][0] == ("993", "3d_fullres", "P", "ck.pth", 2, 1) and calls[0][1]["features"] == "decoder"
    assert json.loads(out.read_text()) == {"mean_dice": 0.42, "dice": {"1": 0.4}}  # plain values only


def test_norecon_ablation_arm_pretrains_without_reconstruction(fake_env):
    """``alice_norecon_nnunet``: the ablation of the long budget pretrains once with ``--no-recon`` (under the
    ``alice_norecon`` name, so a later ``alice_norecon`` arm reuses it) and fine-tunes under nnU-Net's schedule."""
    runner = FakeRunner()
    budget = get_budget("long", labels=["1"], seeds=[0, 1])
    b = Benchmark("993", budget, methods=["alice_norecon_nnunet"], runner=runner, echo=lambda s: None)
    rows = b.run()
    assert [r["status"] for r in rows] == ["ok", "ok"]
    pre = [argv for argv, _ in runner.calls if argv[0] == "alice_pretrain"]
    assert len(pre) == 1 and "--no-recon" in pre[0] and "--objective" not in pre[0]
    assert b.pretrain_key("alice_norecon_nnunet") == "alice_norecon"
    trains = [env for argv, env in runner.calls if argv[0] == "nnUNetv2_train"]
    assert {e["nnUNet_alice_bench_recipe"] for e in trains} == {"nnunet"}
    assert all(e["nnUNet_alice_pretrained"] != "none" for e in trains)


def test_x4_arm_pretrains_four_times_the_budgets_steps(fake_env):
    """``alice_x4_nnunet``: one pretraining under the ``alice_x4`` name with four times the budget's steps and the
    default objective; the cells fine-tune from it under nnU-Net's schedule. ``alice`` keeps the budget's steps."""
    runner = FakeRunner()
    budget = get_budget("long", labels=["1"], seeds=[0])
    b = Benchmark("993", budget, methods=["alice_nnunet", "alice_x4_nnunet"], runner=runner, echo=lambda s: None)
    rows = b.run()
    assert [r["status"] for r in rows] == ["ok", "ok"]
    steps = {os.path.basename(os.path.dirname(env["nnUNet_results"])): int(argv[argv.index("--steps") + 1])
             for argv, env in runner.calls if argv[0] == "alice_pretrain"}
    assert steps == {"alice": budget.pretrain_steps, "alice_x4": 4 * budget.pretrain_steps}
    assert b.pretrain_key("alice_x4_nnunet") == "alice_x4"
    trains = [env for argv, env in runner.calls if argv[0] == "nnUNetv2_train"]
    assert {e["nnUNet_alice_bench_recipe"] for e in trains} == {"nnunet"}
