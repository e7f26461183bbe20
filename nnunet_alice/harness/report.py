"""``alice_benchmark`` outputs: ``results.csv`` (one row per cell), ``results.md`` and ``results_dice.png``.

Paired differences to scratch are per seed (same labelled subset, same initial weights, same trainer seed); their
95 % confidence interval is the t interval over seeds, mean ± t(0.975, n-1) · sd / sqrt(n).
"""
from __future__ import annotations

import csv
import glob
import json
import math
import os
import textwrap
from typing import Dict, List, Sequence

import numpy as np

CSV_COLUMNS = ["method", "labels", "seed", "fold", "status", "dice", "per_class_dice", "probe_dice", "probe_features",
               "recipe", "peak_lr", "load_scope", "schedule", "init_seed", "wall_s", "train_s", "predict_s", "eval_s",
               "pretrain_s", "ema_dice_third", "ema_dice_end", "ema_dice_gain", "num_test", "error"]
BASELINE = "scratch"
CONVERGENCE_MARGIN = 0.02  # 2 Dice points
SPEED_TEXT = (" in speed (nnU-Net's EMA pseudo-Dice on the fold's validation cases when the first third of the "
              "epochs ended)")
STILL_LEARNING = 0.02      # median rise of the EMA pseudo-Dice over the last fifth of training that flags the budget


def collect(out: str) -> List[dict]:
    """Rows of every finished or failed cell under ``<out>/cells`` (for ``--report``)."""
    rows = []
    for path in sorted(glob.glob(os.path.join(out, "cells", "*", "*", "*.json"))):
        if os.path.basename(path) in ("metrics.json", "failed.json"):
            with open(path) as f:
                rows.append(json.load(f))
    return rows


