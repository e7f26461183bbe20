"""``alice_benchmark``: does pretraining help? Paired scratch-vs-pretrained nnU-Net runs over label counts.

One command, on any nnU-Net raw dataset (``$nnUNet_raw``)::

    alice_benchmark -d 990 --demo --budget small

1. plans and preprocesses the dataset into the benchmark's own ``nnUNet_preprocessed`` (a CPU-sized plan on CPU
   budgets; the user's preprocessed data and splits are never touched);
2. pretrains one checkpoint per pretrained method (``alice_pretrain``, each into its own results root);
3. fine-tunes ``nnUNetTrainerAlice_bench`` for every (method, labels, seed) cell: the same plans, the same
   labelled subset and validation cases (one nnU-Net fold per (labels, seed)), the same trainer seed and budget;
   ``scratch`` is the same trainer with ``nnUNet_alice_pretrained=none``;
4. predicts the held-out test cases (``imagesTs``/``labelsTs``; without them ``--holdout`` training cases are
   set aside) and evaluates them with nnU-Net's ``nnUNetv2_evaluate_folder``;
5. writes ``results.csv`` (one row per cell), ``results.md`` (mean ± sd per method and label count) and
   ``results_dice.png``.

Every command is printed (with the environment it needs) before it runs, so any cell can be rerun by hand.
Rerunning the command resumes: a cell whose ``metrics.json`` exists is skipped, pretraining whose
``checkpoint_final.pth`` exists is skipped. A failing step marks its cells ``failed`` (with the error tail in the
CSV) and the others go on.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from nnunet_alice.errors import AliceError, cli_main
from nnunet_alice.tools import bench_report
from nnunet_alice.tools.bench_report import _read_json, _write_json, read_summary
from nnunet_alice.tools.bench_runner import subprocess_runner
from nnunet_alice.tools.bench_config import (CONFIGURATION, TRAINER, Budget, FoldRegistry, bench_plans, get_budget,
                                             check_budget, link_holdout, parse_method,
                                             resolve_label_counts)

Runner = Callable[[List[str], Dict[str, str], str], Tuple[int, str]]


class StepFailed(Exception):
    """A command exited with an error: its cells are reported as failed, the others go on."""


class Benchmark:
    def __init__(self, dataset: str, budget: Budget, output: Optional[str] = None,
                 methods: Optional[Sequence[str]] = None, demo: bool = False, holdout: int = 0,
                 runner: Runner = subprocess_runner, echo: Callable[[str], None] = print):
        self.raw_root = os.environ.get("nnUNet_raw")
        if not self.raw_root:
            raise AliceError("set nnUNet_raw to the folder holding Dataset<ID>_<Name> (or where --demo writes it)")
        self.dataset_arg, self.budget, self.demo, self.holdout = str(dataset), budget, demo, int(holdout)
        self.methods = dict(parse_method(m) for m in (methods or budget.methods))
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
        return [] if not os.path.isdir(folder) else sorted(f[:-len(self.ending)] for f in os.listdir(folder) if f.endswith(self.ending))

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
        """A folder for nnUNet_extTrainer holding a one-line module that exports the harness trainer."""
        folder = os.path.join(self.out, "trainers")
        path = os.path.join(folder, "nnunet_alice_bench_trainer.py")
        if not os.path.isfile(path):
            os.makedirs(folder, exist_ok=True)
            with open(path, "w") as f:
                f.write(f"from nnunet_alice.tools.bench_trainers import {TRAINER}  # noqa: F401 (alice_benchmark)\n")
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
            raise StepFailed(f"{what} exited with {rc}: {tail[-1500:]}")
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

    # ------------------------------------------------------------------ pretraining
    def checkpoint(self, method: str) -> str:
        return os.path.join(self.out, "pretrain", method, self.dataset_name,
                            f"AlicePretrain__{self.plans}__{CONFIGURATION}", "checkpoint_final.pth")

    def ensure_pretrained(self, method: str) -> Tuple[str, float]:
        ckpt, b = self.checkpoint(method), self.budget
        timing = os.path.join(self.out, "pretrain", method, "time.json")
        if os.path.isfile(ckpt):
            return ckpt, _read_json(timing).get("seconds", float("nan"))
        argv = ["alice_pretrain", "-d", str(self.dataset_id), "-p", self.plans, "-c", CONFIGURATION,
                "-device", b.device, "--steps", str(b.pretrain_steps), "--log-every", "10"]
        if b.pretrain_batch:
            argv += ["--batch-size", str(b.pretrain_batch)]
        unlabeled = os.path.join(self.raw, "imagesUnlabeled")
        if os.path.isdir(unlabeled) and os.listdir(unlabeled):
            argv += ["--unlabeled", unlabeled]
        argv += list(b.pretrain_args) + list(self.methods[method])
        if os.path.isfile(os.path.join(os.path.dirname(ckpt), "checkpoint_latest.pth")):
            argv.append("--continue")
        seconds = self.command(f"pretrain {method}", argv, os.path.join(self.out, "logs", f"pretrain_{method}.log"),
                               self.env(nnUNet_results=os.path.join(self.out, "pretrain", method)))
        _write_json(timing, {"seconds": seconds})
        return ckpt, seconds

    # ------------------------------------------------------------------ cells
    def cell_dir(self, method: str, n: int, seed: int) -> str:
        return os.path.join(self.out, "cells", method, f"n{n}_s{seed}")

    def run_cell(self, method: str, n: int, seed: int, fold: int, ckpt: Optional[str]) -> dict:
        cdir, b = self.cell_dir(method, n, seed), self.budget
        results = os.path.join(self.out, "runs", method)
        env = self.env(nnUNet_results=results, nnUNet_alice_pretrained=ckpt or "none",
                       ALICE_BENCH_EPOCHS=str(b.epochs), ALICE_BENCH_ITERATIONS=str(b.iterations),
                       ALICE_BENCH_VAL_ITERATIONS=str(b.val_iterations), ALICE_BENCH_SEED=str(seed))
        fold_dir = os.path.join(results, self.dataset_name, f"{TRAINER}__{self.plans}__{CONFIGURATION}",
                                f"fold_{fold}")
        times = {"train_s": 0.0, "predict_s": 0.0, "eval_s": 0.0}
        did = str(self.dataset_id)
        if not os.path.isfile(os.path.join(fold_dir, "checkpoint_final.pth")):
            argv = ["nnUNetv2_train", did, CONFIGURATION, str(fold), "-tr", TRAINER, "-p", self.plans,
                    "-device", b.device]
            if os.path.isfile(os.path.join(fold_dir, "checkpoint_latest.pth")):
                argv.append("--c")
            times["train_s"] = self.command(f"train {method} n={n} seed={seed}", argv,
                                            os.path.join(cdir, "train.log"), env)
        pred = os.path.join(cdir, "pred")
        shutil.rmtree(pred, ignore_errors=True)
        times["predict_s"] = self.command(
            f"predict {method} n={n} seed={seed}",
            ["nnUNetv2_predict", "-i", self.test_images, "-o", pred, "-d", did, "-c", CONFIGURATION, "-f", str(fold),
             "-tr", TRAINER, "-p", self.plans, "-device", b.device, "--disable_tta", "-step_size", f"{b.step_size:g}",
             "-npp", "1", "-nps", "1"],
            os.path.join(cdir, "predict.log"), env)
        summary = os.path.join(cdir, "summary.json")
        times["eval_s"] = self.command(
            f"evaluate {method} n={n} seed={seed}",
            ["nnUNetv2_evaluate_folder", self.test_labels, pred, "-djfile", os.path.join(self.raw, "dataset.json"),
             "-pfile", self.plans_file(), "-o", summary, "-np", "1"], os.path.join(cdir, "evaluate.log"), env)
        dice, per_class = read_summary(summary)
        return {"dice": dice, "per_class": per_class, **times, "fold": fold, "num_test": len(self.test_cases)}

    # ------------------------------------------------------------------ the whole job
    def run(self) -> List[dict]:
        t_start = time.time()
        os.makedirs(self.out, exist_ok=True)
        check_budget(os.path.join(self.out, "state", "budget.json"), self.budget)
        self.ensure_dataset()
        self.ensure_preprocessed()
        counts = resolve_label_counts(self.budget.labels, len(self.train_cases))
        registry = FoldRegistry(os.path.join(self.out, "folds.json"))
        pairs = [(n, s) for n in counts for s in self.budget.seeds]
        folds = {p: registry.fold(*p) for p in pairs}
        registry.write(self.train_cases, os.path.join(self.pre_root, self.dataset_name, "splits_final.json"))
        self.echo(f"# {self.dataset_name}: {len(self.train_cases)} labelled training cases, {len(self.test_cases)} "
                  f"test cases; methods {', '.join(self.methods)}; labels {counts}; seeds {self.budget.seeds}; "
                  f"output {self.out}")
        # pretraining first (one checkpoint per arm), then the cells by (labels, seed) so that every finished
        # (labels, seed) pair is a complete paired comparison, fewest labels first
        pre: Dict[str, Tuple[Optional[str], float, Optional[str]]] = {}
        for method, flags in self.methods.items():
            ckpt, pre_s, pre_err = None, 0.0, None
            todo = [p for p in pairs if not os.path.isfile(os.path.join(self.cell_dir(method, *p), "metrics.json"))]
            if flags is not None:
                try:
                    if todo:
                        ckpt, pre_s = self.ensure_pretrained(method)
                    else:
                        pre_s = _read_json(os.path.join(self.out, "pretrain", method, "time.json")).get("seconds", 0.0)
                except StepFailed as e:
                    pre_err = f"pretraining failed: {e}"
            pre[method] = (ckpt, pre_s, pre_err)
        rows = []
        for n, seed in pairs:
            for method in self.methods:
                rows.append(self._cell(method, n, seed, folds[(n, seed)], *pre[method]))
                bench_report.write_all(self.out, rows, self.budget, self.dataset_name, plot=False)
        # the tables cover every cell of this folder, also those of earlier runs with other labels/seeds/methods
        bench_report.write_all(self.out, bench_report.collect(self.out), self.budget, self.dataset_name)
        total = time.time() - t_start
        _write_json(os.path.join(self.out, "state", f"run_{int(t_start)}.json"),
                    {"seconds": total, "commands": self.commands_run})
        self.echo(f"# done in {total / 60:.1f} min ({self.commands_run} commands): "
                  f"{os.path.join(self.out, 'results.md')}, results.csv, results_dice.png")
        return rows

    def _cell(self, method, n, seed, fold, ckpt, pre_s, pre_err) -> dict:
        cdir = self.cell_dir(method, n, seed)
        metrics_path = os.path.join(cdir, "metrics.json")
        base = {"method": method, "labels": n, "seed": seed, "fold": fold, "pretrain_s": pre_s}
        if os.path.isfile(metrics_path):
            return {**base, **_read_json(metrics_path), "skipped": True}
        os.makedirs(cdir, exist_ok=True)
        t0 = time.time()
        try:
            if pre_err:
                raise StepFailed(pre_err)
            result = self.run_cell(method, n, seed, fold, ckpt)
            result.update(status="ok", wall_s=time.time() - t0, error="")
            _write_json(metrics_path, {**base, **result})
            if os.path.exists(os.path.join(cdir, "failed.json")):
                os.remove(os.path.join(cdir, "failed.json"))
            return {**base, **result}
        except (StepFailed, OSError, ValueError, KeyError) as e:
            err = f"{type(e).__name__}: {e}" if not isinstance(e, StepFailed) else str(e)
            self.echo(f"# FAILED {method} n={n} seed={seed}: {err.splitlines()[0] if err else ''}")
            result = {**base, "status": "failed", "dice": float("nan"), "per_class": {}, "wall_s": time.time() - t0,
                      "error": err}
            _write_json(os.path.join(cdir, "failed.json"), result)
            return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alice_benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", dest="dataset", default="990", help="dataset ID or name in $nnUNet_raw (default 990)")
    p.add_argument("--demo", action="store_true", help="generate the MNI demo dataset first if it does not exist")
    p.add_argument("--budget", default="small", help="tiny | small (README demo, <= 20 min on 2 CPU cores) | "
                                                     "medium | large (GPU)")
    p.add_argument("--methods", nargs="+", help="methods (scratch, alice, mae, alice_nocasa, alice_nocls, "
                                                "alice_norecon, alice_dinotemp, alice_registration, alice_embedding) "
                                                "or NAME='alice_pretrain flags'; default: the budget's")
    p.add_argument("--labels", nargs="+", help="numbers of labelled cases, e.g. 1 2 4 all")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds (labelled subset + trainer seed)")
    p.add_argument("--pretrain-steps", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--iterations", type=int, help="fine-tuning iterations per epoch")
    p.add_argument("--val-iterations", type=int)
    p.add_argument("--patch-size", type=int, nargs=3)
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--holdout", type=int, default=0, help="evaluate on this many training cases set aside "
                                                          "(default: imagesTs/labelsTs, else 20 %% of imagesTr)")
    p.add_argument("-o", "--output", help="benchmark folder (default $nnUNet_results/alice_benchmark/"
                                          "<Dataset>__<budget>)")
    p.add_argument("--report", action="store_true", help="only rewrite the CSV/markdown/plot from finished cells")
    return p


@cli_main
def main(argv: Optional[List[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the running command is stopped as well
    budget = get_budget(a.budget, labels=a.labels, seeds=a.seeds, pretrain_steps=a.pretrain_steps, epochs=a.epochs,
                        iterations=a.iterations, val_iterations=a.val_iterations, patch_size=a.patch_size,
                        device=a.device)
    bench = Benchmark(a.dataset, budget, a.output, a.methods, a.demo, a.holdout,
                      echo=lambda s: print(s, flush=True))
    if a.report:
        rows = bench_report.collect(bench.out)
        bench_report.write_all(bench.out, rows, budget, bench.dataset_name)
    else:
        rows = bench.run()
    print(bench_report.markdown_table(rows), flush=True)
    failed = sum(r.get("status") != "ok" for r in rows)
    if failed:
        print(f"{failed} cell(s) failed; see status/error in {os.path.join(bench.out, 'results.csv')}",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
