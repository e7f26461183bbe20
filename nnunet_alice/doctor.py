"""Pre-flight report of a pretrained checkpoint against a target plan (``alice_doctor`` and ``nnUNetTrainerAlice``).

Checks, each with a suggested fix: tensor coverage, per-stage shape mismatches, input-channel mapping, spacing,
normalization, intensity statistics, patch-size ratio and pretraining data size. ``will_load`` is exactly the
condition under which ``nnUNetTrainerAlice`` loads the checkpoint (errors block, warnings and notes do not).

``alice_doctor CHECKPOINT -d ID -c CONFIG [-p PLANS]`` prints the report; exit code 0 when the checkpoint will load,
1 when it will not (also when it cannot be read), 2 for a usage error (unknown dataset, missing plans, ...).
"""
from __future__ import annotations

import argparse
import copy
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from nnunet_alice.compat import (SEG_LAYER_TAG, adapt_input_channels, architecture_differences,
                                 channel_adaptation_problem, checkpoint_input_channels, state_dict_differences)
from nnunet_alice.errors import AliceError, cli_main

ERROR, WARNING, NOTE, OK = "error", "warning", "note", "ok"
SPACING_TOLERANCE = 1.25        # per-axis ratio beyond which spacing is reported
PATCH_RATIO_RANGE = (0.5, 2.0)  # per-axis target/pretraining patch ratio considered comparable
SMALL_PRETRAINING = 20          # cases


@dataclass
class Finding:
    topic: str
    level: str
    message: str
    fix: str = ""

    def line(self) -> str:
        return f"[{self.level.upper():7s}] {self.topic}: {self.message}" + (f" -> fix: {self.fix}" if self.fix else "")


@dataclass
class Report:
    checkpoint: str
    target: str
    findings: List[Finding] = field(default_factory=list)
    coverage: float = 0.0
    tensors_loaded: int = 0
    tensors_total: int = 0

    @property
    def will_load(self) -> bool:
        return not any(f.level == ERROR for f in self.findings)

    def add(self, topic: str, level: str, message: str, fix: str = "") -> None:
        self.findings.append(Finding(topic, level, message, fix))

    def headline(self) -> str:
        n_warn = sum(f.level == WARNING for f in self.findings)
        n_err = sum(f.level == ERROR for f in self.findings)
        verdict = "WILL LOAD" if self.will_load else "WILL NOT LOAD"
        return (f"alice_doctor: {verdict}: {self.checkpoint} -> {self.target}: tensor coverage {self.coverage:.1f}% "
                f"({self.tensors_loaded}/{self.tensors_total}), {n_err} error(s), {n_warn} warning(s)")

    def summary_lines(self) -> List[str]:
        """The headline plus every error and warning (what the trainer prints before training)."""
        return [self.headline()] + ["  " + f.line() for f in self.findings if f.level in (ERROR, WARNING)]

    def render(self) -> str:
        return "\n".join([self.headline()] + ["  " + f.line() for f in self.findings])


# ---------------------------------------------------------------------------------------------- helpers
def stage_of(key: str) -> str:
    """Readable network part of a state-dict key (``encoder stage 2``, ``decoder stage 0``, ``stem`` ...)."""
    key = key[len("decoder."):] if key.startswith("decoder.encoder.") else key
    m = re.match(r"encoder\.stages\.(\d+)", key)
    if m:
        return f"encoder stage {m.group(1)}"
    if key.startswith("encoder.stem"):
        return "stem"
    m = re.match(r"decoder\.(?:stages|transpconvs)\.(\d+)", key)
    if m:
        return f"decoder stage {m.group(1)}"
    return key.rsplit(".", 1)[0]


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{float(v):.4g}" for v in values) + "]"


