"""``PretrainRun``: wires data → views → model → objective → optimiser, then runs the loop.

Read top to bottom: ``__init__`` builds everything from a :class:`PretrainConfig`; ``run`` loops over steps;
``payload`` is what every checkpoint contains.
"""
from __future__ import annotations

import os
import time
from typing import Optional

import numpy as np
import torch

from nnunet_alice.checkpoint import make_payload, network_state_dict, nnssl_adaptation_plan
from nnunet_alice.errors import AliceError
from nnunet_alice.pretrain import distributed as dist_utils
from nnunet_alice.pretrain.data import PretrainData
from nnunet_alice.pretrain.loop import (Checkpointer, make_run_log, parameter_groups, pretrain_output_folder,
                                        train_step)
from nnunet_alice.pretrain.metadata import build_metadata
from nnunet_alice.pretrain.model import build_planned_network
from nnunet_alice.pretrain.schedules import Schedules
from nnunet_alice.pretrain.views import ViewSampler, make_loader


def default_num_workers() -> int:
    env = os.environ.get("nnUNet_n_proc_DA")
    if env is not None:
        return int(env)
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def build_objective(network, config, schedules):
    if config.objective == "mae":
        from nnunet_alice.pretrain.objective_mae import MaeObjective
        return MaeObjective(network, config)
    from nnunet_alice.pretrain.objective_alice import AliceObjective
    return AliceObjective(network, config, schedules)


def _is_student_network_key(key: str) -> bool:
    """Keys of the student network inside an objective's state dict (stored once, as ``network_weights``)."""
    return key.startswith("network.") or key.startswith("student.network.")


