"""``alice_benchmark`` set-up: the dataset and its test cases, the environment and the printed commands, planning
and preprocessing into the benchmark's own ``nnUNet_preprocessed`` (the user's data and splits are never touched).
"""
from __future__ import annotations

import json
import os
import shlex
import time
from typing import Callable, Dict, List, Optional, Tuple

from nnunet_alice.errors import AliceError
from nnunet_alice.harness.config import BENCH_TRAINERS, CONFIGURATION, Budget, bench_plans, link_holdout
from nnunet_alice.harness.runner import subprocess_runner

Runner = Callable[[List[str], Dict[str, str], str], Tuple[int, str]]


class StepFailed(Exception):
    """A command exited with an error: its cells are reported as failed, the others go on."""

    def one_line(self) -> str:
        """``<step> exited with <rc> (log <file>): <the log's last line>``, for a step no cell can do without."""
        head, _, tail = str(self).partition(": ")
        last = [ln.strip() for ln in tail.splitlines() if ln.strip()]
        return f"{head}: {last[-1]}" if last else head


class BenchSetup:
    """Dataset, environment, commands, planning and preprocessing of a benchmark folder."""

    def __init__(self, dataset: str, budget: Budget, output: Optional[str] = None, demo: bool = False, holdout: int = 0,
                 runner: Runner = subprocess_runner, echo: Callable[[str], None] = print):
        self.raw_root = os.environ.get("nnUNet_raw")
        if not self.raw_root:
            raise AliceError("set nnUNet_raw to the folder holding Dataset<ID>_<Name> (or where --demo writes it)")
        self.dataset_arg, self.budget, self.demo, self.holdout = str(dataset), budget, demo, int(holdout)
        self.runner, self.echo = runner, echo
        self.dataset_name = self._find_dataset()
        self.dataset_id = self._dataset_id()
        root = os.environ.get("nnUNet_results") or os.path.abspath("alice_benchmark_results")
        self.out = os.path.abspath(output or os.path.join(root, "alice_benchmark",
                                                          f"Dataset{self.dataset_id:03d}__{budget.name}"))
        self.pre_root = os.path.join(self.out, "nnUNet_preprocessed")
        self.plans = f"nnUNetPlans_alicebench_{budget.name}"
        self.commands_run = 0

    # ------------------------------------------------------------------ dataset
    def _find_dataset(self) -> Optional[str]:
        if not os.path.isdir(self.raw_root):
            return None
        arg = self.dataset_arg
        for name in sorted(os.listdir(self.raw_root)):
            if not name.startswith("Dataset") or not os.path.isdir(os.path.join(self.raw_root, name)):
                continue
            if name == arg or (arg.isdigit() and name.startswith(f"Dataset{int(arg):03d}_")):
                return name
        return None

    def _dataset_id(self) -> int:
        if self.dataset_name:
            return int(self.dataset_name[7:10])
        for digits in (self.dataset_arg, self.dataset_arg[7:10] if self.dataset_arg.startswith("Dataset") else ""):
            if digits.isdigit():
                return int(digits)
        raise AliceError(f"-d {self.dataset_arg}: no such dataset in {self.raw_root}")

    def ensure_dataset(self) -> None:
        if self.dataset_name is None:
            if not self.demo:
                raise AliceError(f"-d {self.dataset_arg}: no such dataset in {self.raw_root} "
                                 "(add --demo to generate the MNI demo dataset)")
            self.command("demo_data", ["alice_demo_data", "-d", str(self.dataset_id), "--output", self.raw_root],
                         os.path.join(self.out, "logs", "demo_data.log"))
            self.dataset_name = self._find_dataset()
            if self.dataset_name is None:
                raise AliceError(f"alice_demo_data did not create Dataset{self.dataset_id:03d}_* in {self.raw_root}")
        self.raw = os.path.join(self.raw_root, self.dataset_name)
        with open(os.path.join(self.raw, "dataset.json")) as f:
            self.ending = json.load(f)["file_ending"]
        self.train_cases = self._cases(os.path.join(self.raw, "labelsTr"))
        if not self.train_cases:
            raise AliceError(f"{self.raw}/labelsTr holds no {self.ending} labels")
        self._test_sets()

    def _cases(self, folder: str) -> List[str]:
        if not os.path.isdir(folder):
            return []
        return sorted(f[:-len(self.ending)] for f in os.listdir(folder) if f.endswith(self.ending))

    def _test_sets(self) -> None:
        """imagesTs/labelsTs when both hold cases, else ``--holdout`` training cases linked into ``<out>/holdout``."""
        test = self._cases(os.path.join(self.raw, "labelsTs"))
        if test and os.path.isdir(os.path.join(self.raw, "imagesTs")) and not self.holdout:
            self.test_images, self.test_labels, self.test_cases = (os.path.join(self.raw, "imagesTs"),
                                                                   os.path.join(self.raw, "labelsTs"), test)
            return
        self.test_cases, self.train_cases = link_holdout(self.raw, self.ending, self.train_cases,
                                                         self.holdout or max(1, len(self.train_cases) // 5),
                                                         os.path.join(self.out, "holdout"))
        self.test_images = os.path.join(self.out, "holdout", "images")
        self.test_labels = os.path.join(self.out, "holdout", "labels")

    # ------------------------------------------------------------------ commands
    def trainer_folder(self) -> str:
        """A folder for nnUNet_extTrainer holding a one-line module that exports the harness trainers."""
        folder = os.path.join(self.out, "trainers")
        path = os.path.join(folder, "nnunet_alice_bench_trainer.py")
        line = (f"from nnunet_alice.harness.trainers import {', '.join(sorted(BENCH_TRAINERS.values()))}"
                "  # noqa: F401 (alice_benchmark)\n")
        if not os.path.isfile(path) or open(path).read() != line:
            os.makedirs(folder, exist_ok=True)
            with open(path, "w") as f:
                f.write(line)
        return folder

    def env(self, **extra: Optional[str]) -> Dict[str, str]:
        env = dict(os.environ)
        env.update({"nnUNet_raw": self.raw_root, "nnUNet_preprocessed": self.pre_root, "nnUNet_compile": "f"})
        ext = [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p.strip()]
        env["nnUNet_extTrainer"] = os.pathsep.join([self.trainer_folder()] + ext)
        if self.budget.device == "cpu":  # passive OpenMP waits: spinning threads on busy cores cost up to 10x
            env.update({"nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1",
                        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")})
        for k, v in extra.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        return env

    def command(self, what: str, argv: List[str], log: str, env: Optional[Dict[str, str]] = None) -> float:
        env = env or self.env()
        shown = {k: v for k, v in env.items() if os.environ.get(k) != v}
        unset = [k for k in os.environ if k not in env]
        prefix = " ".join(f"-u {k}" for k in unset) + " " if unset else ""
        line = "env " + prefix + " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(shown.items()))
        self.echo(f"$ {line} {shlex.join(argv)}   # {what}, log {log}")
        t0 = time.time()
        rc, tail = self.runner(argv, env, log)
        self.commands_run += 1
        if rc != 0:
            raise StepFailed(f"{what} exited with {rc} (log {log}): {tail[-1500:]}")
        return time.time() - t0

    # ------------------------------------------------------------------ plan + preprocess
    def plans_file(self) -> str:
        return os.path.join(self.pre_root, self.dataset_name, f"{self.plans}.json")

    def ensure_preprocessed(self) -> None:
        marker = os.path.join(self.out, "state", "preprocessed.done")
        if os.path.isfile(marker) and os.path.isfile(self.plans_file()):
            return
        did, logs, b = str(self.dataset_id), os.path.join(self.out, "logs"), self.budget
        plan_env = self.env(nnUNet_n_proc_DA=None)  # nnU-Net's planning crashes with nnUNet_n_proc_DA=0
        base = f"{self.plans}_base"
        self.command("fingerprint", ["nnUNetv2_extract_fingerprint", "-d", did, "-np", "1"],
                     os.path.join(logs, "fingerprint.log"), plan_env)
        plan = ["nnUNetv2_plan_experiment", "-d", did, "-overwrite_plans_name", base]
        if b.gpu_memory_target:
            plan += ["-gpu_memory_target", f"{b.gpu_memory_target:g}"]
        self.command("plan", plan, os.path.join(logs, "plan.log"), plan_env)
        self._write_plans(base)
        self.command("preprocess", ["nnUNetv2_preprocess", "-d", did, "-plans_name", self.plans, "-c", CONFIGURATION,
                                    "-np", "1"], os.path.join(logs, "preprocess.log"), plan_env)
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        open(marker, "w").close()

    def _write_plans(self, base: str) -> None:
        """Copy of the planned plans with this budget's name (and patch size); the echo shows what changed."""
        src = os.path.join(self.pre_root, self.dataset_name, f"{base}.json")
        if not os.path.isfile(src):
            raise StepFailed(f"planning wrote no {src}")
        with open(src) as f:
            plans = bench_plans(json.load(f), self.plans, self.budget)
        conf = plans["configurations"][CONFIGURATION]
        with open(self.plans_file(), "w") as f:
            json.dump(plans, f, indent=1)
        self.echo(f"# wrote {self.plans_file()}: {base} with patch {conf['patch_size']}, batch {conf['batch_size']}, "
                  f"features {conf['architecture']['arch_kwargs']['features_per_stage']}")

