"""``PretrainRun``: wires data → views → model → objective → optimiser, then runs the loop.

Read top to bottom: ``__init__`` builds everything from a :class:`PretrainConfig`; ``run`` loops over steps;
``payload`` is what every checkpoint contains.
"""
from __future__ import annotations

import os
import signal
import tempfile
import time
from typing import List, Optional

import numpy as np
import torch

from nnunet_alice.checkpoint import make_payload, network_state_dict, nnssl_adaptation_plan
from nnunet_alice.errors import AliceError, RunStopped, os_error_message
from nnunet_alice.pretrain.training import distributed as dist_utils
from nnunet_alice.pretrain.data.cases import PretrainData
from nnunet_alice.pretrain.training.progress import append_log_line
from nnunet_alice.pretrain.training.checkpointing import (FINAL, LATEST, Checkpointer, check_output_files,
                                                          make_run_log, pretrain_output_folder)
from nnunet_alice.pretrain.training.step import StopRequested, parameter_groups, stop_between_steps, train_step
from nnunet_alice.pretrain.training.monitor import CollapseMonitor
from nnunet_alice.pretrain.training.metadata import build_metadata
from nnunet_alice.pretrain.model import build_planned_network
from nnunet_alice.pretrain.training.resume import (RESUME_FREE_SETTINGS, check_resumable, resume_candidates,  # noqa: F401
                                                   settings_changes)
from nnunet_alice.pretrain.training.run_lock import RunLock
from nnunet_alice.pretrain.training.schedules import Schedules
from nnunet_alice.pretrain.data.views import ViewSampler, make_loader


def default_num_workers() -> int:
    env = os.environ.get("nnUNet_n_proc_DA")
    if env is not None:
        return int(env)
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def build_objective(network, config, schedules):
    if config.objective == "mae":
        from nnunet_alice.pretrain.objectives.mae import MaeObjective
        return MaeObjective(network, config)
    from nnunet_alice.pretrain.objectives.alice import AliceObjective
    return AliceObjective(network, config, schedules)


def _is_student_network_key(key: str) -> bool:
    """Keys of the student network inside an objective's state dict (stored once, as ``network_weights``)."""
    return key.startswith("network.") or key.startswith("student.network.")