def build_target_state(plans: dict, configuration: str, dataset_json: dict):
    """``(state dict, keys_to_in_proj)`` of the network nnU-Net builds for the target plan."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(copy.deepcopy(plans))
    cm = pm.get_configuration(configuration)
    n_in = num_channels(dataset_json)
    n_out = pm.get_label_manager(dataset_json).num_segmentation_heads
    net = nnUNetTrainer.build_network_architecture(pm, cm, n_in, n_out, enable_deep_supervision=False)
    return net.state_dict(), list(getattr(net, "keys_to_in_proj", None) or [])


def num_channels(dataset_json: dict) -> int:
    return len(dataset_json.get("channel_names", dataset_json.get("modality", {})))


# ---------------------------------------------------------------------------------------------- the report
def diagnose(ckpt: Dict[str, Any], checkpoint_name: str, plans: dict, configuration: str, dataset_json: dict,
             target_state: Optional[Dict[str, torch.Tensor]] = None,
             keys_to_in_proj: Optional[Sequence[str]] = None) -> Report:
    """Compare a loaded checkpoint with a target plan. ``target_state``/``keys_to_in_proj``: of the target
    network if already built (the trainer passes its own), else the network is built from the plan."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(copy.deepcopy(plans))
    cm = pm.get_configuration(configuration)
    report = Report(checkpoint_name, f"{plans.get('dataset_name')} {plans.get('plans_name')} {configuration}")
    if target_state is None:
        target_state, keys_to_in_proj = build_target_state(plans, configuration, dataset_json)
    keys_to_in_proj = list(keys_to_in_proj or [])
    meta = ckpt.get("metadata")
    weights = ckpt["network_weights"]
    n_tgt = num_channels(dataset_json)
    n_src = checkpoint_input_channels(meta, weights, keys_to_in_proj)
    if meta is None:
        report.add("metadata", WARNING, "the checkpoint carries no Alice metadata; only tensors can be compared",
                   "use a checkpoint written by alice_pretrain for the full report")

    adaptable = _check_channels(report, meta, n_src, n_tgt, dataset_json, keys_to_in_proj)
    _check_tensors(report, meta, weights, target_state, cm, n_tgt, adaptable, keys_to_in_proj)
    if meta is not None:
        _check_spacing(report, meta, cm)
        _check_normalization(report, meta, cm, plans, n_src, n_tgt)
        _check_patch(report, meta, cm)
        _check_data(report, meta)
    return report


def _check_channels(report, meta, n_src, n_tgt, dataset_json, keys_to_in_proj) -> bool:
    tgt_names = [str(v) for v in dataset_json.get("channel_names", {}).values()]
    src_names = [str(v) for v in (meta or {}).get("channel_names", {}).values()]
    if n_src == n_tgt:
        pairs = ", ".join(f"{s!r}->{t!r}" for s, t in zip(src_names, tgt_names)) if src_names else f"{n_tgt} channel(s)"
        differs = src_names and [s.lower() for s in src_names] != [t.lower() for t in tgt_names]
        report.add("input channels", WARNING if differs else OK, f"one to one: {pairs}",
                   "check that the modalities correspond (a CT-pretrained channel fed with MRI is a domain shift)"
                   if differs else "")
        return False
    problem = channel_adaptation_problem(n_src, n_tgt, keys_to_in_proj)
    if problem is None:
        src = src_names[0] if src_names else "channel 0"
        report.add("input channels", NOTE, f"pretrained on 1 channel ({src!r}), the dataset has {n_tgt} "
                   f"({', '.join(repr(t) for t in tgt_names)}): the first convolution will be repeated over the "
                   f"{n_tgt} channels and scaled by 1/{n_tgt}",
                   "nothing to do; for best results pretrain on all channels (alice_pretrain on this dataset)")
        return True
    report.add("input channels", ERROR, f"checkpoint has {n_src} input channel(s), the dataset {n_tgt}: {problem}",
               "pretrain on a dataset with the same channels, or on 1 channel to let it be adapted")
    return False