def _fmt(v, digits=4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def write_csv(path: str, rows: List[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in sorted(rows, key=_order_key):
            row = {k: _fmt(r.get(k), 1 if k.endswith("_s") else 4) for k in CSV_COLUMNS}
            row["per_class_dice"] = ";".join(f"{k}:{v:.4f}" for k, v in sorted((r.get("per_class") or {}).items()))
            row["error"] = " | ".join(str(r.get("error") or "").splitlines())[-2000:]
            w.writerow(row)
    os.replace(tmp, path)


def _order_key(r: dict):
    return (r.get("method_order", 0), str(r["method"]), int(r["labels"]), int(r["seed"]))


def aggregate(rows: List[dict]) -> Dict[str, Dict[int, dict]]:
    """method -> labels -> {mean, sd, n, failed} over the seeds (sd with ddof=1; 0 for one seed)."""
    out: Dict[str, Dict[int, dict]] = {"scratch": {}} if any(r["method"] == "scratch" for r in rows) else {}
    for r in rows:
        cell = out.setdefault(r["method"], {}).setdefault(int(r["labels"]), {"values": [], "failed": 0})
        if r.get("status") == "ok":
            cell["values"].append(float(r["dice"]))
        else:
            cell["failed"] += 1
    for per in out.values():
        for cell in per.values():
            v = np.asarray(cell["values"], dtype=float)
            cell.update(n=len(v), mean=float(v.mean()) if len(v) else float("nan"),
                        sd=float(v.std(ddof=1)) if len(v) > 1 else 0.0)
    return out


def markdown_table(rows: List[dict], versus: Sequence[str] = ()) -> str:
    """Mean foreground Dice (×100) ± sd over seeds, per method and number of labelled cases; then the paired
    differences to scratch and to each arm in ``versus``; the probe Dice; the warnings."""
    agg = aggregate(rows)
    if not agg:
        return "(no results)"
    counts = sorted({n for per in agg.values() for n in per})
    lines = ["| method | " + " | ".join(f"{n} labelled" for n in counts) + " |",
             "|---|" + "---|" * len(counts)]
    for method, per in agg.items():
        cells = []
        for n in counts:
            c = per.get(n)
            if not c or not c["n"]:
                cells.append("failed" if c and c["failed"] else "")
                continue
            text = f"{100 * c['mean']:.1f} ± {100 * c['sd']:.1f} (n={c['n']})"
            if c["failed"]:
                text += f", {c['failed']} failed"
            cells.append(text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    for baseline in dict.fromkeys([BASELINE, *versus]):
        lines += paired_table(rows, baseline, counts)
    lines += paired_table(rows, BASELINE, counts, "ema_dice_third", SPEED_TEXT)
    probes = {(r["method"], int(r["labels"])): [] for r in rows if _finite(r.get("probe_dice"))}
    if probes:
        for r in rows:
            if _finite(r.get("probe_dice")):
                probes[(r["method"], int(r["labels"]))].append(100 * float(r["probe_dice"]))
        kinds = sorted({r.get("probe_features") or "decoder" for r in rows if _finite(r.get("probe_dice"))})
        lines += ["", f"Linear probe of each cell's starting weights ({' and '.join(kinds)} features, frozen network, "
                      "linear head; scratch: the initial weights), mean Dice × 100:", "",
                  "| method | " + " | ".join(f"{n} labelled" for n in counts) + " |", "|---|" + "---|" * len(counts)]
        for method in dict.fromkeys(m for m, _ in probes):
            lines.append(f"| {method} | " + " | ".join(
                f"{np.mean(probes[(method, n)]):.1f} (n={len(probes[(method, n)])})" if (method, n) in probes else ""
                for n in counts) + " |")
    notes = warnings(rows)
    if notes:
        lines += [""] + [f"**Warning:** {w}" for w in notes]
    return "\n".join(lines)


def paired_table(rows: List[dict], baseline: str, counts: List[int], key: str = "dice",
                 what: str = "") -> List[str]:
    """Lines of the table of paired differences ``method - baseline`` of the row field ``key`` (test Dice unless
    told; ``what`` names another field in the title); none when no method pairs with the baseline."""
    diffs = paired_differences(rows, baseline, key)
    if not diffs:
        if key != "dice" or baseline == BASELINE or any(
                r["method"] == baseline and r.get("status") == "ok" for r in rows):
            return []
        return ["", f"Paired difference to {baseline}: no finished cells of {baseline} in this folder."]
    lines = ["", f"Paired difference{what} to {baseline} (same labelled subset, initial weights and seed), "
                 "Dice points: mean [95 % CI over seeds] (n seeds):", "",
             "| method | " + " | ".join(f"{n} labelled" for n in counts) + " |", "|---|" + "---|" * len(counts)]
    for method, per in diffs.items():
        cells = []
        for n in counts:
            mean, half, k = paired_ci(per.get(n, []))
            cells.append("" if not k else f"{mean:+.1f} [{mean - half:+.1f}, {mean + half:+.1f}] (n={k})" if k > 1
                         else f"{mean:+.1f} (n=1)")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _finite(v) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def t_quantile(df: int, level: float = 0.95) -> float:
    """Two-sided Student-t quantile t((1 + level) / 2, df)."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


def paired_ci(diffs, level: float = 0.95):
    """``(mean, half width, n)`` of the t confidence interval of the mean of ``diffs`` (half width nan for n < 2)."""
    d = np.asarray(list(diffs), dtype=float)
    n = len(d)
    if n == 0:
        return float("nan"), float("nan"), 0
    if n == 1:
        return float(d[0]), float("nan"), 1
    return float(d.mean()), t_quantile(n - 1, level) * float(d.std(ddof=1)) / math.sqrt(n), n


def paired_differences(rows: List[dict], baseline: str = BASELINE,
                       key: str = "dice") -> Dict[str, Dict[int, List[float]]]:
    """method -> labels -> [Dice points (method - baseline) of the row field ``key``, one per seed where both cells
    are ok and have it]."""
    ok = {(r["method"], int(r["labels"]), int(r["seed"])): 100 * float(r[key]) for r in rows
          if r.get("status") == "ok" and _finite(r.get(key))}
    out: Dict[str, Dict[int, List[float]]] = {}
    for (m, n, s), v in ok.items():  # methods in the order of the rows, seeds in the order of the rows
        if m != baseline and (baseline, n, s) in ok:
            out.setdefault(m, {}).setdefault(n, []).append(v - ok[(baseline, n, s)])
    return out


def learning_tail(curve_path: str) -> dict:
    """From a cell's ``learning_curve.json``: nnU-Net's EMA pseudo-Dice at the last epoch (``ema_dice_end``), its
    rise over the last fifth of the epochs (``ema_dice_gain``, from 2 epochs on) and its value when the first third
    of the epochs ended (``ema_dice_third``, from 3 epochs on: how fast a start learns); empty without the file."""
    data = _read_json(curve_path)
    values = data.get("ema_fg_dice") if isinstance(data, dict) else None
    try:
        ema = [float(v) for v in values or []]
    except (TypeError, ValueError):
        return {}
    if not ema:
        return {}
    if len(ema) < 2:
        return {"ema_dice_end": ema[-1]}
    back = max(1, len(ema) // 5)
    tail = {"ema_dice_end": ema[-1], "ema_dice_gain": ema[-1] - ema[-1 - back]}
    if len(ema) >= 3:
        tail["ema_dice_third"] = ema[len(ema) // 3 - 1]
    return tail


def warnings(rows: List[dict], baseline: str = BASELINE, margin: float = CONVERGENCE_MARGIN,
             still: float = STILL_LEARNING) -> List[str]:
    """The budget check: scratch with the fewest labels within ``margin`` of (or above) scratch with the most labels;
    and cells still learning when they stopped (median ``ema_dice_gain`` of the finished cells >= ``still``)."""
    out = []
    gains = [float(r["ema_dice_gain"]) for r in rows
             if r.get("status", "ok") == "ok" and _finite(r.get("ema_dice_gain"))]
    if gains and float(np.median(gains)) >= still:
        out.append(f"the cells were still learning when fine-tuning stopped: nnU-Net's EMA pseudo-Dice rose by a "
                   f"median of {100 * float(np.median(gains)):+.1f} Dice over the last fifth of the epochs "
                   f"({len(gains)} cells, learning rate decaying to 0); the differences measure how fast each start "
                   f"learns, not where it ends; train longer (--epochs/--iterations)")
    per = aggregate([r for r in rows if r["method"] == baseline]).get(baseline, {})
    counts = [n for n in sorted(per) if per[n]["n"]]
    if len(counts) < 2:
        return out
    low, high = per[counts[0]]["mean"], per[counts[-1]]["mean"]
    if high - low >= margin:
        return out
    relation = (f"is within {100 * margin:.0f} Dice of" if low <= high else
                "is not below (fewer labels score higher than)")
    return [f"{baseline} with {counts[0]} labelled case(s) ({100 * low:.1f}) {relation} "
            f"{baseline} with {counts[-1]} ({100 * high:.1f}): this budget measures convergence speed, not label "
            f"efficiency; train longer (--epochs/--iterations)"] + out


#: recipe -> (name, settings); the pretrained recipe's peak comes from the row (``{peak}``)
RECIPE_TEXT = {"nnunet": ("nnU-Net's own schedule", ["SGD 1e-2", "poly per epoch"]),
               "pretrained": ("the recipe for pretrained weights",
                              ["SGD peak {peak}", "per-iteration linear warm-up", "poly"])}
SCHEDULE_TEXT = {"sawtooth": "sawtooth: decoder only first", "encLR": "encoder at 0.1 x the decoder's rate"}


def recipe_text(row: dict) -> str:
    """How a row's cell was fine-tuned, in words: its recipe, peak learning rate, schedule and, when the decoder
    was loaded too, the load scope."""
    recipe, lr, schedule = str(row.get("recipe") or "unknown"), row.get("peak_lr"), row.get("schedule") or "default"
    name, settings = RECIPE_TEXT.get(recipe, (recipe, []))
    peak = f"{float(lr):g}" if lr not in (None, "") else "1e-3"  # the recipe's default (trainers.recipe)
    parts = [x.format(peak=peak) for x in settings]
    if schedule != "default":
        parts.append(SCHEDULE_TEXT.get(schedule, schedule))
    if row.get("load_scope") == "all":
        parts.append("encoder + decoder loaded")
    return f"{name} ({', '.join(parts)})" if parts else name


def recipes_sentence(rows: List[dict]) -> str:
    """Which arms trained with which recipe, from the rows themselves (so the text cannot drift from the runs)."""
    by_recipe: Dict[str, List[str]] = {}
    for r in sorted(rows, key=_order_key):
        names = by_recipe.setdefault(recipe_text(r), [])
        if r["method"] not in names:
            names.append(r["method"])
    return "Recipes: " + "; ".join(f"{k}: " + ", ".join(f"`{m}`" for m in v) for k, v in by_recipe.items()) + "."


def seeds_of(rows: List[dict]) -> List[int]:
    """The seeds of the finished cells: what the tables average over. A folder can hold cells of several runs
    (``--seeds 1`` then ``--seeds 2``), so this is not the budget's or the last command's list."""
    return sorted({int(r["seed"]) for r in rows if r.get("status") == "ok"})


def write_markdown(path: str, rows: List[dict], budget, dataset: str, versus: Sequence[str] = ()) -> None:
    b = budget
    per_seed = getattr(b, "pretrain_per_seed", True)
    text = [f"# alice_benchmark: {dataset}, budget `{b.name}`", "",
            f"Mean foreground Dice on the held-out test cases (nnU-Net's evaluation), × 100, mean ± sd over seeds "
            f"{seeds_of(rows)} (n per cell below).", "", markdown_table(rows, versus), "",
            f"Budget: pretraining {b.pretrain_steps} steps "
            + ("per arm and seed, each from that seed's initial weights" if per_seed else
               "once per arm, from the initial weights of seed 0, which every cell starts from (the seeds vary the "
               "labelled subset and the sampling, not the initial draw)")
            + f"; fine-tuning {b.epochs} epochs × {b.iterations} iterations ({b.val_iterations} val iterations), "
              f"device {b.device}" + (f", patch {b.patch_size}" if b.patch_size else "") + ".",
            recipes_sentence(rows),
            f"Cells: {sum(r.get('status') == 'ok' for r in rows)} ok, "
            f"{sum(r.get('status') != 'ok' for r in rows)} failed (see results.csv).", ""]
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(text))
    os.replace(path + ".tmp", path)


def paired_series(rows: List[dict], baseline: str = BASELINE) -> Dict[str, List[tuple]]:
    """method -> [(labels, mean, half width of the 95 % CI, n seeds)] of the paired Dice difference to ``baseline``."""
    return {m: [(n, *paired_ci(per[n])) for n in sorted(per)] for m, per in paired_differences(rows, baseline).items()}


def write_plot(path: str, rows: List[dict], title: str = "", baseline: str = BASELINE) -> bool:
    """Left: mean ± sd Dice per arm (unpaired, each arm over its own seeds). Right, when any arm has a paired
    baseline cell: the paired difference to ``baseline`` with its 95 % CI, the comparison the tables report."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    agg = aggregate(rows)
    paired = paired_series(rows, baseline)
    fig, axes = plt.subplots(1, 2 if paired else 1, figsize=(11 if paired else 6, 4), dpi=120, squeeze=False)
    ax = axes[0][0]
    colours = {m: f"C{i}" for i, m in enumerate(agg)}
    for method, per in agg.items():
        ns = [n for n in sorted(per) if per[n]["n"]]
        if not ns:
            continue
        mean = np.array([100 * per[n]["mean"] for n in ns])
        sd = np.array([100 * per[n]["sd"] for n in ns])
        ax.errorbar(ns, mean, yerr=sd, marker="o", capsize=4, label=method, color=colours[method])
        ax.fill_between(ns, mean - sd, mean + sd, alpha=0.12, color=colours[method])
    all_n = sorted({n for per in agg.values() for n in per})
    ax.set_ylabel("mean foreground Dice (× 100)")
    ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=9)  # a long list of seeds must not run off the figure
    ax.legend()
    if paired:
        bx = axes[0][1]
        bx.axhline(0.0, color="k", lw=0.8)
        for i, (method, series) in enumerate(paired.items()):
            shift = 2 ** (0.08 * (i - (len(paired) - 1) / 2))  # side by side on the log axis
            xs = [n * shift for n, *_ in series]
            ys = [m for _, m, _, _ in series]
            err = [h if math.isfinite(h) else 0.0 for _, _, h, _ in series]
            bx.errorbar(xs, ys, yerr=err, marker="o", capsize=4, ls="none", color=colours.get(method),
                        label=method)
            for x, y, (_, _, _, k) in zip(xs, ys, series):
                bx.annotate(f"n={k}", (x, y), textcoords="offset points", xytext=(5, -3), fontsize=7)
        bx.set_ylabel(f"paired difference to {baseline}, Dice (× 100)")
        bx.set_title("paired by seed: mean and 95 % CI over seeds (n = seeds; no bar: n = 1)", fontsize=9)
        bx.legend(fontsize=8)
    for axis in axes[0]:
        axis.set_xscale("log", base=2)
        axis.set_xticks(all_n)
        axis.set_xticklabels([str(n) for n in all_n])
        axis.set_xlabel("labelled training cases")
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return True


def write_all(out: str, rows: List[dict], budget, dataset: str, plot: bool = True, versus: Sequence[str] = ()) -> None:
    write_csv(os.path.join(out, "results.csv"), rows)
    write_markdown(os.path.join(out, "results.md"), rows, budget, dataset, versus)
    if plot:
        write_plot(os.path.join(out, "results_dice.png"), rows,
                   f"{dataset}, budget {budget.name} (mean ± sd over seeds {seeds_of(rows)})")


def read_summary(path: str):
    """Mean foreground Dice and per-class mean Dice from nnU-Net's ``summary.json``."""
    data = _read_json(path)
    if "foreground_mean" not in data:
        raise ValueError(f"{path}: not an nnU-Net evaluation summary")
    per_class = {str(k): float(v["Dice"]) for k, v in data.get("mean", {}).items()}
    return float(data["foreground_mean"]["Dice"]), per_class


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1, default=float)
    os.replace(path + ".tmp", path)
