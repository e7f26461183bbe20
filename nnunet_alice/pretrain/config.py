"""Every pretraining setting in one object.

The CLI builds a :class:`PretrainConfig`, the loop reads it, and every checkpoint records ``asdict(config)``.
Nothing deeper in the code reads settings from the environment.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import List, Optional

from nnunet_alice.errors import AliceError

OBJECTIVES = ("alice", "mae")
MATCHERS = ("intra", "registration", "embedding")
CASA_TARGETS = ("teacher_encoder_ema", "teacher_decoder_shared")
RECON_REGIONS = ("masked", "all")
MASKINGS = ("spark", "zero")
CENTERINGS = ("sinkhorn", "center")       # teacher targets (pretrain/objectives/losses.py)
CLS_POOLS = ("prenorm_mlp", "prenorm_mean", "mlp", "mean")  # what the CLS vector pools (pretrain/objectives/heads.py)
CLS_STUDENT_VIEWS = ("masked", "unmasked")  # which student pass the CLS term reads (pretrain/objectives/alice.py)


@dataclass
class PretrainConfig:
    # what to train on (nnU-Net identifiers)
    dataset_name: str = ""
    configuration: str = "3d_fullres"
    plans: str = "nnUNetPlans"
    unlabeled: List[str] = field(default_factory=list)

    # objective and its switches (paper: Jiang et al., ICCV 2023, Sec. 3)
    objective: str = "alice"
    matcher: str = "intra"
    use_cls: bool = True          # DINO cross-view CE on the pooled bottleneck ("CLS")
    use_casa: bool = False        # CASA alignment CE between S and T; off by default (docs/results.md), --casa
    use_recon: bool = True        # masked image modelling through the decoder
    casa_target: str = "teacher_encoder_ema"
    lambda_cls: float = 1.0
    lambda_casa: float = 1.0
    lambda_recon: float = 10.0
    recon_region: str = "masked"
    augment: bool = True          # False reproduces the official code (no augmentation of the views)
    intra_jitter: float = 0.25    # intra matcher: key-centre jitter as a fraction of the patch size
    match_threshold: float = 0.7
    match_tries: int = 20

    # masking
    mask_ratio: float = 0.75
    mask_block_size: int = 16     # voxels per block edge (clipped to the patch size)
    masking: str = "spark"        # spark: sparse encoder + mask tokens/densify (objectives/sparse.py); zero: dense
    recon_norm_target: bool = False  # reconstruct the target standardised per mask block

    # heads and temperatures (DINO-style head, Sec. 3 / official code)
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_out_dim: int = 512
    casa_heads: int = 8
    casa_dropout: float = 0.1
    student_temp: float = 0.1
    teacher_temp: float = 0.01
    warmup_teacher_temp: float = 0.008
    warmup_teacher_temp_fraction: float = 0.03
    center_momentum: float = 0.9
    momentum_teacher: float = 0.996
    freeze_last_layer_fraction: float = 0.001
    freeze_last_layer_min_steps: int = 25     # floor in steps (capped at half the run), pretrain/training/schedules.py
    warmup_teacher_temp_min_steps: int = 50
    centering: str = "sinkhorn"   # teacher targets: Sinkhorn-Knopp (batch 2-8 safe) or DINO's centre
    sinkhorn_iterations: int = 3
    cls_queue_size: int = 2048    # past teacher rows added to the Sinkhorn-Knopp normalisation of the CLS targets
    casa_queue_size: int = 0      # ... and of the CASA token targets (measured to hurt: docs/method.md)
    cls_pool: str = "mlp"
    cls_student_view: str = "unmasked"  # the CLS term reads one more encoder pass, on the whole views
    koleo_weight: float = 0.1     # KoLeo spread of the student's CLS embeddings (DINOv2's weight; objectives/koleo.py)
    koleo_memory: int = 64        # earlier student CLS embeddings the nearest neighbour is searched in

    # optimisation
    steps: Optional[int] = None
    epochs: Optional[int] = None
    iterations_per_epoch: int = 250
    batch_size: Optional[int] = None   # None: the plan's batch size
    patch_size: Optional[List[int]] = None  # None: the plan's patch size
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_fraction: float = 0.05
    warmup_min_steps: int = 50         # floor in steps (capped at half the run)
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    grad_clip: float = 3.0

    # run
    seed: int = 12345
    init_weights: Optional[str] = None  # start from these weights (a file of nnunet_alice.trainers.init_weights)
    device: str = "cuda"
    num_workers: Optional[int] = None  # None: nnUNet_n_proc_DA or a CPU-count default
    data_timeout: float = 900.0        # seconds without a batch before the run stops with an error
    save_every: int = 250
    log_every: int = 10
    compile: bool = False

    def total_steps(self) -> int:
        if self.steps is not None:
            return int(self.steps)
        return int(self.epochs if self.epochs is not None else 100) * self.iterations_per_epoch

    def validate(self) -> "PretrainConfig":
        def bad(msg):
            raise AliceError(msg)

        if self.objective not in OBJECTIVES:
            bad(f"--objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.matcher not in MATCHERS:
            bad(f"--matcher must be one of {MATCHERS}, got {self.matcher!r}")
        if self.casa_target not in CASA_TARGETS:
            bad(f"--casa-target must be one of {CASA_TARGETS}, got {self.casa_target!r}")
        if self.recon_region not in RECON_REGIONS:
            bad(f"--recon-region must be one of {RECON_REGIONS}, got {self.recon_region!r}")
        if self.masking not in MASKINGS:
            bad(f"--masking must be one of {MASKINGS}, got {self.masking!r}")
        if not 0.0 <= self.mask_ratio < 1.0:
            bad(f"--mask-ratio must be in [0, 1), got {self.mask_ratio}")
        if self.mask_block_size < 1:
            bad(f"--mask-block-size must be >= 1, got {self.mask_block_size}")
        if self.steps is not None and self.epochs is not None:
            bad("give either --steps or --epochs, not both")
        if self.total_steps() < 1:
            bad(f"the run must have at least one step, got {self.total_steps()}")
        if self.min_lr > self.lr:
            bad(f"--min-lr ({self.min_lr}) must not exceed --lr ({self.lr}): the cosine must decay")
        if self.objective == "mae" and not self.use_recon:
            bad("--objective mae with --no-recon trains nothing")
        if self.objective == "alice" and not (self.use_cls or self.use_casa):
            bad("--objective alice needs at least one of the CLS and CASA terms; "
                "drop --no-cls, add --casa, or use --objective mae")
        if not -1.0 <= self.match_threshold <= 1.0:
            bad(f"--match-threshold must be in [-1, 1] (scores are correlations/cosines), got {self.match_threshold}")
        if not 0.0 <= self.intra_jitter <= 1.0:
            bad(f"--intra-jitter must be in [0, 1] (a fraction of the patch size), got {self.intra_jitter}")
        if self.match_tries < 1:
            bad(f"--match-tries must be >= 1, got {self.match_tries}")
        if not self.data_timeout > 0:
            bad(f"--data-timeout must be > 0 seconds, got {self.data_timeout}")
        if self.batch_size is not None and self.batch_size < 1:
            bad(f"--batch-size must be >= 1, got {self.batch_size}")
        self._validate_teacher(bad)
        return self

    def _validate_teacher(self, bad) -> None:
        """Heads, temperatures, centring, EMA and schedule lengths."""
        if self.centering not in CENTERINGS:
            bad(f"--centering must be one of {CENTERINGS}, got {self.centering!r}")
        if self.cls_pool not in CLS_POOLS:
            bad(f"--cls-pool must be one of {CLS_POOLS}, got {self.cls_pool!r}")
        if self.cls_student_view not in CLS_STUDENT_VIEWS:
            bad(f"--cls-student-view must be one of {CLS_STUDENT_VIEWS}, got {self.cls_student_view!r}")
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp", "lr"):
            if not getattr(self, name) > 0:
                bad(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.min_lr < 0:
            bad(f"--min-lr must be >= 0, got {self.min_lr}")
        for name in ("momentum_teacher", "center_momentum", "warmup_fraction", "warmup_teacher_temp_fraction",
                     "freeze_last_layer_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                bad(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        for name in ("warmup_min_steps", "warmup_teacher_temp_min_steps", "freeze_last_layer_min_steps",
                     "cls_queue_size", "casa_queue_size"):
            if getattr(self, name) < 0:
                bad(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.sinkhorn_iterations < 1:
            bad(f"--sinkhorn-iterations must be >= 1, got {self.sinkhorn_iterations}")
        for name in ("head_out_dim", "head_hidden_dim", "head_bottleneck_dim", "casa_heads", "iterations_per_epoch",
                     "log_every", "save_every", "koleo_memory"):
            if getattr(self, name) < 1:
                bad(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.head_out_dim < 2:
            bad(f"--head-out-dim (prototypes K) must be >= 2, got {self.head_out_dim}")
        if self.head_out_dim % self.casa_heads:
            bad(f"--head-out-dim ({self.head_out_dim}) must be divisible by the {self.casa_heads} CASA heads")
        if not 0.0 <= self.casa_dropout < 1.0:
            bad(f"casa_dropout must be in [0, 1), got {self.casa_dropout}")
        for name in ("lambda_cls", "lambda_casa", "lambda_recon", "weight_decay", "weight_decay_end", "grad_clip",
                     "koleo_weight"):
            if getattr(self, name) < 0:
                bad(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")

    def target_warnings(self, global_batch: int) -> List[str]:
        """Warnings about teacher targets that cannot become sharp at this batch size (checked at start).

        Sinkhorn-Knopp gives every prototype 1/K of the mass of the rows it normalises, so with R < K rows no
        row's target can have an entropy below ln(K / R) (docs/method.md "Teacher targets at small batch"):
        at batch 2 and no queue, 4 CLS rows for K = 512 hold every target above 0.78 ln K.
        """
        if self.objective != "alice" or self.centering != "sinkhorn" or not self.use_cls:
            return []
        rows = 2 * int(global_batch) + self.cls_queue_size
        k = self.head_out_dim
        if rows >= k:
            return []
        floor = math.log(k / rows) / math.log(k)
        return [f"WARNING: the CLS targets are normalised over {rows} rows (2 views x batch {global_batch} + "
                f"--cls-queue-size {self.cls_queue_size}) for K = {k} prototypes: no target can be sharper than "
                f"{floor:.2f} ln K (at 0.95 the collapse monitor reads them as uniform); raise --cls-queue-size "
                f"to at least {k - 2 * int(global_batch)}"]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PretrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
