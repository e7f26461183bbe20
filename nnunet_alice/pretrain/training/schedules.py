"""Per-step schedules, computed once as numpy arrays and indexed by the global step (DINO style).

Alice (Jiang et al., ICCV 2023) inherits the DINO recipe (DINO, arXiv 2104.14294, Sec. 3 and App.; docs/method.md
"Optimisation"):

* learning rate: linear warm-up, then cosine decay to ``min_lr`` (``min_lr`` <= peak, unlike the official
  code whose floor sits above its peak, bug B9 in docs/method.md);
* weight decay: cosine 0.04 -> 0.4;
* EMA momentum of the teacher: m(i) = 1 - (1 - m0) * 0.5 * (1 + cos(pi * i / N)), 0.996 -> 1 (Sec. 2.2);
* teacher temperature: linear warm-up 0.008 -> 0.01, then constant (Sec. 3);
* last-layer freeze: the prototypes get no update during the first steps (DINO's ``freeze_last_layer``).

Warm-up and freeze lengths are fractions of the run with a floor in absolute steps (:func:`steps_with_floor`):
DINO's fractions were chosen for runs of 100+ epochs of thousands of steps, and on a short run they round to
almost nothing (0.1 % of 100 steps is no freeze at all).

Every array has exactly ``total_steps`` entries; entry ``i`` is the value used at optimiser step ``i``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np

__all__ = ["cosine_schedule", "linear_warmup_constant", "momentum_schedule", "steps_with_floor", "Schedules"]


def _check_steps(total_steps: int, warmup_steps: int) -> None:
    if int(total_steps) < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if int(warmup_steps) < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")


def _linear_ramp(start: float, end: float, warmup_steps: int) -> np.ndarray:
    """``start + (end - start) * i / W`` for i in [0, W): the ramp reaches ``end`` at step W, not before."""
    i = np.arange(warmup_steps, dtype=np.float64)
    return start + (end - start) * i / max(warmup_steps, 1)


def cosine_schedule(base_value: float, final_value: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start_value: float = 0.0) -> np.ndarray:
    """Linear warm-up from ``warmup_start_value`` to ``base_value``, then a half cosine to ``final_value``.

    DINO's ``cosine_scheduler`` per step, with two deliberate differences:

    * the warm-up value at step ``i < W`` is ``start + (base - start) * i / W`` so step ``W`` (the first cosine
      step) is exactly ``base_value`` and no value is repeated;
    * the cosine part has ``n = total - W`` steps and uses ``cos(pi * j / (n - 1))`` so its first value is
      ``base_value`` and the **last step is exactly** ``final_value`` (with ``n == 1`` the single value is
      ``base_value``).

    If ``warmup_steps >= total_steps`` the run ends inside the warm-up: the ramp keeps its slope (the one a
    full ``warmup_steps`` warm-up would have) and is truncated to ``total_steps`` entries.
    """
    _check_steps(total_steps, warmup_steps)
    total_steps, warmup_steps = int(total_steps), int(warmup_steps)
    warm = _linear_ramp(float(warmup_start_value), float(base_value), warmup_steps)[:total_steps]
    n = total_steps - warm.size
    j = np.arange(n, dtype=np.float64)
    cos = final_value + 0.5 * (base_value - final_value) * (1.0 + np.cos(np.pi * j / max(n - 1, 1)))
    out = np.concatenate([warm, cos])
    assert out.size == total_steps
    return out


def linear_warmup_constant(start: float, end: float, warmup_steps: int, total_steps: int) -> np.ndarray:
    """Linear ramp ``start -> end`` over ``warmup_steps`` steps, then constant ``end`` (Alice Sec. 3 / DINO).

    Used for the teacher temperature (0.008 -> 0.01). Step ``i < W`` gets ``start + (end - start) * i / W``;
    every step ``i >= W`` gets ``end``. ``warmup_steps == 0`` gives a constant ``end``; a warm-up longer than
    the run is truncated.
    """
    _check_steps(total_steps, warmup_steps)
    total_steps, warmup_steps = int(total_steps), int(warmup_steps)
    warm = _linear_ramp(float(start), float(end), warmup_steps)[:total_steps]
    return np.concatenate([warm, np.full(total_steps - warm.size, float(end), dtype=np.float64)])


def momentum_schedule(total_steps: int, base: float = 0.996) -> np.ndarray:
    """Teacher EMA momentum, as in DINO (arXiv 2104.14294): m(i) = 1 - (1-base) * (1 + cos(pi i/N)) / 2.

    ``N = total_steps``, ``i = 0 .. N-1``: m(0) = base and m rises towards 1 (reached at i = N, one past
    the last step, exactly as the official code / DINO's ``cosine_scheduler(base, 1, ...)``).
    """
    _check_steps(total_steps, 0)
    i = np.arange(int(total_steps), dtype=np.float64)
    return 1.0 - (1.0 - base) * 0.5 * (1.0 + np.cos(np.pi * i / int(total_steps)))


def steps_with_floor(fraction: float, floor: int, total_steps: int) -> int:
    """``round(fraction * N)``, raised to ``floor`` when shorter; the floor itself never exceeds ``N // 2``.

    An explicit fraction is kept as given (it may exceed N / 2); only the floor is capped, so a short run still
    spends at least half of its steps after the warm-up.
    """
    if fraction < 0 or floor < 0:
        raise ValueError(f"fraction and floor must be >= 0, got {fraction} and {floor}")
    n = int(total_steps)
    steps = int(round(float(fraction) * n))
    return max(steps, min(int(floor), n // 2))


@dataclass
class Schedules:
    """The four per-step arrays of a run, each of length ``total_steps``.

    Build with :meth:`from_config` from anything with the fields of ``PretrainConfig`` (``lr`` is the peak
    learning rate as given; any batch-size scaling is the caller's job).
    """

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    freeze_last_layer_steps: int = 0
    lr_warmup_steps: int = 0
    teacher_temp_warmup_steps: int = 0

    @property
    def total_steps(self) -> int:
        return int(self.lr.size)

    @classmethod
    def from_config(cls, cfg: Any, total_steps: Optional[int] = None) -> "Schedules":
        """``total_steps`` defaults to ``cfg.total_steps()``; warm-up and freeze lengths: :func:`steps_with_floor`."""
        n = int(total_steps if total_steps is not None else cfg.total_steps())
        _check_steps(n, 0)
        lr_warm = steps_with_floor(cfg.warmup_fraction, cfg.warmup_min_steps, n)
        temp_warm = steps_with_floor(cfg.warmup_teacher_temp_fraction, cfg.warmup_teacher_temp_min_steps, n)
        freeze = steps_with_floor(cfg.freeze_last_layer_fraction, cfg.freeze_last_layer_min_steps, n)
        return cls(
            lr=cosine_schedule(cfg.lr, cfg.min_lr, n, warmup_steps=lr_warm, warmup_start_value=0.0),
            weight_decay=cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, n),
            momentum=momentum_schedule(n, base=cfg.momentum_teacher),
            teacher_temp=linear_warmup_constant(cfg.warmup_teacher_temp, cfg.teacher_temp, temp_warm, n),
            freeze_last_layer_steps=freeze, lr_warmup_steps=lr_warm, teacher_temp_warmup_steps=temp_warm,
        )

    def at(self, step: int) -> Dict[str, float]:
        """Values at ``step`` as Python floats; steps past the end reuse the last entry (e.g. on resume)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        i = min(int(step), self.total_steps - 1)
        return {"lr": float(self.lr[i]), "weight_decay": float(self.weight_decay[i]),
                "momentum": float(self.momentum[i]), "teacher_temp": float(self.teacher_temp[i])}
