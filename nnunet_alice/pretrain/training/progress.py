"""Progress for people: a tqdm bar, nnU-Net-style timestamped log lines, and ``progress.png``."""
from __future__ import annotations

import os
import sys
from datetime import datetime
from typing import Dict, List

import numpy as np

LOG_NAME = "training_log.txt"
PLOT_NAME = "progress.png"
LOSS_KEYS = ("loss", "cls", "casa", "recon", "koleo")
MONITOR_KEYS = ("teacher_entropy", "kl_uniform", "cls_spread")


class RunLog:
    def __init__(self, folder: str, total_steps: int, start_step: int, enabled: bool = True):
        self.folder = folder
        self.enabled = enabled
        self.history: List[Dict[str, float]] = []
        self.log_file = os.path.join(folder, LOG_NAME)
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="alice_pretrain", unit="step",
                            dynamic_ncols=True, mininterval=1.0)

    def line(self, text: str, echo: bool = False) -> None:
        if not self.enabled:
            return
        stamp = append_log_line(self.folder, text)
        if echo:
            (self.bar.write if self.bar is not None else print)(f"{stamp}: {text}")

    def step(self, record: Dict[str, float]) -> None:
        if not self.enabled:
            return
        self.bar.update(1)
        self.bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "lr", "vol/s") if k in record}, refresh=False)

    def record(self, record: Dict[str, float]) -> None:
        if not self.enabled:
            return
        self.history.append(dict(record))
        self.line(" ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def plot(self) -> str:
        """Write ``progress.png``: losses per term, schedules, collapse monitors and throughput."""
        if not self.enabled or not self.history:
            return ""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = np.array([h["step"] for h in self.history])
        fig, axes = plt.subplots(2, 2, figsize=(12, 8))
        panels = [(axes[0, 0], LOSS_KEYS, "loss terms", True),
                  (axes[0, 1], ("lr", "teacher_temp"), "lr, teacher temperature (momentum: right axis)", True),
                  (axes[1, 0], MONITOR_KEYS, "teacher monitors (collapse: entropy→0 or KL→0; cls_spread→0)", False),
                  (axes[1, 1], ("vol/s", "fallback_rate"), "throughput (vol/s), matcher fallback rate", False)]
        for ax, keys, title, logy in panels:
            for k in keys:
                vals = np.array([h.get(k, np.nan) for h in self.history], dtype=float)
                if np.isfinite(vals).any():
                    ax.plot(steps, vals, label=k)
            if logy and ax.lines and all(np.nanmin(line.get_ydata()) > 0 for line in ax.lines):
                ax.set_yscale("log")
            ax.set_title(title)
            ax.set_xlabel("step")
            if ax.lines:
                ax.legend(loc="best", fontsize=8)
        mom = np.array([h.get("momentum", np.nan) for h in self.history], dtype=float)
        if np.isfinite(mom).any():
            twin = axes[0, 1].twinx()
            twin.plot(steps, mom, color="gray", linestyle="--", label="momentum")
            twin.set_ylabel("EMA momentum")
        fig.tight_layout()
        path = os.path.join(self.folder, PLOT_NAME)
        tmp = path + ".tmp.png"
        try:
            fig.savefig(tmp, dpi=80)
            os.replace(tmp, path)
        except OSError as e:  # the plot is a convenience: a full disk is reported by the next checkpoint
            self.line(f"WARNING: {path}: not written ({e.strerror or e})", echo=True)
            if os.path.exists(tmp):
                os.remove(tmp)
            return ""
        finally:
            plt.close(fig)
        return path


def append_log_line(folder: str, text: str) -> str:
    """Append ``<timestamp>: text`` to ``folder/training_log.txt``; returns the stamp. A log that cannot be
    written (disk full) is reported on stderr once per line instead of stopping the run."""
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")
    path = os.path.join(folder, LOG_NAME)
    try:
        with open(path, "a") as f:
            f.write(f"{stamp}: {text}\n")
    except OSError as e:
        print(f"WARNING: {path}: cannot append to the log ({e.strerror or e})", file=sys.stderr)
    return stamp
