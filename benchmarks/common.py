"""Pieces more than one benchmark uses: the planned network from a plans JSON, device timing, the pretraining
objective with its optimiser, synthetic batches, memory readings and running a measurement in a fresh process.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch


# ---------------------------------------------------------------------------------------------- plans / network
class Plan:
    """Plans JSON + configuration → planned networks, without nnU-Net's dataset or preprocessing.

    ``spec`` holds the constructor arguments, so that a child process can build the same plan again
    (``Plan(**plan.spec)``) instead of receiving nnU-Net's plan objects by pickle.
    """

    def __init__(self, plans_file: str, configuration: str = "3d_fullres", dataset_json: Optional[str] = None,
                 channels: Optional[int] = None, num_classes: Optional[int] = None):
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        self.spec = {"plans_file": plans_file, "configuration": configuration, "dataset_json": dataset_json,
                     "channels": channels, "num_classes": num_classes}
        with open(plans_file) as f:
            self.plans = json.load(f)
        self.plans_file = plans_file
        self.plans_name = self.plans.get("plans_name", os.path.splitext(os.path.basename(plans_file))[0])
        self.configuration = configuration
        self.pm = PlansManager(self.plans)
        self.cm = self.pm.get_configuration(configuration)
        ds = {}
        if dataset_json:
            with open(dataset_json) as f:
                ds = json.load(f)
        self.channels = int(channels or len(ds.get("channel_names", ds.get("modality", {}))) or 1)
        self.num_classes = int(num_classes or len(ds.get("labels", {})) or 2)
        self.patch_size = [int(p) for p in self.cm.patch_size]
        self.batch_size = int(self.cm.batch_size)
        self.median_shape = [int(s) for s in self.cm.median_image_size_in_voxels]
        self.builder: Optional[str] = None

    def pretrain_network(self) -> torch.nn.Module:
        """The student network exactly as ``alice_pretrain`` builds it (output channels = input channels)."""
        try:
            from nnunet_alice.pretrain.model import build_planned_network
            net = build_planned_network(self.pm, self.cm, self.channels)
            self.builder = "nnunet_alice.pretrain.model.build_planned_network"
            return net
        except ImportError as e:  # trainer import chain unavailable: same builder nnU-Net's trainer calls
            from nnunet_alice.pretrain.model import freeze_unused_output_layers
            net = self._from_plans(self.channels, deep_supervision=False)
            freeze_unused_output_layers(net)
            self.builder = f"get_network_from_plans (trainer import failed: {e})"
            return net

    def segmentation_network(self) -> torch.nn.Module:
        """The network nnU-Net trains: num_classes outputs, deep supervision on."""
        return self._from_plans(self.num_classes, deep_supervision=True)

    def _from_plans(self, outputs: int, deep_supervision: bool) -> torch.nn.Module:
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
        return get_network_from_plans(self.cm.network_arch_class_name, self.cm.network_arch_init_kwargs,
                                      self.cm.network_arch_init_kwargs_req_import, self.channels, outputs,
                                      allow_init=True, deep_supervision=deep_supervision)

    def deep_supervision_scales(self) -> List[List[float]]:
        """``nnUNetTrainer._get_deep_supervision_scales``."""
        return [list(s) for s in 1 / np.cumprod(np.vstack(self.cm.pool_op_kernel_sizes), axis=0)][:-1]

    def describe(self) -> dict:
        """What a report needs to name the plan: architecture, stages, planned patch and batch, data shape."""
        kw = self.cm.network_arch_init_kwargs
        return {"plans": self.plans_name, "configuration": self.configuration,
                "arch": self.cm.network_arch_class_name.split(".")[-1],
                "features_per_stage": list(kw.get("features_per_stage", [])),
                "n_blocks_per_stage": list(kw.get("n_blocks_per_stage", kw.get("n_conv_per_stage", []))),
                "planned_patch": self.patch_size, "planned_batch": self.batch_size,
                "channels": self.channels, "num_classes": self.num_classes, "median_shape": self.median_shape}


def count_params(module: torch.nn.Module) -> int:
    """Parameters of ``module``, each shared tensor counted once."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


# ---------------------------------------------------------------------------------------------- timing / memory
def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so that wall-clock timings cover it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> Tuple[object, float]:
    """``(fn(), seconds)``, synchronised on both sides so the time is the device's, not the launch's."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def host(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor as a loader would hand it over: pinned when it goes to a CUDA device."""
    return t.pin_memory() if device.type == "cuda" else t


def _proc_status_gib(field: str) -> Optional[float]:
    """A memory line of ``/proc/self/status`` (kB) in GiB; None where ``/proc`` is unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return None


def current_rss_gib() -> float:
    """This process's resident memory now (``VmRSS``), 0 where ``/proc`` is unavailable."""
    return _proc_status_gib("VmRSS") or 0.0


