"""Teacher-collapse watch: turns the two monitors of every log interval into a WARNING when collapse persists.

The two monitors (``nnunet_alice.pretrain.objectives.losses``) read together (K prototypes, both in nats):

=================  =========================  ===========================
state              ``teacher_entropy``        ``kl_uniform``
=================  =========================  ===========================
uniform collapse   ~ log K (every row flat)   ~ 0 (batch mean is uniform)
one-hot collapse   ~ 0 (every row one-hot)    ~ log K (all rows pick one prototype)
healthy            low (sharp rows)           low (prototypes used evenly)
=================  =========================  ===========================

The monitors describe the targets the student is trained towards (after centring or Sinkhorn-Knopp,
``losses``), so they show what the loss actually teaches. A low entropy alone is what training aims for,
and a low KL alone is what a healthy batch shows, so the one-hot collapse needs both at their extreme:
``entropy / log K < tol`` with ``KL / log K > 1 - tol``. Rows near log K are a collapse by themselves
(``entropy / log K > 1 - tol``; the batch mean of uniform rows is uniform, so the KL is then ~0 anyway): the
targets no longer tell samples apart. With Sinkhorn-Knopp targets the one-hot state cannot occur (every
prototype gets the same share of each batch) and a collapsed teacher shows up as uniform rows. The warning is
given once when a state has lasted ``patience`` consecutive log intervals, and again only after a healthy
interval. ``tol`` (0.05) matches the band a healthy teacher is required to stay in at initialisation
(0.05 log K < entropy < 0.95 log K).
"""
from __future__ import annotations

import math
from typing import Dict, Optional

DEFAULT_PATIENCE = 10   # log intervals (10 × --log-every 10 = 100 steps by default)
DEFAULT_TOLERANCE = 0.05  # fraction of log K


class CollapseMonitor:
    def __init__(self, num_prototypes: int, patience: int = DEFAULT_PATIENCE, tol: float = DEFAULT_TOLERANCE):
        if num_prototypes < 2:
            raise ValueError(f"num_prototypes must be >= 2, got {num_prototypes}")
        self.log_k = math.log(num_prototypes)
        self.patience = max(1, int(patience))
        self.tol = float(tol)
        self.state: Optional[str] = None
        self.count = 0
        self.first_step: Optional[int] = None
        self.warned = False

    def classify(self, entropy: float, kl: float) -> Optional[str]:
        """``"uniform"``, ``"one-hot"`` or ``None`` (healthy or undecided) for one interval's means."""
        if not (math.isfinite(entropy) and math.isfinite(kl)):
            return None
        h, d = entropy / self.log_k, kl / self.log_k
        if h > 1.0 - self.tol:
            return "uniform"
        if h < self.tol and d > 1.0 - self.tol:
            return "one-hot"
        return None

    def update(self, record: Dict[str, float]) -> Optional[str]:
        """Feed one log-interval record; returns the warning text when collapse has just become persistent."""
        if "teacher_entropy" not in record or "kl_uniform" not in record:
            return None
        state = self.classify(float(record["teacher_entropy"]), float(record["kl_uniform"]))
        step = int(record.get("step", 0))
        if state is None:
            self.state, self.count, self.first_step, self.warned = None, 0, None, False
            return None
        if state != self.state:
            self.state, self.count, self.first_step, self.warned = state, 0, step, False
        self.count += 1
        if self.count < self.patience or self.warned:
            return None
        self.warned = True
        fix = ("raise --teacher-temp (less sharpening) or lower --lr" if state == "one-hot"
               else "lower --teacher-temp (more sharpening) or lower --lr")
        return (f"WARNING: teacher collapse ({state}) for {self.count} consecutive log intervals since step "
                f"{self.first_step}: teacher_entropy {float(record['teacher_entropy']):.4g} nats, kl_uniform "
                f"{float(record['kl_uniform']):.4g} nats (log K = {self.log_k:.4g}); the CLS/CASA terms no longer "
                f"teach anything: {fix}")
