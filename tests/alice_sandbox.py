"""A private, cheap copy of the session's preprocessed synthetic dataset for the robustness tests.

``make_sandbox`` copies ``$nnUNet_preprocessed/<Dataset>`` of the ``synth_dataset`` fixture (≈ 300 kB) into a
temp folder, so tests may break it (remove dataset.json, add files) without touching what other tests use, and
adds:

* ``nnUNetPlansAliceTiny.json``: the planned 3d_fullres configuration with features 4-8-16-32 instead of
  32-...-256 (same data identifier, so the preprocessed cases are shared): a step takes ~0.1 s on a CPU;
* ``splits_final.json``: one 3/1 split (nnU-Net's 5-fold split needs at least 5 cases).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

TINY_PLANS = "nnUNetPlansAliceTiny"
TINY_FEATURES = [4, 8, 16, 32]


@dataclass
class Sandbox:
    root: Path
    raw: Path
    preprocessed: Path
    results: Path
    dataset_id: int
    dataset_name: str

    @property
    def dataset(self) -> Path:
        return self.preprocessed / self.dataset_name

    def env(self) -> Dict[str, str]:
        return {"nnUNet_raw": str(self.raw), "nnUNet_preprocessed": str(self.preprocessed),
                "nnUNet_results": str(self.results), "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1",
                "nnUNet_compile": "0", "OMP_NUM_THREADS": "1"}  # one thread: far faster on a busy shared CPU

    def apply(self, monkeypatch) -> "Sandbox":
        for k, v in self.env().items():
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("nnUNet_alice_pretrained", raising=False)
        return self

    def plans(self, name: str = TINY_PLANS) -> dict:
        with open(self.dataset / f"{name}.json") as f:
            return json.load(f)

    def dataset_json(self) -> dict:
        with open(self.dataset / "dataset.json") as f:
            return json.load(f)

    def case_ids(self) -> List[str]:
        folder = self.dataset / "nnUNetPlans_3d_fullres"
        return sorted(p.name[:-5] for p in folder.glob("*.b2nd") if not p.name.endswith("_seg.b2nd"))


def make_sandbox(synth_dataset, dest: Path) -> Sandbox:
    dest = Path(dest)
    box = Sandbox(dest, Path(synth_dataset.raw), dest / "preprocessed", dest / "results",
                  synth_dataset.dataset_id, synth_dataset.dataset_name)
    box.preprocessed.mkdir(parents=True, exist_ok=True)
    box.results.mkdir(parents=True, exist_ok=True)
    shutil.copytree(synth_dataset.preprocessed_dataset, box.dataset,
                    ignore=shutil.ignore_patterns("alice_unlabeled", "alice_matching"))
    plans = box.plans("nnUNetPlans")
    plans["plans_name"] = TINY_PLANS
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = list(TINY_FEATURES)
    _write_json(box.dataset / f"{TINY_PLANS}.json", plans)
    ids = box.case_ids()
    _write_json(box.dataset / "splits_final.json", [{"train": ids[:-1], "val": ids[-1:]}])
    return box


def _write_json(path: Path, obj) -> None:
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def pretrain_config(box: Sandbox, objective: str = "mae", steps: int = 4, **overrides):
    """A cheap, deterministic pretraining config on the tiny plans (16³ views, batch 1, no augmentation)."""
    from nnunet_alice.pretrain.config import PretrainConfig

    kw = dict(dataset_name=box.dataset_name, plans=TINY_PLANS, objective=objective, steps=steps, device="cpu",
              patch_size=[16, 16, 16], batch_size=1, save_every=2, log_every=1, num_workers=0, augment=False)
    if objective == "alice":
        kw.update(head_hidden_dim=32, head_bottleneck_dim=16, head_out_dim=32, mask_block_size=8, casa_heads=2)
    kw.update(overrides)
    return PretrainConfig(**kw).validate()


def cli_args(box: Sandbox, *extra: str, steps: int = 1) -> List[str]:
    """``alice_pretrain`` arguments for the same cheap MAE run."""
    return ["-d", str(box.dataset_id), "-p", TINY_PLANS, "-device", "cpu", "--objective", "mae", "--steps",
            str(steps), "--patch-size", "16", "16", "16", "--batch-size", "1", "--no-augment", "--num-workers", "0",
            *extra]