def peak_rss_gib() -> float:
    """This process's peak resident memory so far: ``VmHWM``, else ``ru_maxrss``.

    ``ru_maxrss`` is not used first because Linux carries the peak of the forked parent image over an exec: a
    child started by multiprocessing "spawn" (or ``subprocess``) from a 2.5 GiB parent reports 2.5 GiB at once,
    while ``VmHWM`` belongs to the child's own image.
    """
    hwm = _proc_status_gib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def all_finite(losses: List[dict]) -> bool:
    """Every loss and loss term of every step (dicts as ``{"step": i, "loss": ..., term: ...}``) is finite."""
    return bool(all(np.isfinite(v) for entry in losses for k, v in entry.items() if k != "step"))


def format_terms(loss: float, terms: Dict[str, float]) -> str:
    """``loss 1.23, cls 0.4, recon 0.8``: one step's losses for a log line."""
    return f"loss {loss:.4g}" + "".join(f", {k} {v:.4g}" for k, v in terms.items())


# ---------------------------------------------------------------------------------------------- pretraining
def pretrain_config(objective: str, patch: Sequence[int], batch: int, device: str, compile_: bool = False,
                    **extra):
    """A validated ``PretrainConfig`` with the package defaults except what a benchmark sets."""
    from nnunet_alice.pretrain.config import PretrainConfig
    return PretrainConfig(objective=objective, patch_size=list(patch), batch_size=batch, device=device,
                          compile=compile_, **extra).validate()


class PretrainParts:
    """An objective with its schedules and optimiser, stepped as ``PretrainRun`` steps it.

    AdamW over ``parameter_groups(objective.student_modules())``, bf16 autocast on CUDA (fp32 on the CPU).
    With ``compile_`` the objective is compiled the way the runner does it (``enable_compile``), before the
    optimiser is built.
    """

    def __init__(self, network: torch.nn.Module, cfg, device: torch.device, total_steps: int,
                 compile_: bool = False):
        from nnunet_alice.pretrain.training.run import build_objective
        from nnunet_alice.pretrain.training.schedules import Schedules
        from nnunet_alice.pretrain.training.step import parameter_groups

        self.cfg, self.device = cfg, device
        self.schedules = Schedules.from_config(cfg, total_steps)
        self.objective = build_objective(network, cfg, self.schedules).to(device)
        self.objective.train()
        self.compile_how = None
        if compile_:
            self.objective.enable_compile()
            self.compile_how = "objective.enable_compile()"
        groups = parameter_groups(self.objective.student_modules())
        self.params_trained = sum(p.numel() for g in groups for p in g["params"])
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.autocast = torch.bfloat16 if device.type == "cuda" else None

    def step(self, batch: Dict[str, torch.Tensor], i: int):
        """One ``train_step`` at step ``i`` of the schedules; returns ``(loss, terms)``."""
        from nnunet_alice.pretrain.training.step import train_step

        s = self.schedules
        return train_step(self.objective, self.objective, self.optimizer, batch, i, float(s.lr[i]),
                          float(s.weight_decay[i]), self.cfg.grad_clip, self.device, autocast_dtype=self.autocast)


def synthetic_pretrain_batch(objective: str, channels: int, patch: Sequence[int], batch: int, config,
                             device: torch.device, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Noise views and block masks shaped as ``ViewSampler.make_batch`` returns them (host tensors)."""
    from nnunet_alice.pretrain.data.masking import batch_block_masks

    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    shape = (batch, channels, *patch)

    def view():
        return host(torch.randn(shape, generator=g), device)

    def mask():
        m = batch_block_masks(batch, list(patch), config.mask_block_size, config.mask_ratio, rng)
        return host(torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32)), device)

    out = {"student_q": view(), "mask_q": mask()}
    if objective == "alice":
        out.update({"student_k": view(), "teacher_q": view(), "teacher_k": view(), "mask_k": mask()})
    return out


# ---------------------------------------------------------------------------------------------- isolation
def _child_init(threads: Optional[int]) -> None:
    if threads:
        torch.set_num_threads(threads)


def in_child(fn: Callable, *args, threads: Optional[int] = None):
    """``fn(*args)`` run in a fresh interpreter (multiprocessing "spawn"), its result returned by pickle.

    Why a fresh process: its peak RSS (:func:`peak_rss_gib`) belongs to this one measurement, and its torch thread
    count is set once, before any work (``threads``). Toggling ``torch.set_num_threads`` 1 -> N in a process
    that later forks loader workers hangs them in libgomp (docs/gpu.md, "Observations"). ``fn`` must be a
    module-level function; a child that dies (killed for memory, a crash) raises ``RuntimeError`` here.
    """
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx, initializer=_child_init, initargs=(threads,)) as pool:
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool as e:
            raise RuntimeError(f"child process died: {e}") from e