class PretrainRun:
    def __init__(self, config, resume: bool = False, output_folder: Optional[str] = None):
        self.config = config
        self.distributed = dist_utils.init_from_env(config.device)
        self.world = dist_utils.world_size()
        self.device = self._device(config.device)
        torch.manual_seed(config.seed + dist_utils.rank())

        self.data = PretrainData(config.dataset_name, config.plans, config.configuration, config.unlabeled)
        cm = self.data.configuration_manager
        if config.patch_size is None:
            config.patch_size = [int(p) for p in cm.patch_size]
        global_batch = config.batch_size or int(cm.batch_size)
        if global_batch % self.world:
            raise AliceError(f"batch size {global_batch} is not divisible by the {self.world} processes")
        config.batch_size = global_batch
        self.local_batch = global_batch // self.world
        self.total_steps = config.total_steps()
        self.folder = output_folder or pretrain_output_folder(self.data.dataset_name, config.plans,
                                                              config.configuration)
        self._check_writable()

        self.network = build_planned_network(self.data.plans_manager, cm, self.data.num_input_channels)
        self.schedules = Schedules.from_config(config, self.total_steps)
        self.objective = build_objective(self.network, config, self.schedules).to(self.device)
        self.ddp_objective = self.objective
        if self.distributed:
            self.ddp_objective = torch.nn.parallel.DistributedDataParallel(
                self.objective, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = torch.optim.AdamW(parameter_groups(self.objective.student_modules()), lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.autocast_dtype = torch.bfloat16 if self.device.type == "cuda" else None
        self.checkpointer = Checkpointer(self.folder, self)
        self.start_step = 0
        self.history = []
        if resume:
            self._resume()

        from nnunet_alice.pretrain.matching import build_matcher
        matcher = None
        if config.objective == "alice":
            matcher = build_matcher(config.matcher, config, cache_dir=os.path.join(self.data.preprocessed_root,
                                                                                  "alice_matching"))
            if matcher.inter_volume and len(self.data.cases) < 2:
                raise AliceError(f"matcher {config.matcher!r} pairs different volumes but the dataset has only "
                                 f"{len(self.data.cases)} case; add cases (--unlabeled) or use --matcher intra")
            matcher.prepare([self.data.load(c) for c in self.data.cases])
        self.matcher = matcher
        self.sampler = ViewSampler(self.data, config, config.patch_size, self.local_batch, matcher,
                                   rank=dist_utils.rank(), start_batch=self.start_step)
        self.num_workers = default_num_workers() if config.num_workers is None else int(config.num_workers)

    # ------------------------------------------------------------------ set-up helpers
    @staticmethod
    def _device(name: str) -> torch.device:
        if name == "cuda":
            if not torch.cuda.is_available():
                raise AliceError("-device cuda requested but no CUDA device is available; use -device cpu")
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if name == "cpu":
            torch.set_num_threads(max(1, os.cpu_count() or 1))
            return torch.device("cpu")
        raise AliceError(f"-device must be cpu or cuda, got {name!r}")

    def _check_writable(self) -> None:
        try:
            os.makedirs(self.folder, exist_ok=True)
            probe = os.path.join(self.folder, f".write_test_{os.getpid()}")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            raise AliceError(f"{self.folder}: output folder is not writable ({e.strerror})") from None

    def _resume(self) -> None:
        from nnunet_alice.checkpoint import load_checkpoint

        path = self.checkpointer.path("checkpoint_latest.pth")
        if not os.path.isfile(path):
            raise AliceError(f"{path}: --continue given but there is no checkpoint to continue from")
        ckpt = load_checkpoint(path, map_location=self.device)
        state = ckpt.get("training_state")
        if state is None:
            raise AliceError(f"{path}: holds no training state, cannot continue")
        self.network.load_state_dict(ckpt["network_weights"])
        missing, unexpected = self.objective.load_state_dict(state["objective"], strict=False)
        if unexpected or [k for k in missing if not _is_student_network_key(k)]:
            raise AliceError(f"{path}: training state does not fit this objective (settings changed?)")
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.start_step = int(state["step"])
        self.history = list(state.get("history", []))
        self.checkpointer.last_good = path

    # ------------------------------------------------------------------ checkpoint content
    def payload(self, step: int, with_state: bool) -> dict:
        stats = self._matcher_stats()
        meta = build_metadata(self.data, self.data.case_keys(), self.config.to_dict(), step, self.total_steps, stats)
        state = None
        if with_state:
            state = {
                "objective": {k: v.detach().cpu() for k, v in self.objective.state_dict().items()
                              if not _is_student_network_key(k)},
                "optimizer": self.optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "step": int(step),
                "history": list(self.log.history if hasattr(self, "log") else self.history),
            }
        return make_payload(network_state_dict(self.network), meta, nnssl_adaptation_plan(meta, self.network), state)

    def _matcher_stats(self) -> dict:
        if not self.history and not getattr(self, "log", None):
            return {}
        hist = self.log.history if hasattr(self, "log") else self.history
        fb = [h["fallback_rate"] for h in hist if "fallback_rate" in h]
        return {"matcher": self.config.matcher, "fallback_rate": float(np.mean(fb)) if fb else 0.0}

    # ------------------------------------------------------------------ the loop
    def run(self) -> str:
        cfg, sch = self.config, self.schedules
        self.log = make_run_log(self.folder, self.total_steps, self.start_step)
        self.log.history = list(self.history)
        self.log.line(f"alice_pretrain {cfg.objective} on {self.data.dataset_name} {cfg.plans} {cfg.configuration}: "
                      f"{len(self.data.cases)} cases, patch {cfg.patch_size}, batch {cfg.batch_size} "
                      f"({self.world} process(es)), {self.total_steps} steps, device {self.device}", echo=True)
        loader = make_loader(self.sampler, self.num_workers, cfg.seed)
        self.objective.train()
        window = []
        try:
            for step in range(self.start_step, self.total_steps):
                t0 = time.perf_counter()
                batch = next(loader)
                t_data = time.perf_counter() - t0
                total, terms = train_step(self.objective, self.ddp_objective, self.optimizer, batch, step,
                                          float(sch.lr[step]), float(sch.weight_decay[step]), cfg.grad_clip, self.device,
                                          self.autocast_dtype, self.checkpointer.last_good)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                window.append((total, terms, dt, t_data, float(batch["fallback"].mean()) if "fallback" in batch
                               else None))
                record = {"step": step + 1, "loss": total, "lr": float(sch.lr[step]),
                          "vol/s": self.local_batch * self.world / max(dt, 1e-9)}
                self.log.step(record)
                if (step + 1) % cfg.log_every == 0 or step + 1 == self.total_steps:
                    self.log.record(self._summarise(step + 1, window))
                    window = []
                if (step + 1) % cfg.save_every == 0 and step + 1 < self.total_steps:
                    self.checkpointer.save("checkpoint_latest.pth", step + 1, with_state=True)
                    self.log.plot()
            self.checkpointer.save("checkpoint_final.pth", self.total_steps, with_state=False)
            self.checkpointer.save("checkpoint_latest.pth", self.total_steps, with_state=True)
            plot = self.log.plot()
            self.log.line(f"done: {self.checkpointer.path('checkpoint_final.pth')} (plot: {plot})", echo=True)
        finally:
            self.log.close()
            if hasattr(loader, "_finish"):
                loader._finish()
        return self.checkpointer.path("checkpoint_final.pth")

    def _summarise(self, step: int, window) -> dict:
        sch = self.schedules
        rec = {"step": step, "loss": float(np.mean([w[0] for w in window]))}
        for k in window[-1][1]:
            rec[k] = float(np.mean([w[1][k] for w in window if k in w[1]]))
        i = step - 1
        rec.update({"lr": float(sch.lr[i]), "wd": float(sch.weight_decay[i]), "momentum": float(sch.momentum[i]),
                    "teacher_temp": float(sch.teacher_temp[i])})
        dts = [w[2] for w in window]
        rec["vol/s"] = self.local_batch * self.world * len(dts) / max(sum(dts), 1e-9)
        rec["data_s"] = float(np.mean([w[3] for w in window]))
        fbs = [w[4] for w in window if w[4] is not None]
        if fbs:
            rec["fallback_rate"] = float(np.mean(fbs))
        return rec
