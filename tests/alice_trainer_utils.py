"""Helpers for in-process tests of the fine-tuning trainers: a sandbox with a 1-step pretrained checkpoint,
a trainer built like ``nnUNetv2_train`` builds it, and a synthetic batch in nnU-Net's format."""
from __future__ import annotations

import os
from typing import Optional

import pytest
import torch

from alice_sandbox import TINY_PLANS, make_sandbox, pretrain_config


@pytest.fixture(scope="module")
def trainer_box(synth_dataset, tmp_path_factory):
    """``(sandbox, path of a 1-channel MAE checkpoint of the tiny plans)``."""
    from nnunet_alice.pretrain.training.run import PretrainRun

    box = make_sandbox(synth_dataset, tmp_path_factory.mktemp("finetune"))
    with pytest.MonkeyPatch.context() as mp:
        box.apply(mp)
        ckpt = PretrainRun(pretrain_config(box, "mae", steps=1), output_folder=str(box.root / "pretrained")).run()
    return box, ckpt


def make_trainer(cls, box, monkeypatch, pretrained: Optional[str] = "none", dataset_json: Optional[dict] = None,
                 plans_name: str = TINY_PLANS, continue_training: bool = False, fold: int = 0,
                 results: Optional[str] = None):
    """A trainer as ``nnUNetv2_train`` creates it, on the CPU, with ``nnUNet_alice_pretrained=pretrained``
    (``results``: its own ``nnUNet_results``; trainers of one class in one second would share a log file)."""
    box.apply(monkeypatch)
    if results is not None:
        monkeypatch.setenv("nnUNet_results", str(results))
    if pretrained is not None:
        monkeypatch.setenv("nnUNet_alice_pretrained", pretrained)
    plans = box.plans(plans_name)
    plans["continue_training"] = continue_training
    torch.set_num_threads(1)
    return cls(plans, "3d_fullres", fold, dataset_json or box.dataset_json(), torch.device("cpu"))


def synthetic_batch(trainer, seed: int = 0) -> dict:
    """``{"data", "target"}`` like nnU-Net's loader: random image, random labels, deep-supervision pyramid."""
    g = torch.Generator().manual_seed(seed)
    ps = [int(p) for p in trainer.configuration_manager.patch_size]
    n_cls = trainer.label_manager.num_segmentation_heads
    x = torch.randn(trainer.batch_size, trainer.num_input_channels, *ps, generator=g)
    seg = torch.randint(0, n_cls, (trainer.batch_size, 1, *ps), generator=g).float()
    if not trainer.enable_deep_supervision:
        return {"data": x, "target": seg}
    targets = [torch.nn.functional.interpolate(seg, size=[max(1, round(p * s)) for p, s in zip(ps, sc)],
                                               mode="nearest") for sc in trainer._get_deep_supervision_scales()]
    return {"data": x, "target": targets}


def write_malicious_checkpoint(path: str, marker: str) -> None:
    """A checkpoint whose unpickling would run ``touch marker`` (``torch.load(weights_only=False)`` would)."""

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"network_weights": {"w": torch.zeros(1)}, "current_epoch": 1, "extra": Payload()}, path)