class PretrainRun:
    def __init__(self, config, resume: bool = False, output_folder: Optional[str] = None,
                 allow_settings_change: bool = False):
        """``allow_settings_change``: on ``resume``, accept settings that change the computation and record them
        in the checkpoint's ``settings_history`` (default: refuse them)."""
        self.config = config
        self.notes = []  # warnings found before the log exists; written to it when the run starts
        self.folder = output_folder or pretrain_output_folder(config.dataset_name, config.plans,
                                                              config.configuration)
        self.lock: Optional[RunLock] = None
        self.settings_history: List[dict] = []
        try:
            self._setup(config, resume, allow_settings_change)
        except AliceError as e:
            self._log_error(e)
            self._release_lock()
            raise
        except OSError as e:  # a file-system error while setting up (e.g. a matcher cache): one line
            err = AliceError(os_error_message(e))
            self._log_error(err)
            self._release_lock()
            raise err from None
        except BaseException:
            self._release_lock()
            raise

    def _setup(self, config, resume: bool, allow_settings_change: bool) -> None:
        self.distributed = dist_utils.init_from_env(config.device)
        self.world = dist_utils.world_size()
        self.device = self._device(config.device)
        torch.manual_seed(config.seed + dist_utils.rank())
        # cheap checks first, so that nothing is preprocessed or created when one of them fails
        self._check_writable()
        if os.path.isdir(self.folder):  # a new folder is locked when run() creates it
            self._acquire_lock()
        check_output_files(self.folder)
        if resume:
            resume_candidates(self.folder)

        self.data = PretrainData(config.dataset_name, config.plans, config.configuration, config.unlabeled)
        cm = self.data.configuration_manager
        if config.patch_size is None:
            config.patch_size = [int(p) for p in cm.patch_size]
        global_batch = config.batch_size or int(cm.batch_size)
        if global_batch % self.world:
            raise AliceError(f"batch size {global_batch} is not divisible by the {self.world} processes")
        config.batch_size = global_batch
        self.local_batch = global_batch // self.world
        self.notes += config.target_warnings(global_batch)
        self.total_steps = config.total_steps()

        # (re)seed right before anything random is built: imports above may have drawn from the global stream
        torch.manual_seed(config.seed + dist_utils.rank())
        self.network = build_planned_network(self.data.plans_manager, cm, self.data.num_input_channels)
        if config.init_weights and not resume:  # the same draw as a from-scratch run (init-matched comparisons)
            from nnunet_alice.trainers.init_weights import load_init_weights
            load_init_weights(self.network, config.init_weights, include_seg_layers=False, log=self.notes.append)
        self.schedules = Schedules.from_config(config, self.total_steps)
        self.objective = build_objective(self.network, config, self.schedules).to(self.device)
        if config.compile:
            if self.device.type != "cuda":
                raise AliceError("--compile needs -device cuda (nnU-Net also compiles only on CUDA)")
            self.objective.enable_compile()
        self.ddp_objective = self.objective
        if self.distributed:
            self.ddp_objective = dist_utils.data_parallel(self.objective, self.device)
        self.optimizer = torch.optim.AdamW(parameter_groups(self.objective.student_modules()), lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.autocast_dtype = torch.bfloat16 if self.device.type == "cuda" else None
        self.checkpointer = Checkpointer(self.folder, self.payload)
        self.start_step = 0
        self.history = []
        self.rng_state = None
        if resume:
            self._resume(allow_settings_change)

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
            # all cores, like nnU-Net, unless the user limited the threads (OMP_NUM_THREADS): on a shared
            # machine, OpenMP threads competing for busy cores are far slower than a single thread
            env = os.environ.get("OMP_NUM_THREADS", "").strip()
            torch.set_num_threads(int(env) if env.isdigit() and int(env) > 0 else max(1, os.cpu_count() or 1))
            return torch.device("cpu")
        raise AliceError(f"-device must be cpu or cuda, got {name!r}")

    def _check_writable(self) -> None:
        """Fail early if the output folder cannot be written, without creating it (``run`` creates it)."""
        folder = os.path.abspath(self.folder)
        existing = folder
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        try:
            if not os.path.isdir(existing):
                raise NotADirectoryError(20, f"{existing} is not a directory")
            with tempfile.TemporaryFile(dir=existing, prefix=".alice_write_test_"):
                pass
        except OSError as e:
            raise AliceError(f"{self.folder}: output folder is not writable ({e.strerror or e})") from None

    def _resume(self, allow_settings_change: bool = False) -> None:
        """Restore network, objective (teacher, centres, CASA target), optimizer, RNG, step and history.

        Tries ``checkpoint_latest.pth``, then ``checkpoint_latest.prev.pth``; a damaged file (checksum,
        truncation) is reported in the log and skipped. A checkpoint past the asked length, or (without
        ``allow_settings_change``) one made with other computation-changing settings, is refused.
        """
        from nnunet_alice.checkpoint import load_checkpoint

        errors, unverified = [], []
        for path in resume_candidates(self.folder):
            try:
                ckpt = load_checkpoint(path, map_location="cpu", note=unverified.append)
                state = ckpt.get("training_state")
                if state is None:
                    raise AliceError(f"{path}: holds no training state, cannot continue")
            except AliceError as e:
                errors.append(str(e))
                continue
            history, notes = check_resumable(path, ckpt.get("metadata", {}), int(state.get("step", 0)),
                                             self.total_steps, self.config.to_dict(), allow_settings_change)
            try:
                self._restore(path, ckpt, state)
            except AliceError as e:
                errors.append(str(e))
                continue
            self.settings_history = history
            for err in errors:
                self.notes.append(f"WARNING: {err}; continuing from {path} instead")
            self.notes += [f"WARNING: {u}" for u in unverified if u.startswith(path + ":")] + notes
            self.notes.append(f"continuing from {path} at step {self.start_step}")
            return
        raise AliceError(f"no usable checkpoint to continue from: {' | '.join(errors)}")

    def _restore(self, path: str, ckpt: dict, state: dict) -> None:
        try:
            self.network.load_state_dict(ckpt["network_weights"])
            missing, unexpected = self.objective.load_state_dict(state["objective"], strict=False)
        except (RuntimeError, KeyError) as e:
            raise AliceError(f"{path}: does not fit this network/objective ({str(e).splitlines()[0][:160]})") from None
        if unexpected or [k for k in missing if not _is_student_network_key(k)]:
            raise AliceError(f"{path}: training state does not fit this objective (settings changed?): "
                             f"{(list(unexpected) + [k for k in missing if not _is_student_network_key(k)])[:3]}")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise AliceError(f"{path}: optimizer state does not fit ({e})") from None
        # applied in run(), right before the first step: building the matcher and sampler may draw numbers
        self.rng_state = (state["torch_rng"], state.get("cuda_rng") or [])
        self.start_step = int(state["step"])
        self.history = list(state.get("history", []))
        self.checkpointer.last_good = path
        self.checkpointer.last_step = self.start_step

    # ------------------------------------------------------------------ checkpoint content
    def payload(self, step: int, with_state: bool) -> dict:
        stats = self._matcher_stats()
        meta = build_metadata(self.data, self.data.case_keys(), self.config.to_dict(), step, self.total_steps, stats)
        meta["settings_history"] = list(self.settings_history)
        state = None
        if with_state:
            state = {
                "objective": {k: v.detach().cpu() for k, v in self.objective.state_dict().items()
                              if not _is_student_network_key(k)},
                "optimizer": self.optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": list(torch.cuda.get_rng_state_all()) if self.device.type == "cuda" else [],
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

    # ------------------------------------------------------------------ lock, signals, file-system errors
    def _acquire_lock(self) -> None:
        if self.lock is not None or not dist_utils.is_main_process():
            return
        self.lock = RunLock(self.folder).acquire()
        if self.lock.stale:
            self.notes.append(f"took over the run lock of a run that ended without releasing it ({self.lock.stale})")

    def _release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _log_error(self, error: Exception) -> None:
        """Add ``ERROR: ...`` to the folder's training log, if this run holds the folder (never another run's)."""
        if self.lock is not None:
            append_log_line(self.folder, f"ERROR: {error}")

    def _announce(self, message: str) -> None:
        log = getattr(self, "log", None)
        if log is not None:
            log.line(message, echo=True)
        else:
            print(message, flush=True)

    def _stopped(self, stop: StopRequested) -> RunStopped:
        """After a stop signal: save a resumable checkpoint of the ``stop.step`` steps done, log, exit 128 + signal."""
        name = signal.Signals(stop.signum).name
        if stop.step > 0 and stop.step != self.checkpointer.last_step:
            try:
                self.checkpointer.save(LATEST, stop.step, with_state=True)
            except AliceError as e:
                self._log_error(e)
                raise
        last = self.checkpointer.last_good
        saved = (f"resumable checkpoint {last} at step {self.checkpointer.last_step}; continue with --continue"
                 if last else "no step was done, nothing saved")
        self._announce(f"{name}: stopped after step {stop.step} of {self.total_steps}; {saved}")
        return RunStopped(f"stopped by {name}: {saved}", 128 + stop.signum)

    # ------------------------------------------------------------------ the loop
    def run(self) -> str:
        """Train under the folder's run lock. SIGTERM/SIGINT stop between steps with a resumable checkpoint
        (exit 128 + signal); a file-system error stops with one line naming the file (also in the log)."""
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as e:
            raise AliceError(f"{self.folder}: output folder cannot be created ({e.strerror or e})") from None
        try:
            self._acquire_lock()
            with stop_between_steps(self._announce):
                try:
                    return self._train()
                except StopRequested as stop:
                    raise self._stopped(stop) from None
        except OSError as e:
            err = AliceError(os_error_message(e))
            self._log_error(err)
            raise err from None
        except AliceError as e:
            if getattr(self, "log", None) is None:  # (the loop logs its own errors)
                self._log_error(e)
            raise
        finally:
            self._release_lock()

    def _train(self) -> str:
        cfg, sch = self.config, self.schedules
        self.log = make_run_log(self.folder, self.total_steps, self.start_step)
        self.log.history = list(self.history)
        self.log.line(f"alice_pretrain {cfg.objective} on {self.data.dataset_name} {cfg.plans} {cfg.configuration}: "
                      f"{len(self.data.cases)} cases, patch {cfg.patch_size}, batch {cfg.batch_size} "
                      f"({self.world} process(es)), {self.total_steps} steps, device {self.device}, "
                      f"{self.num_workers} data worker(s)", echo=True)
        stale = self.checkpointer.remove_stale_temp_files()
        if stale:
            self.notes.append(f"removed {len(stale)} half-written checkpoint file(s) of an interrupted run")
        for note in self.notes:
            self.log.line(note, echo=True)
        # the stream of the steps (dropout) starts here: seeded for a new run, restored for a resumed one
        if self.rng_state is None:
            torch.manual_seed(cfg.seed + 7919 * (dist_utils.rank() + 1))
        else:
            torch.set_rng_state(self.rng_state[0])
            if self.device.type == "cuda" and len(self.rng_state[1]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(self.rng_state[1])
            self.rng_state = None
        monitor = CollapseMonitor(cfg.head_out_dim) if cfg.objective == "alice" else None
        loader = make_loader(self.sampler, self.num_workers, cfg.seed, timeout=cfg.data_timeout)
        self.objective.train()
        window = []
        try:
            for step in range(self.start_step, self.total_steps):
                t0 = time.perf_counter()
                batch = next(loader)
                t_data = time.perf_counter() - t0
                total, terms = train_step(self.objective, self.ddp_objective, self.optimizer, batch, step,
                                          float(sch.lr[step]), float(sch.weight_decay[step]), cfg.grad_clip,
                                          self.device, self.autocast_dtype, self.checkpointer.last_good)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                window.append((total, terms, dt, t_data, float(batch["fallback"].mean()) if "fallback" in batch
                               else None))
                record = {"step": step + 1, "loss": total, "lr": float(sch.lr[step]),
                          "vol/s": self.local_batch * self.world / max(dt, 1e-9)}
                self.log.step(record)
                if (step + 1) % cfg.log_every == 0 or step + 1 == self.total_steps:
                    rec = self._summarise(step + 1, window)
                    self.log.record(rec)
                    window = []
                    warning = monitor.update(rec) if monitor is not None else None
                    if warning:
                        self.log.line(warning, echo=True)
                if (step + 1) % cfg.save_every == 0 and step + 1 < self.total_steps:
                    self.checkpointer.save(LATEST, step + 1, with_state=True)
                    self.log.plot()
            self.checkpointer.save(FINAL, self.total_steps, with_state=False)
            self.checkpointer.save(LATEST, self.total_steps, with_state=True)
            plot = self.log.plot()
            self.log.line(f"done: {self.checkpointer.path(FINAL)} (plot: {plot})", echo=True)
        except AliceError as e:
            self.log.line(f"ERROR: {e}")
            raise
        finally:
            self.log.close()
            loader.close()
        return self.checkpointer.path(FINAL)

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