def _check_tensors(report, meta, weights, target_state, cm, n_tgt, adaptable, keys_to_in_proj) -> None:
    if meta is not None:
        diffs = [d for d in architecture_differences(meta, cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                                     n_tgt) if not d.startswith("num_input_channels:")]
        for d in diffs:
            report.add("architecture", ERROR, d,
                       "plan the target with the checkpoint's architecture (copy its arch_kwargs into a new plans "
                       "file, nnUNetv2_preprocess -plans_name ..., train with -p ...) or pretrain on this plan")
    source = weights
    if adaptable:
        source, _ = adapt_input_channels(weights, target_state, keys_to_in_proj)
    missing, unexpected, shapes = state_dict_differences(source, target_state)
    tgt_keys = [k for k in target_state if SEG_LAYER_TAG not in k]
    bad = set(missing) | {s.split(":", 1)[0] for s in shapes}
    report.tensors_total = len(tgt_keys)
    report.tensors_loaded = len([k for k in tgt_keys if k not in bad])
    report.coverage = 100.0 * report.tensors_loaded / max(1, report.tensors_total)
    if not (missing or unexpected or shapes):
        report.add("tensors", OK, f"all {len(tgt_keys)} non-segmentation tensors fit "
                   f"(segmentation layers are always trained from scratch)")
        return
    per_stage: Dict[str, List[str]] = {}
    for s in shapes:
        per_stage.setdefault(stage_of(s.split(":", 1)[0]), []).append(s)
    for k in missing:
        per_stage.setdefault(stage_of(k), []).append(f"{k}: missing in checkpoint")
    for k in unexpected:
        per_stage.setdefault(stage_of(k), []).append(f"{k}: not in the network")
    for stage, items in per_stage.items():
        items.sort(key=lambda x: (x.startswith("decoder.encoder."), x))  # name the primary key, not its alias
        report.add(f"shapes {stage}", ERROR, f"{len(items)} tensor(s) differ, e.g. {items[0]}",
                   "the plans differ in this stage (features, kernel sizes, blocks); use the checkpoint's plan")
    report.add("tensors", ERROR, f"{len(bad)} of {len(tgt_keys)} tensors do not fit and {len(unexpected)} checkpoint "
               f"tensors have no place in the network; nnUNetTrainerAlice loads all or nothing",
               "make the architectures identical (see above)")


def _check_spacing(report, meta, cm) -> None:
    src, tgt = [float(s) for s in meta.get("spacing", [])], [float(s) for s in cm.spacing]
    if len(src) != len(tgt) or not src:
        report.add("spacing", WARNING, f"checkpoint spacing {src} vs target {tgt}", "")
        return
    ratios = [t / s if s else float("inf") for s, t in zip(src, tgt)]
    off = [r for r in ratios if not 1 / SPACING_TOLERANCE <= r <= SPACING_TOLERANCE]
    level = WARNING if off else OK
    report.add("spacing", level, f"checkpoint {_fmt(src)} mm vs target {_fmt(tgt)} mm (ratio {_fmt(ratios)})",
               f"structures appear at another scale than in pretraining; re-plan the target with "
               f"nnUNetv2_plan_experiment -overwrite_target_spacing {' '.join(f'{s:.4g}' for s in src)} "
               f"-overwrite_plans_name <name> (or pretrain at the target spacing)" if off else "")


def _stats(props: dict, channel: int) -> Optional[dict]:
    entry = props.get(str(channel), props.get(channel)) if isinstance(props, dict) else None
    return entry if isinstance(entry, dict) and "mean" in entry and "std" in entry else None


def _check_normalization(report, meta, cm, plans, n_src, n_tgt) -> None:
    src_norm = list(meta.get("normalization_schemes", []))
    tgt_norm = list(cm.normalization_schemes)
    mapping = [0] * n_tgt if n_src == 1 else list(range(min(n_tgt, len(src_norm))))
    diffs = [f"channel {t}: {src_norm[s]} vs {tgt_norm[t]}" for t, s in enumerate(mapping)
             if s < len(src_norm) and t < len(tgt_norm) and src_norm[s] != tgt_norm[t]]
    report.add("normalization", WARNING if diffs else OK,
               "; ".join(diffs) if diffs else f"same scheme(s): {', '.join(tgt_norm)}",
               "set normalization_schemes in the target plans to the pretraining scheme(s) and re-run "
               "nnUNetv2_preprocess, or expect the first layers to re-adapt" if diffs else "")
    src_props = meta.get("foreground_intensity_properties_per_channel", {})
    tgt_props = plans.get("foreground_intensity_properties_per_channel", {})
    notes = []
    for t, s in enumerate(mapping):
        if t >= len(tgt_norm) or tgt_norm[t] != "CTNormalization":
            continue  # per-image schemes (z-score) do not use the dataset statistics
        a, b = _stats(src_props, s), _stats(tgt_props, t)
        if a is None or b is None:
            continue
        shift = abs(float(b["mean"]) - float(a["mean"])) / max(float(a["std"]), 1e-8)
        scale = float(b["std"]) / max(float(a["std"]), 1e-8)
        if shift > 0.5 or not 0.67 <= scale <= 1.5:
            notes.append(f"channel {t}: mean {float(a['mean']):.4g} vs {float(b['mean']):.4g}, std "
                         f"{float(a['std']):.4g} vs {float(b['std']):.4g}")
    if notes:
        report.add("intensity statistics", WARNING, "CT normalization statistics differ, so identical intensities "
                   "are normalized differently: " + "; ".join(notes),
                   "copy foreground_intensity_properties_per_channel from the pretraining plans into the target "
                   "plans (under a new plans name) and re-run nnUNetv2_preprocess")
    elif any(t < len(tgt_norm) and tgt_norm[t] == "CTNormalization" for t in range(n_tgt)):
        report.add("intensity statistics", OK, "CT normalization statistics are comparable")


