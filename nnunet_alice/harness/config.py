"""Budgets, methods and the run matrix of ``alice_benchmark``.

A *cell* is one (method, number of labelled cases, seed) fine-tuning run. All arms of one (labels, seed) share
the same nnU-Net fold (the same labelled subset, the same validation cases), the same trainer seed and the same
initial weights (the seed's draw, which pretraining starts from too); they differ only in pretraining and recipe.
The fold index of a (labels, seed) pair is assigned once and stored, so adding label counts or seeds later never
renames finished cells.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional

import numpy as np

from nnunet_alice.errors import AliceError

TRAINER = "nnUNetTrainerAlice_bench"
#: schedule -> harness trainer class (``nnunet_alice.harness.trainers``)
BENCH_TRAINERS = {"default": TRAINER, "sawtooth": "nnUNetTrainerAlice_sawtooth_bench",
                  "encLR": "nnUNetTrainerAlice_encLR_bench"}
CONFIGURATION = "3d_fullres"
#: written by the harness trainers next to checkpoint_final.pth (``nnunet_alice.harness.trainers``)
CURVE_FILE = "learning_curve.json"
#: version of the comparison protocol; a benchmark folder made under another one is not resumed
PROTOCOL = 2


@dataclass(frozen=True)
class Arm:
    """One arm of the comparison.

    ``pretrain``: ``alice_pretrain`` flags (``None``: no pretraining); ``shares``: reuse the pretraining of that
    arm instead of running its own; ``start``: what the fine-tuning loads on top of the seed's initial weights
    (``pretrained``: the arm's checkpoint, ``init``: the initial weights file itself, i.e. zero pretraining
    steps through the same loading path, ``none``: nothing); ``recipe``: ``pretrained`` (peak 1e-3,
    per-iteration warm-up, poly) or ``nnunet`` (nnU-Net's own schedule, SGD 1e-2); ``load_scope``: ``encoder``
    or ``all``; ``schedule``: ``default``, ``sawtooth`` or ``encLR`` (the encoder at 0.1 x the decoder's rate);
    ``lr``: the peak learning rate of the ``pretrained`` recipe (``None``: the recipe's, 1e-3);
    ``steps_factor``: its pretraining runs this many times the budget's ``pretrain_steps``.
    """

    pretrain: Optional[List[str]] = None
    shares: Optional[str] = None
    start: str = "pretrained"
    recipe: str = "pretrained"
    load_scope: str = "encoder"
    schedule: str = "default"
    lr: Optional[float] = None
    steps_factor: int = 1

    @property
    def pretrained(self) -> bool:
        return self.start == "pretrained"


def _pre(*flags: str, **kw) -> Arm:
    return Arm(pretrain=list(flags), **kw)


METHODS: Dict[str, Arm] = {
    "scratch": Arm(start="none", recipe="nnunet"),         # nnU-Net as it is: its own schedule, same budget
    "scratch_recipe": Arm(start="none"),                   # control: scratch with the pretrained recipe
    "init0": Arm(start="init"),                            # the initial weights, zero pretraining, same recipe
    "alice": _pre(),
    "alice_all": _pre(shares="alice", load_scope="all"),   # the alice checkpoint, encoder + decoder loaded
    "alice_sawtooth": _pre(shares="alice", schedule="sawtooth"),
    # the OpenMind benchmark's best CNN schedule at nnU-Net's peak rate: decoder alone first, then everything
    "alice_sawtooth_1e2": _pre(shares="alice", schedule="sawtooth", lr=1e-2),
    "alice_nnunet": _pre(shares="alice", recipe="nnunet"),  # the alice checkpoint under nnU-Net's own schedule
    # what stock nnU-Net's -pretrained_weights does: encoder + decoder loaded, nnU-Net's own schedule
    "alice_all_nnunet": _pre(shares="alice", recipe="nnunet", load_scope="all"),
    # the decoder at nnU-Net's rate, the pretrained encoder at a tenth of it (warm-up + poly per iteration)
    "alice_enclr": _pre(shares="alice", schedule="encLR", lr=1e-2),
    "scratch_enclr": Arm(start="none", schedule="encLR", lr=1e-2),  # control: the same schedule from scratch
    "mae": _pre("--objective", "mae"),
    "mae_all": _pre(shares="mae", load_scope="all"),
    "mae_nnunet": _pre(shares="mae", recipe="nnunet"),
    "alice_casa": _pre("--casa"),                          # the paper's three terms (CASA is off by default)
    "alice_nocls": _pre("--no-cls", "--casa"),             # CASA + reconstruction
    "alice_norecon": _pre("--no-recon"),
    # ablation at the long budget's schedule: the CLS term alone, no reconstruction through the decoder
    "alice_norecon_nnunet": _pre(shares="alice_norecon", recipe="nnunet"),
    # the same pretraining four times as long: does more pretraining move the fine-tuned Dice?
    "alice_x4": _pre(steps_factor=4),
    "alice_x4_nnunet": _pre(shares="alice_x4", recipe="nnunet"),
    "alice_dinotemp": _pre("--teacher-temp", "0.07", "--warmup-teacher-temp", "0.04"),
    "alice_registration": _pre("--matcher", "registration"),
    "alice_embedding": _pre("--matcher", "embedding"),
}


@dataclass
class Budget:
    name: str
    pretrain_steps: int
    epochs: int
    iterations: int
    val_iterations: int
    labels: List[str]            # numbers or "all"
    seeds: List[int]
    methods: List[str]
    device: str = "cpu"
    gpu_memory_target: Optional[float] = 1.0   # nnUNetv2_plan_experiment -gpu_memory_target (None: nnU-Net's)
    patch_size: Optional[List[int]] = None     # overrides the planned patch (must stay divisible by the strides)
    features: Optional[List[int]] = None       # (base, cap): features_per_stage = min(base * 2**i, cap)
    step_size: float = 0.5                     # nnUNetv2_predict -step_size (sliding-window overlap)
    pretrain_batch: Optional[int] = None       # None: the plan's batch size
    pretrain_args: List[str] = field(default_factory=list)
    pretrain_per_seed: bool = True             # False: one pretraining per arm, every cell from the first seed's draw
    note: str = ""


_SMALL_HEADS = ["--head-hidden-dim", "64", "--head-bottleneck-dim", "32", "--head-out-dim", "64"]
BUDGETS: Dict[str, Budget] = {
    "tiny": Budget("tiny", pretrain_steps=2, epochs=1, iterations=2, val_iterations=1, labels=["1", "all"],
                   seeds=[0, 1, 2], methods=["scratch", "alice"], patch_size=[32, 32, 32], features=[8, 32],
                   step_size=1.0, pretrain_args=list(_SMALL_HEADS),
                   note="smoke test: checks the plumbing, the numbers mean nothing"),
    "small": Budget("small", pretrain_steps=40, epochs=5, iterations=8, val_iterations=1, labels=["1", "all"],
                    seeds=[0, 1], methods=["scratch", "alice"], patch_size=[48, 48, 48], features=[8, 64],
                    step_size=1.0, pretrain_per_seed=False,
                    note="README demo: about 20 min on 2 CPU cores; two seeds, so the intervals are very wide"),
    "medium": Budget("medium", pretrain_steps=100, epochs=8, iterations=10, val_iterations=1,
                     labels=["1", "all"], seeds=[0, 1, 2], methods=["scratch", "init0", "alice", "mae"],
                     patch_size=[48, 48, 48], features=[8, 64], step_size=0.75,
                     note="about 2.5 h on 2 busy CPU cores (estimated)"),
    "long": Budget("long", pretrain_steps=3000, epochs=120, iterations=25, val_iterations=2,
                   labels=["1", "all"], seeds=[0, 1, 2], methods=["scratch", "alice_nnunet", "mae_nnunet"],
                   patch_size=[32, 32, 32], features=[8, 64], step_size=1.0, pretrain_per_seed=False,
                   note="2-core CPU with nothing else running, about 3 h (measured: 3,000 pretraining steps take 20 "
                        "min for Alice and 8 min for MAE, a 3,000-iteration cell 8 min; cores shared with other "
                        "jobs made cells 5-6x slower, docs/benchmark.md): 3000 pretraining steps per arm (once, from "
                        "seed 0's draw), 3,000 fine-tuning iterations per cell (docs/results.md)"),
    "gpu15": Budget("gpu15", pretrain_steps=1000, epochs=8, iterations=40, val_iterations=2,
                    labels=["1", "all"], seeds=[0, 1, 2], methods=["scratch", "alice"], device="cuda",
                    gpu_memory_target=None, patch_size=[64, 64, 64], step_size=1.0, pretrain_per_seed=False,
                    note="one H100/H200, about 10 min end to end (estimated, not run): 12 cells whose nnU-Net "
                         "start-up costs more than their 320 iterations"),
    "large": Budget("large", pretrain_steps=25000, epochs=250, iterations=250, val_iterations=50,
                    labels=["1", "2", "4", "all"], seeds=[0, 1, 2],
                    methods=["scratch", "init0", "alice", "alice_all", "mae", "alice_casa", "alice_dinotemp"],
                    device="cuda", gpu_memory_target=None,
                    note="GPU (one >= 24 GB card): nnU-Net's own plan, hours per method"),
}


def get_budget(name: str, **overrides) -> Budget:
    if name not in BUDGETS:
        raise AliceError(f"unknown --budget {name!r}: choose one of {', '.join(BUDGETS)}")
    return replace(BUDGETS[name], **{k: v for k, v in overrides.items() if v is not None})


def parse_method(spec: str) -> tuple:
    """``NAME`` (a known arm) or ``NAME=FLAGS`` (a custom pretrained arm, flags for alice_pretrain)."""
    import shlex

    if "=" in spec:
        name, flags = spec.split("=", 1)
        name = name.strip()
        if not name or not all(c.isalnum() or c in "_-" for c in name):
            raise AliceError(f"--methods: bad method name {name!r} (letters, digits, '_' or '-')")
        return name, Arm(pretrain=shlex.split(flags))
    if spec not in METHODS:
        raise AliceError(f"--methods: unknown method {spec!r}: known {', '.join(METHODS)} "
                         "(or NAME='alice_pretrain flags' for a custom arm)")
    return spec, METHODS[spec]


def resolve_arms(specs: List[str]) -> Dict[str, Arm]:
    """Arms by name; an arm that shares another's pretraining brings that arm's pretraining along."""
    arms = dict(parse_method(m) for m in specs)
    for name, arm in arms.items():
        if arm.shares and arm.shares not in arms and arm.shares not in METHODS:
            raise AliceError(f"--methods: {name} shares the pretraining of unknown arm {arm.shares!r}")
    return arms


def resolve_label_counts(labels: List[str], available: int) -> List[int]:
    """Sorted distinct counts; ``all`` = every available training case; counts above that are clipped."""
    if available < 1:
        raise AliceError("the dataset has no labelled training cases left for fine-tuning")
    out = set()
    for item in labels:
        item = str(item).strip().lower()
        if item == "all":
            out.add(available)
            continue
        try:
            n = int(item)
        except ValueError:
            raise AliceError(f"--labels: expected numbers or 'all', got {item!r}") from None
        if n < 1:
            raise AliceError(f"--labels: counts must be >= 1, got {n}")
        out.add(min(n, available))
    return sorted(out)


def labelled_subset(cases: List[str], n: int, seed: int) -> List[str]:
    """The first ``n`` of a seeded permutation: subsets of one seed are nested (1 case is inside 2 cases ...)."""
    perm = np.random.default_rng(seed).permutation(sorted(cases))
    return [str(c) for c in perm[:n]]


def split_for(cases: List[str], n: int, seed: int) -> dict:
    train = labelled_subset(cases, n, seed)
    val = [c for c in sorted(cases) if c not in train] or list(train)
    return {"train": train, "val": val}


class FoldRegistry:
    """(labels, seed) -> nnU-Net fold index, stored in ``<bench>/folds.json``; splits_final.json follows it."""

    def __init__(self, path: str):
        self.path = path
        self.folds: Dict[str, int] = {}
        if os.path.isfile(path):
            with open(path) as f:
                self.folds = json.load(f)

    @staticmethod
    def key(n: int, seed: int) -> str:
        return f"n{n}_s{seed}"

    def fold(self, n: int, seed: int) -> int:
        k = self.key(n, seed)
        if k not in self.folds:
            self.folds[k] = len(self.folds)
        return self.folds[k]

    def write(self, cases: List[str], splits_path: str) -> None:
        splits = [None] * len(self.folds)
        for k, i in self.folds.items():
            n, seed = k[1:].split("_s")
            splits[i] = split_for(cases, int(n), int(seed))
        os.makedirs(os.path.dirname(splits_path), exist_ok=True)
        for path, data in ((self.path, self.folds), (splits_path, splits)):
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, path)


def bench_plans(plans: dict, name: str, budget: Budget) -> dict:
    """The planned plans renamed to ``name`` (own data identifier) with the budget's patch size and widths."""
    plans = json.loads(json.dumps(plans))
    plans["plans_name"] = name
    conf = plans["configurations"][CONFIGURATION]
    conf["data_identifier"] = f"{name}_{CONFIGURATION}"
    kw = conf["architecture"]["arch_kwargs"]
    if budget.patch_size:
        for axis, p in enumerate(budget.patch_size):
            div = int(np.prod([s[axis] if isinstance(s, (list, tuple)) else s for s in kw["strides"]]))
            if p % div:
                raise AliceError(f"patch size {budget.patch_size} is not divisible by the network's downsampling "
                                 f"({div} on axis {axis})")
        conf["patch_size"] = list(budget.patch_size)
    if budget.features:
        first, cap = budget.features
        kw["features_per_stage"] = [min(first * 2 ** i, cap) for i in range(kw["n_stages"])]
    return plans


def link_holdout(raw: str, ending: str, train_cases: List[str], k: int, folder: str):
    """Set the last ``k`` labelled cases aside as test cases, linked into ``folder/images`` and ``folder/labels``.

    Returns (test cases, remaining training cases)."""
    if k >= len(train_cases):
        raise AliceError(f"--holdout {k} leaves no training case ({len(train_cases)} labelled cases)")
    test, train = train_cases[-k:], train_cases[:-k]
    images, labels = os.path.join(folder, "images"), os.path.join(folder, "labels")
    for d in (images, labels):
        os.makedirs(d, exist_ok=True)
    files = os.listdir(os.path.join(raw, "imagesTr"))
    for case in test:
        pairs = [(os.path.join(raw, "labelsTr", case + ending), os.path.join(labels, case + ending))]
        pairs += [(os.path.join(raw, "imagesTr", f), os.path.join(images, f)) for f in files
                  if f.startswith(case + "_") and f.endswith(ending) and len(f) == len(case) + 5 + len(ending)]
        for src, dst in pairs:
            if not os.path.lexists(dst):
                os.symlink(src, dst)
    return test, train


#: Budget fields that change what a finished cell means; labels, seeds and methods may change between runs.
RESULT_FIELDS = ("pretrain_steps", "epochs", "iterations", "val_iterations", "device", "gpu_memory_target",
                 "patch_size", "features", "step_size", "pretrain_batch", "pretrain_args", "pretrain_per_seed")


def check_budget(path: str, budget: Budget) -> None:
    """Record the budget's result-defining settings in ``path``; refuse to resume a folder made with others."""
    current = {"protocol": PROTOCOL, **{k: getattr(budget, k) for k in RESULT_FIELDS}}
    if os.path.isfile(path):
        with open(path) as f:
            stored = json.load(f)
        changed = [f"{k}: {stored.get(k)} -> {v}" for k, v in current.items() if stored.get(k) != v]
        if changed:
            raise AliceError(f"{os.path.dirname(os.path.dirname(path))} holds results of other settings "
                             f"({'; '.join(changed)}); pass another --output or delete it")
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(current, f, indent=1)
