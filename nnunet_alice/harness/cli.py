"""``alice_benchmark``: does pretraining help? Paired, init-matched nnU-Net runs over label counts and seeds.

One command, on any nnU-Net raw dataset (``$nnUNet_raw``)::

    alice_benchmark -d 990 --demo --budget small

1. plans and preprocesses the dataset into the benchmark's own ``nnUNet_preprocessed`` (a CPU-sized plan on CPU
   budgets; the user's preprocessed data and splits are never touched);
2. writes each seed's initial weights (the planned network drawn after ``torch.manual_seed(seed)``);
3. pretrains every pretrained arm per seed, starting from that seed's initial weights (``alice_pretrain
   --init-weights``); budgets with ``pretrain_per_seed`` off pretrain once per arm from seed 0's draw and start
   every cell from it;
4. fine-tunes every (arm, labels, seed) cell with the harness trainer from the same initial weights: the same
   plans, labelled subset and validation cases (one nnU-Net fold per (labels, seed)), trainer seed and budget.
   ``scratch`` is nnU-Net's own schedule (SGD 1e-2, poly per epoch); pretrained arms use the recipe for
   pretrained weights (peak 1e-3, per-iteration warm-up, poly) unless the arm says otherwise (``alice_nnunet``,
   ``mae_nnunet``: nnU-Net's schedule; ``alice_enclr``: the decoder at 1e-2, the encoder at 1e-3);
   ``scratch_recipe``, ``scratch_enclr`` and ``init0`` are the controls (scratch with that
   recipe; the initial weights loaded like a checkpoint of zero pretraining steps);
5. predicts the held-out test cases (``imagesTs``/``labelsTs``; without them ``--holdout`` training cases are
   set aside) and evaluates them with nnU-Net's ``nnUNetv2_evaluate_folder``; with ``--probe``, also runs the
   linear probe (encoder features) of each cell's starting weights, the initial weights for scratch;
6. writes ``results.csv`` (one row per cell), ``results.md`` (mean ± sd, paired differences to scratch with 95 %
   confidence intervals, the budget check) and ``results_dice.png``.

``--jobs N`` runs N pretrainings, and then N cells, at once (each cell trains into its own nnU-Net results folder).
Every command is printed (with the environment it needs) before it runs, so any cell can be rerun by hand.
Rerunning the command resumes: finished cells, initial weights and pretraining are reused. A failing step marks
its cells ``failed`` (with the error tail in the CSV) and the others go on.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

from nnunet_alice.errors import AliceError, cli_main
from nnunet_alice.harness import report as bench_report
from nnunet_alice.harness.config import (BENCH_TRAINERS, CONFIGURATION, CURVE_FILE, METHODS, Budget, FoldRegistry,
                                         check_budget, get_budget, resolve_arms, resolve_label_counts)
from nnunet_alice.harness.report import _read_json, _write_json, read_summary
from nnunet_alice.harness.runner import run_all, subprocess_runner
from nnunet_alice.harness.workspace import BenchSetup, Runner, StepFailed
from nnunet_alice.harness.steps import probe_available
from nnunet_alice.trainers.recipe import LR_ENV

SHARED_INIT_SEED = 0  # the draw every cell starts from when pretraining is not repeated per seed
STEPS = [sys.executable, "-m", "nnunet_alice.harness.steps"]
#: what the probe column reads: every encoder stage, upsampled and concatenated. The decoder's last features are
#: not what an encoder-loaded fine-tuning keeps, and on the anatomy demo they probe at chance for every start
#: (docs/results.md), while the encoder separates pretrained from random starts.
PROBE_FEATURES = "encoder"

__all__ = ["Benchmark", "StepFailed", "read_summary", "main"]


class Benchmark(BenchSetup):
    def __init__(self, dataset: str, budget: Budget, output: Optional[str] = None,
                 methods: Optional[Sequence[str]] = None, demo: bool = False, holdout: int = 0,
                 runner: Runner = subprocess_runner, echo=print, probe: bool = False, jobs: int = 1,
                 versus: Sequence[str] = ()):
        super().__init__(dataset, budget, output, demo, holdout, runner, echo)
        self.versus = list(versus)  # arms the report also pairs every arm with, besides scratch
        self.arms = resolve_arms(list(methods or budget.methods))
        self.methods = list(self.arms)
        self.probe = bool(probe)
        if int(jobs) < 1:
            raise AliceError(f"--jobs {jobs}: need at least 1")
        self.jobs, self._lock = int(jobs), threading.Lock()

    def _map(self, fn, items: list) -> list:
        return run_all(fn, items, self.jobs)

    def arm(self, name: str):
        return self.arms.get(name) or METHODS[name]

    # ------------------------------------------------------------------ initial weights
    def init_seed(self, seed: int) -> int:
        return int(seed) if self.budget.pretrain_per_seed else SHARED_INIT_SEED

    def init_file(self, init_seed: int) -> str:
        return os.path.join(self.out, "init", f"init_s{init_seed}.pth")

    def ensure_init(self, init_seed: int) -> str:
        path = self.init_file(init_seed)
        if not os.path.isfile(path):
            self.command(f"initial weights seed={init_seed}",
                         STEPS + ["init", "-d", str(self.dataset_id), "-p", self.plans, "-c", CONFIGURATION,
                                  "--seed", str(init_seed), "-o", path],
                         os.path.join(self.out, "logs", f"init_s{init_seed}.log"))
        return path

    # ------------------------------------------------------------------ pretraining
    def pretrain_key(self, method: str) -> Optional[str]:
        arm = self.arm(method)
        return (arm.shares or method) if arm.pretrained else None

    def pretrain_root(self, key: str, init_seed: int) -> str:
        return os.path.join(self.out, "pretrain", key, f"s{init_seed}")

    def checkpoint(self, key: str, init_seed: int) -> str:
        return os.path.join(self.pretrain_root(key, init_seed), self.dataset_name,
                            f"AlicePretrain__{self.plans}__{CONFIGURATION}", "checkpoint_final.pth")

    def ensure_pretrained(self, key: str, init_seed: int) -> Tuple[str, float]:
        ckpt, b, root = self.checkpoint(key, init_seed), self.budget, self.pretrain_root(key, init_seed)
        timing = os.path.join(root, "time.json")
        if os.path.isfile(ckpt):
            return ckpt, _read_json(timing).get("seconds", float("nan"))
        steps = b.pretrain_steps * self.arm(key).steps_factor
        argv = ["alice_pretrain", "-d", str(self.dataset_id), "-p", self.plans, "-c", CONFIGURATION,
                "-device", b.device, "--steps", str(steps), "--log-every", "10",
                "--seed", str(init_seed), "--init-weights", self.init_file(init_seed)]
        if b.pretrain_batch:
            argv += ["--batch-size", str(b.pretrain_batch)]
        unlabeled = os.path.join(self.raw, "imagesUnlabeled")
        if os.path.isdir(unlabeled) and os.listdir(unlabeled):
            argv += ["--unlabeled", unlabeled]
        argv += list(b.pretrain_args) + list(self.arm(key).pretrain or [])
        if os.path.isfile(os.path.join(os.path.dirname(ckpt), "checkpoint_latest.pth")):
            argv.append("--continue")
        seconds = self.command(f"pretrain {key} seed={init_seed}", argv,
                               os.path.join(self.out, "logs", f"pretrain_{key}_s{init_seed}.log"),
                               self.env(nnUNet_results=root))
        _write_json(timing, {"seconds": seconds})
        return ckpt, seconds

    # ------------------------------------------------------------------ cells
    def cell_dir(self, method: str, n: int, seed: int) -> str:
        return os.path.join(self.out, "cells", method, f"n{n}_s{seed}")

    def results_root(self, method: str, n: int, seed: int) -> str:
        return os.path.join(self.out, "runs", method, f"n{n}_s{seed}")  # own folder: cells may run at once

    def fold_dir(self, method: str, n: int, seed: int, fold: int) -> str:
        trainer = BENCH_TRAINERS[self.arm(method).schedule]
        return os.path.join(self.results_root(method, n, seed), self.dataset_name,
                            f"{trainer}__{self.plans}__{CONFIGURATION}", f"fold_{fold}")

    def missing_curve(self, row: dict) -> dict:
        """The learning-curve fields (``report.learning_tail``) of a finished cell that an older version of the
        harness wrote without them, read from the curve on disk; empty when the row has them or is no such cell."""
        if "ema_dice_third" in row or row.get("fold") is None or row["method"] not in {**METHODS, **self.arms}:
            return {}
        fold = self.fold_dir(row["method"], int(row["labels"]), int(row["seed"]), int(row["fold"]))
        return bench_report.learning_tail(os.path.join(fold, CURVE_FILE))

    def collect(self) -> List[dict]:
        """Every cell of this folder (``report.collect``), older finished cells with their learning-curve fields."""
        rows = bench_report.collect(self.out)
        for r in rows:
            if r.get("status") == "ok":
                r.update(self.missing_curve(r))
        return rows

    def run_cell(self, method: str, n: int, seed: int, fold: int, start: str) -> dict:
        """Train, predict and evaluate one cell; ``start``: what nnUNet_alice_pretrained points to."""
        cdir, b, arm = self.cell_dir(method, n, seed), self.budget, self.arm(method)
        trainer = BENCH_TRAINERS[arm.schedule]
        results = self.results_root(method, n, seed)
        env = self.env(nnUNet_results=results, nnUNet_alice_pretrained=start, nnUNet_alice_load=arm.load_scope,
                       nnUNet_alice_bench_recipe=arm.recipe, **({} if arm.lr is None else {LR_ENV: f"{arm.lr:g}"}),
                       nnUNet_alice_bench_init=self.init_file(self.init_seed(seed)),
                       nnUNet_alice_bench_epochs=str(b.epochs), nnUNet_alice_bench_iterations=str(b.iterations),
                       nnUNet_alice_bench_val_iterations=str(b.val_iterations), nnUNet_alice_bench_seed=str(seed))
        fold_dir = self.fold_dir(method, n, seed, fold)
        times = {"train_s": 0.0, "predict_s": 0.0, "eval_s": 0.0}
        did = str(self.dataset_id)
        if not os.path.isfile(os.path.join(fold_dir, "checkpoint_final.pth")):
            argv = ["nnUNetv2_train", did, CONFIGURATION, str(fold), "-tr", trainer, "-p", self.plans,
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
             "-tr", trainer, "-p", self.plans, "-device", b.device, "--disable_tta", "-step_size", f"{b.step_size:g}",
             "-npp", "1", "-nps", "1"],
            os.path.join(cdir, "predict.log"), env)
        summary = os.path.join(cdir, "summary.json")
        times["eval_s"] = self.command(
            f"evaluate {method} n={n} seed={seed}",
            ["nnUNetv2_evaluate_folder", self.test_labels, pred, "-djfile", os.path.join(self.raw, "dataset.json"),
             "-pfile", self.plans_file(), "-o", summary, "-np", "1"], os.path.join(cdir, "evaluate.log"), env)
        dice, per_class = read_summary(summary)
        return {"dice": dice, "per_class": per_class, **times, "fold": fold, "num_test": len(self.test_cases),
                **bench_report.learning_tail(os.path.join(fold_dir, CURVE_FILE))}

    def probe_cell(self, method: str, n: int, seed: int, start: str) -> dict:
        """Linear-probe Dice of the cell's starting weights (cached per checkpoint, labels and seed): the arm's
        checkpoint, or for arms that load none (scratch) the seed's initial weights, i.e. the random baseline."""
        key = self.pretrain_key(method) or "init"
        checkpoint = start if start not in ("none", "") else self.ensure_init(self.init_seed(seed))
        name = f"n{n}_s{seed}_{PROBE_FEATURES}.json"
        path = os.path.join(self.out, "probe", key, f"s{self.init_seed(seed)}", name)
        if not os.path.isfile(path):
            self.command(f"probe {key} n={n} seed={seed}",
                         STEPS + ["probe", "-d", str(self.dataset_id), "-p", self.plans, "-c", CONFIGURATION,
                                  "--checkpoint", checkpoint, "--labels", str(n), "--seed", str(seed),
                                  "--features", PROBE_FEATURES, "-o", path],
                         os.path.join(self.out, "logs", f"probe_{key}_n{n}_s{seed}.log"))
        return {"probe_dice": float(_read_json(path).get("mean_dice", float("nan"))), "probe_features": PROBE_FEATURES}

    # ------------------------------------------------------------------ the whole job
    def run(self) -> List[dict]:
        t_start = time.time()
        os.makedirs(self.out, exist_ok=True)
        check_budget(os.path.join(self.out, "state", "budget.json"), self.budget)
        self.ensure_dataset()
        self.ensure_preprocessed()
        counts = resolve_label_counts(self.budget.labels, len(self.train_cases))
        registry = FoldRegistry(os.path.join(self.out, "folds.json"))
        pairs = [(n, s) for s in self.budget.seeds for n in counts]
        folds = {p: registry.fold(*p) for p in sorted(pairs)}  # fold numbers in (labels, seed) order
        registry.write(self.train_cases, os.path.join(self.pre_root, self.dataset_name, "splits_final.json"))
        if self.probe and not probe_available():
            self.echo("# --probe ignored: nnunet_alice.probe.cli is not installed")
            self.probe = False
        self.echo(f"# {self.dataset_name}: {len(self.train_cases)} labelled training cases, {len(self.test_cases)} "
                  f"test cases; arms {', '.join(self.methods)}; labels {counts}; seeds {self.budget.seeds}; "
                  f"pretraining {'per seed' if self.budget.pretrain_per_seed else 'once per arm, from seed 0'}; "
                  f"output {self.out}")
        # seed by seed: initial weights, pretraining from them, then the cells of that seed (fewest labels first),
        # so that every finished seed is a complete paired comparison
        rows, finished = [], []
        for seed in self.budget.seeds:
            starts = self._starts(seed, [n for n, s in pairs if s == seed])

            def cell(task, seed=seed, starts=starts):
                method, n = task
                row = self._cell(method, n, seed, folds[(n, seed)], *starts[method])
                with self._lock:
                    finished.append(row)
                    bench_report.write_all(self.out, finished, self.budget, self.dataset_name, plot=False,
                                           versus=self.versus)
                return row
            rows += self._map(cell, [(method, n) for n in counts for method in self.methods])
        # the tables cover every cell of this folder, also those of earlier runs with other labels/seeds/methods
        all_rows = self.collect()
        bench_report.write_all(self.out, all_rows, self.budget, self.dataset_name, versus=self.versus)
        for line in bench_report.warnings(all_rows):
            self.echo(f"# WARNING: {line}")
        total = time.time() - t_start
        _write_json(os.path.join(self.out, "state", f"run_{int(t_start)}.json"),
                    {"seconds": total, "commands": self.commands_run})
        self.echo(f"# done in {total / 60:.1f} min ({self.commands_run} commands): "
                  f"{os.path.join(self.out, 'results.md')}, results.csv, results_dice.png")
        return rows

    def _starts(self, seed: int, counts: List[int]) -> Dict[str, Tuple[str, float, Optional[str]]]:
        """method -> (nnUNet_alice_pretrained value, pretraining seconds, error) for the cells of ``seed``."""
        init_seed, out = self.init_seed(seed), {}
        todo = {m for m in self.methods for n in counts
                if not os.path.isfile(os.path.join(self.cell_dir(m, n, seed), "metrics.json"))}
        init_err = None
        if todo:
            try:
                self.ensure_init(init_seed)
            except StepFailed as e:
                init_err = f"initial weights failed: {e}"

        def pretrain(key: str) -> Tuple[str, float, Optional[str]]:
            ckpt, seconds, err = self.checkpoint(key, init_seed), 0.0, init_err
            try:
                if todo & {m for m in self.methods if self.pretrain_key(m) == key} and not err:
                    ckpt, seconds = self.ensure_pretrained(key, init_seed)
                else:
                    seconds = _read_json(os.path.join(self.pretrain_root(key, init_seed), "time.json")).get(
                        "seconds", 0.0)
            except StepFailed as e:
                err = f"pretraining failed: {e}"
            return ckpt, seconds, err
        keys = list(dict.fromkeys(k for k in map(self.pretrain_key, self.methods) if k))
        done = dict(zip(keys, self._map(pretrain, keys)))
        for method in self.methods:
            start = self.arm(method).start
            out[method] = (("none", 0.0, init_err) if start == "none" else
                           (self.init_file(init_seed), 0.0, init_err) if start == "init" else
                           done[self.pretrain_key(method)])
        return out

    def _cell(self, method, n, seed, fold, start, pre_s, pre_err) -> dict:
        cdir, arm = self.cell_dir(method, n, seed), self.arm(method)
        metrics_path = os.path.join(cdir, "metrics.json")
        base = {"method": method, "labels": n, "seed": seed, "fold": fold, "pretrain_s": pre_s,
                "init_seed": self.init_seed(seed), "recipe": arm.recipe, "peak_lr": arm.lr, "load_scope": arm.load_scope
                if arm.start != "none" else "", "schedule": arm.schedule}
        if os.path.isfile(metrics_path):
            row = {**base, **_read_json(metrics_path), "skipped": True}
            extra = self.missing_curve(row)  # a cell finished by an older run
            if self.probe and row.get("probe_features") != PROBE_FEATURES:
                extra.update(self._probe(method, n, seed, start))
            if extra:
                row.update(extra)
                _write_json(metrics_path, {k: v for k, v in row.items() if k != "skipped"})
            return row
        os.makedirs(cdir, exist_ok=True)
        t0 = time.time()
        try:
            if pre_err:
                raise StepFailed(pre_err)
            result = self.run_cell(method, n, seed, fold, start)
            result.update(status="ok", wall_s=time.time() - t0, error="")
            if self.probe:
                result.update(self._probe(method, n, seed, start))
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

    def _probe(self, method, n, seed, start) -> dict:
        try:
            return self.probe_cell(method, n, seed, start)
        except StepFailed as e:  # the probe is an extra column: its failure never fails the cell
            self.echo(f"# probe failed for {method} n={n} seed={seed}: {str(e).splitlines()[0]}")
            return {"probe_dice": float("nan"), "probe_error": str(e)[-500:]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alice_benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", dest="dataset", default="990", help="dataset ID or name in $nnUNet_raw (default 990)")
    p.add_argument("--demo", action="store_true", help="generate the MNI demo dataset first if it does not exist")
    p.add_argument("--budget", default="small", help="tiny | small (README demo, about 20 min on 2 CPU cores) | "
                                                     "medium | long (CPU, hours) | gpu15 (one GPU, ~10 min) | large")
    p.add_argument("--methods", nargs="+", help=f"arms ({', '.join(METHODS)}) or NAME='alice_pretrain flags'; "
                                                "default: the budget's")
    p.add_argument("--labels", nargs="+", help="numbers of labelled cases, e.g. 1 2 4 all")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds (labelled subset, initial weights, trainer seed)")
    p.add_argument("--pretrain-steps", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--iterations", type=int, help="fine-tuning iterations per epoch")
    p.add_argument("--val-iterations", type=int)
    p.add_argument("--patch-size", type=int, nargs=3)
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--pretrain-per-seed", action=argparse.BooleanOptionalAction, default=None,
                   help="one pretraining per seed, from that seed's initial weights (includes the pretraining's "
                        "own variance in the intervals); --no-pretrain-per-seed: one per arm, from seed 0's "
                        "weights; default: the budget's")
    p.add_argument("--jobs", type=int, default=1, help="pretrainings, then cells, run at once (default 1)")
    p.add_argument("--holdout", type=int, default=0, help="evaluate on this many training cases set aside "
                                                          "(default: imagesTs/labelsTs, else 20 %% of imagesTr)")
    p.add_argument("--probe", action="store_true", help="add the linear-probe Dice of each cell's starting weights "
                                                        "(encoder features; scratch: the initial weights)")
    p.add_argument("-o", "--output", help="benchmark folder (default $nnUNet_results/alice_benchmark/"
                                          "<Dataset>__<budget>)")
    p.add_argument("--versus", nargs="+", default=[], metavar="ARM",
                   help="also tabulate every arm's paired differences to these arms, e.g. mae_nnunet")
    p.add_argument("--report", action="store_true", help="only rewrite the CSV/markdown/plot from finished cells")
    return p


@cli_main
def main(argv: Optional[List[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the running command is stopped as well
    budget = get_budget(a.budget, labels=a.labels, seeds=a.seeds, pretrain_steps=a.pretrain_steps, epochs=a.epochs,
                        iterations=a.iterations, val_iterations=a.val_iterations, patch_size=a.patch_size,
                        device=a.device, pretrain_per_seed=a.pretrain_per_seed)
    bench = Benchmark(a.dataset, budget, a.output, a.methods, a.demo, a.holdout,
                      echo=lambda s: print(s, flush=True), probe=a.probe, jobs=a.jobs, versus=a.versus)
    if a.report:
        rows = bench.collect()
        bench_report.write_all(bench.out, rows, budget, bench.dataset_name, versus=a.versus)
    else:
        try:
            rows = bench.run()
        except StepFailed as e:  # dataset, fingerprint, plan or preprocessing: nothing to run without them
            raise AliceError(f"alice_benchmark: {e.one_line()}") from None
    print(bench_report.markdown_table(rows, a.versus), flush=True)
    failed = sum(r.get("status") != "ok" for r in rows)
    if failed:
        print(f"{failed} cell(s) failed; see status/error in {os.path.join(bench.out, 'results.csv')}",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