def _check_patch(report, meta, cm) -> None:
    # the views the network saw (--patch-size) if recorded, else the plan's patch size
    src = [int(p) for p in (meta.get("settings") or {}).get("patch_size") or meta.get("patch_size", [])]
    tgt = [int(p) for p in cm.patch_size]
    if len(src) != len(tgt) or not src:
        report.add("patch size", WARNING, f"checkpoint {src} vs target {tgt} (different dimensionality)", "")
        return
    ratios = [t / s for s, t in zip(src, tgt)]
    lo, hi = PATCH_RATIO_RANGE
    off = any(not lo <= r <= hi for r in ratios)
    report.add("patch size", WARNING if off else OK,
               f"checkpoint {src} vs target {tgt} (ratio {_fmt(ratios)})",
               "convolutional weights transfer, but context per view changes; pretrain with --patch-size "
               + " ".join(map(str, tgt)) if off else "")


def _check_data(report, meta) -> None:
    n, step, total = meta.get("num_cases"), meta.get("step"), meta.get("total_steps")
    msg = (f"{n} case(s) of {meta.get('dataset_name')}, {step} of {total} steps, objective "
           f"{meta.get('objective')}")
    if step is not None and total and int(step) < int(total):
        report.add("pretraining", WARNING, msg + " (unfinished run)",
                   "finish it with alice_pretrain ... --continue, or use it knowingly")
    elif n is not None and int(n) < SMALL_PRETRAINING:
        report.add("pretraining", WARNING, msg + f" (fewer than {SMALL_PRETRAINING} cases: expect a small gain)",
                   "add unlabeled images with --unlabeled DIR or pretrain on a larger dataset")
    else:
        report.add("pretraining", OK, msg)


# ---------------------------------------------------------------- alice_doctor (the command line)


def load_target(dataset: str, plans_name: str, configuration: str):
    """``(plans dict, dataset.json dict)`` of the target from ``$nnUNet_preprocessed``; one-line errors."""
    from nnunet_alice.pretrain.data.cases import load_plans, resolve_dataset_name

    _, plans_manager, _, dataset_json = load_plans(resolve_dataset_name(dataset), plans_name, configuration)
    return plans_manager.plans, dataset_json


@cli_main
def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="alice_doctor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="an alice_pretrain checkpoint (or any file with 'network_weights')")
    p.add_argument("-d", dest="dataset", required=True, help="target dataset ID or name")
    p.add_argument("-c", dest="configuration", required=True, help="target configuration, e.g. 3d_fullres")
    p.add_argument("-p", dest="plans", default="nnUNetPlans", help="target plans identifier")
    a = p.parse_args(argv)
    plans, dataset_json = load_target(a.dataset, a.plans, a.configuration)

    from nnunet_alice.checkpoint import load_checkpoint

    try:
        ckpt = load_checkpoint(a.checkpoint)
    except AliceError as e:
        print(f"alice_doctor: WILL NOT LOAD: {e}")
        sys.exit(1)
    report = diagnose(ckpt, a.checkpoint, plans, a.configuration, dataset_json)
    print(report.render())
    sys.exit(0 if report.will_load else 1)


if __name__ == "__main__":
    main()
