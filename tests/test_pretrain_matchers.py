"""``alice_pretrain --matcher registration | embedding`` on the tiny plans of ``alice_sandbox``: the matcher
prepares its per-case cache once, views are mined across volumes, and the checkpoint and the log record the
matcher and its fallback rate. A missing embedding model stops the CLI with one line naming ``alice_embed``."""
from __future__ import annotations

import glob
import os
import re
from pathlib import Path

import pytest
import torch

from alice_sandbox import TINY_PLANS, cli_args, make_sandbox, pretrain_config
from nnunet_alice.checkpoint import load_checkpoint
from nnunet_alice.pretrain.training.run import PretrainRun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sandbox(synth_dataset, tmp_path_factory):
    return make_sandbox(synth_dataset, tmp_path_factory.mktemp("matchers"))


@pytest.fixture
def box(sandbox, monkeypatch, tmp_path):
    sandbox.apply(monkeypatch)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    return sandbox


def _run(box, matcher: str, steps: int = 3):
    cfg = pretrain_config(box, objective="alice", steps=steps, matcher=matcher)   # logs every step
    path = PretrainRun(cfg).run()
    ckpt = load_checkpoint(path)
    log = Path(path).parent / "training_log.txt"
    return ckpt, log.read_text()


def _fallback_rates(log_text: str):
    return [float(v) for v in re.findall(r"fallback_rate ([0-9.eE+-]+)", log_text)]


def test_registration_matcher_in_pretraining(box):
    ckpt, log = _run(box, "registration")
    stats = ckpt["metadata"]["matcher_stats"]
    assert stats["matcher"] == "registration"
    rates = _fallback_rates(log)
    assert len(rates) == 3 and all(0.0 <= r <= 1.0 for r in rates)           # one per logged step
    assert stats["fallback_rate"] == pytest.approx(sum(rates) / len(rates), abs=1e-4)
    cached = glob.glob(str(box.dataset / "alice_matching" / "**" / "*"), recursive=True)
    assert any(os.path.isfile(p) for p in cached)                              # transforms cached once per case


def test_embedding_matcher_in_pretraining_after_alice_embed(box):
    from nnunet_alice.embedding.cli import main as alice_embed

    threads = torch.get_num_threads()
    try:
        alice_embed(["-d", str(box.dataset_id), "-c", "3d_fullres", "-p", TINY_PLANS, "--steps", "2",
                     "-device", "cpu", "--crop", "16", "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    model_folder = Path(os.environ["nnUNet_results"], box.dataset_name, f"AliceEmbed__{TINY_PLANS}__3d_fullres")
    assert (model_folder / "checkpoint_final.pth").is_file()
    embedded = glob.glob(str(box.dataset / "alice_embeddings" / "*" / "*.npz"))
    assert len(embedded) == len(box.case_ids())

    ckpt, log = _run(box, "embedding")
    stats = ckpt["metadata"]["matcher_stats"]
    assert stats["matcher"] == "embedding" and 0.0 <= stats["fallback_rate"] <= 1.0
    assert len(_fallback_rates(log)) == 3
    # pretraining reused the cache alice_embed wrote: no new embedding files
    assert sorted(glob.glob(str(box.dataset / "alice_embeddings" / "*" / "*.npz"))) == sorted(embedded)


def test_embedding_matcher_without_a_model_is_one_line_and_writes_nothing(box, capsys):
    from nnunet_alice.pretrain.cli import main

    results = Path(os.environ["nnUNet_results"])
    with pytest.raises(SystemExit) as e:
        main(cli_args(box, "--objective", "alice", "--matcher", "embedding"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert f"alice_embed -d {box.dataset_name} -c 3d_fullres -p {TINY_PLANS}" in err
    assert not list(results.glob(f"{box.dataset_name}/AlicePretrain__*/*.pth"))


@pytest.mark.parametrize("overrides,expected", [
    ({"match_threshold": 1.5}, "--match-threshold must be in [-1, 1]"),
    ({"match_tries": 0}, "--match-tries must be >= 1"),
    ({"matcher": "sam"}, "--matcher must be one of"),
])
def test_bad_matcher_settings_are_refused(overrides, expected):
    from nnunet_alice.errors import AliceError
    from nnunet_alice.pretrain.config import PretrainConfig

    with pytest.raises(AliceError) as e:
        PretrainConfig(objective="alice", **overrides).validate()
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_match_options_reach_the_config(box):
    from nnunet_alice.pretrain.cli import build_parser, config_from_args

    args = build_parser().parse_args(["-d", str(box.dataset_id), "-p", TINY_PLANS, "--matcher", "registration",
                                      "--match-threshold", "0.5", "--match-tries", "7"])
    cfg = config_from_args(args)
    assert (cfg.matcher, cfg.match_threshold, cfg.match_tries) == ("registration", 0.5, 7)
