#!/usr/bin/env bash
# One prepared GPU run, <= 10 minutes on one H100/H200 with the installs: does pretraining help on the anatomy demo?
#
#   1. installs nnU-Net and friends from carried wheels when they are missing (nothing is downloaded there);
#   2. generates the anatomy demo (alice_demo_data: 8 labelled, 8 test, 64 unlabeled subjects at 2 mm);
#   3. nnU-Net's own plan and preprocessing of it (through alice_benchmark's set-up, the budget's plan);
#   4. alice_pretrain --estimate: times Alice steps on the card and chooses the pretraining length, the
#      fine-tuning length and the deadline split from it (printed, and kept in evidence.json);
#   5. one alice_benchmark per arm (scratch, alice, mae), run side by side on the one GPU, each: pretraining
#      (alice, mae: the same number of steps), fine-tuning at 1 and all labels, predictions, nnU-Net's evaluation;
#      the arms share plans, splits, seeds and initial weights (all deterministic), so the cells are paired;
#   6. one table over the three folders (results.md/.csv/.png), written to $OUT (or <work>/out).
# Every stage has a deadline (GPU_EVIDENCE_SECONDS from the start, default 540): the arms are stopped there and
# what finished is reported.
#
# usage:
#   bash benchmarks/gpu_evidence.sh --prepare   # here, where PyPI is reachable: fills .gpu_wheels/ (~28 MB;
#                                               # add '/.gpu_wheels/' to .git/info/exclude, pass it as 'carry')
#   bash benchmarks/gpu_evidence.sh             # on the GPU machine
#   GPU_EVIDENCE_DRY=1 bash benchmarks/gpu_evidence.sh   # the same script on the CPU at a tiny size (minutes)
#
# settings (environment): GPU_EVIDENCE_DRY (1: CPU dry run), GPU_EVIDENCE_SECONDS (deadline from the start),
# GPU_EVIDENCE_WORK (work folder, default a new /tmp folder), GPU_EVIDENCE_BUDGET (alice_benchmark budget; default
# gpu15 if defined else large on the GPU, tiny dry), GPU_EVIDENCE_METHODS ("scratch alice mae"),
# GPU_EVIDENCE_LABELS ("1 all"; dry "1"), GPU_EVIDENCE_SEEDS ("0"), GPU_EVIDENCE_EPOCHS (10), GPU_EVIDENCE_FT_SECONDS
# (fine-tuning seconds per cell, 40), GPU_EVIDENCE_WHEELS (.gpu_wheels/wheels), GPU_EVIDENCE_NO_SITK (1: hide
# SimpleITK behind a placeholder, as on the GPU machine), GPU_EVIDENCE_DATASET (990), GPU_EVIDENCE_RECIPE (how the
# pretrained arms fine-tune: nnunet (default): nnU-Net's own schedule, arms alice_nnunet/mae_nnunet, the better
# recipe in short runs (docs/finetuning.md); pretrained: the 1e-3 recipe, arms alice/mae; both: the two, twice the
# cells in those folders).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}

if [ "${1:-}" = "--prepare" ]; then
    set -e
    DEST=${2:-$REPO/.gpu_wheels}
    bash "$REPO/benchmarks/gpu_wheels.sh" "$DEST" 3.12
    NILEARN=$("$PY" -c "import nilearn; print(nilearn.__version__)" 2>/dev/null || echo 0.14.1)
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        -d "$DEST/wheels" "nilearn==$NILEARN"
    du -sh "$DEST"
    exit 0
fi

DRY=${GPU_EVIDENCE_DRY:-0}
WORK=${GPU_EVIDENCE_WORK:-$(mktemp -d /tmp/gpu_evidence.XXXXXX)}
OUTDIR=${OUT:-$WORK/out}
mkdir -p "$WORK" "$OUTDIR"
exec > >(tee -a "$OUTDIR/evidence_log.txt") 2>&1
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
say() { echo "[$(elapsed) s] $*"; }
fail() { say "FAILED: $*"; exit 1; }

DID=${GPU_EVIDENCE_DATASET:-990}
METHODS=${GPU_EVIDENCE_METHODS:-scratch alice mae}
RECIPE=${GPU_EVIDENCE_RECIPE:-nnunet}
case "$RECIPE" in nnunet|pretrained|both) ;; *) echo "GPU_EVIDENCE_RECIPE must be nnunet, pretrained or both, got '$RECIPE'"; exit 2;; esac
# the alice_benchmark arms one folder runs: the pretrained arms under the chosen recipe(s), the others as named
arm_methods() {
    case "$1:$RECIPE" in
        alice:nnunet|mae:nnunet) echo "$1_nnunet" ;;
        alice:both|mae:both) echo "$1 $1_nnunet" ;;
        *) echo "$1" ;;
    esac
}
CELLS_PER_LABEL=1; [ "$RECIPE" = both ] && CELLS_PER_LABEL=2
SEEDS=${GPU_EVIDENCE_SEEDS:-0}
if [ "$DRY" = 1 ]; then
    LABELS=${GPU_EVIDENCE_LABELS:-1}   # the plumbing; 'all' adds three cells of the same kind
    DEVICE=cpu; DEADLINE=${GPU_EVIDENCE_SECONDS:-1200}
    DATA_ARGS="--num-train 2 --num-test 1 --num-unlabeled 2 --spacing 5 --workers 2"
    EPOCHS=${GPU_EVIDENCE_EPOCHS:-1}; FT_SECONDS=${GPU_EVIDENCE_FT_SECONDS:-5}; EST_STEPS=1; MAX_STEPS=2
else
    LABELS=${GPU_EVIDENCE_LABELS:-1 all}
    DEVICE=cuda; DEADLINE=${GPU_EVIDENCE_SECONDS:-540}
    DATA_ARGS="--workers 12"   # the defaults: 8 train, 8 test, 64 unlabeled, 2 mm
    EPOCHS=${GPU_EVIDENCE_EPOCHS:-10}; FT_SECONDS=${GPU_EVIDENCE_FT_SECONDS:-40}; EST_STEPS=3; MAX_STEPS=25000
    export nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-4}   # per arm: three arms share the machine's CPUs
fi
say "gpu_evidence: dry=$DRY device=$DEVICE work=$WORK out=$OUTDIR deadline=${DEADLINE}s"

# ---------------------------------------------------------------------------------------------- 1. software
if ! "$PY" -c "import nnunetv2" 2>/dev/null; then
    WHEELS=${GPU_EVIDENCE_WHEELS:-$REPO/.gpu_wheels/wheels}
    ls "$WHEELS"/*.whl >/dev/null 2>&1 \
        || fail "nnunetv2 is not installed and there are no wheels in $WHEELS (run --prepare)"
    say "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$WHEELS"/*.whl \
        || fail "pip install from $WHEELS"
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" PATH="$WORK/site/bin:$PATH"
fi
if ! "$PY" -c "import nnunet_alice" 2>/dev/null || ! command -v alice_pretrain >/dev/null; then
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" nnUNet_extTrainer="$REPO/nnunet_alice/_ext"
    mkdir -p "$WORK/bin"
    for spec in alice_pretrain=nnunet_alice.pretrain.cli alice_demo_data=nnunet_alice.demo.cli \
                alice_benchmark=nnunet_alice.harness.cli; do
        printf '#!/bin/sh\nexec %s -c "import sys; from %s import main; sys.exit(main())" "$@"\n' \
            "$(command -v "$PY")" "${spec#*=}" > "$WORK/bin/${spec%%=*}"
        chmod +x "$WORK/bin/${spec%%=*}"
    done
    export PATH="$WORK/bin:$PATH"
fi
if [ "${GPU_EVIDENCE_NO_SITK:-0}" = 1 ] || ! "$PY" -c "import SimpleITK" 2>/dev/null; then
    # nnU-Net imports SimpleITK at module level; without it, a placeholder lets those imports pass and nnU-Net's
    # reader detection falls back to nibabel (the demo writes plain NIfTI with nibabel)
    mkdir -p "$WORK/stubs/SimpleITK"
    cat > "$WORK/stubs/SimpleITK/__init__.py" <<'EOF'
"""Placeholder: SimpleITK is not installed here; any use raises ImportError (nnU-Net then reads with nibabel)."""


def __getattr__(name):
    raise ImportError(f"SimpleITK is not installed (placeholder): SimpleITK.{name}")
EOF
    export PYTHONPATH="$WORK/stubs${PYTHONPATH:+:$PYTHONPATH}"
    say "SimpleITK: placeholder (images are read with nibabel)"
fi
"$PY" - <<'EOF' || fail "software check"
import torch, nnunetv2, nnunet_alice
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"torch {torch.__version__}, {dev}; nnunetv2 from {nnunetv2.__path__[0]}")
EOF
export nnUNet_raw="$WORK/raw" nnUNet_preprocessed="$WORK/preprocessed" nnUNet_results="$WORK/results"
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"

# ---------------------------------------------------------------------------------------------- 2. data
# shellcheck disable=SC2086
alice_demo_data -d "$DID" --output "$nnUNet_raw" $DATA_ARGS -q > "$WORK/demo_data.txt" || fail "alice_demo_data"
say "demo data: $(cat "$WORK/demo_data.txt")"

# ---------------------------------------------------------------------------------------------- 3. plan
BUDGET=${GPU_EVIDENCE_BUDGET:-}
if [ -z "$BUDGET" ]; then
    if [ "$DRY" = 1 ]; then BUDGET=tiny
    else BUDGET=$("$PY" -c "from nnunet_alice.harness.config import BUDGETS as B; print('gpu15' if 'gpu15' in B else 'large')")
    fi
fi
bench_dir() { echo "$WORK/bench_$1"; }
# alice_benchmark's own set-up (plan, preprocessing, initial weights) once, in the alice arm's folder; copied to the
# other arms below, so that every arm has the very same plans, data and initial weights
# shellcheck disable=SC2086
PREP=$("$PY" - "$DID" "$BUDGET" "$DEVICE" "$(bench_dir alice)" $SEEDS <<'EOF' | tee "$WORK/prep.txt" \
    | grep '^PREP ' | cut -c6-
import json, sys
from nnunet_alice.harness.config import get_budget
from nnunet_alice.harness.cli import Benchmark
did, budget, device, out = sys.argv[1:5]
b = Benchmark(did, get_budget(budget, device=device), output=out, methods=["alice"], echo=print)
b.ensure_dataset()
b.ensure_preprocessed()
for seed in sys.argv[5:]:
    if hasattr(b, "ensure_init"):  # initial weights shared by every arm (paired cells)
        b.ensure_init(b.init_seed(int(seed)))
print("PREP " + json.dumps({"pre_root": b.pre_root, "plans": b.plans, "dataset": b.dataset_name, "raw": b.raw,
                            "pretrain_args": list(b.budget.pretrain_args)}))
EOF
)
[ -n "$PREP" ] || { tail -20 "$WORK/prep.txt"; fail "plan and preprocess"; }
field() {
    "$PY" -c "import json, sys; v = json.loads(sys.argv[1])[sys.argv[2]]; print(' '.join(v) if isinstance(v, list) else v)" \
        "$PREP" "$1"
}
PRE_ROOT=$(field pre_root); PLANS=$(field plans); DATASET=$(field dataset); RAW=$(field raw)
PRE_ARGS=$(field pretrain_args)
say "planned: $DATASET $PLANS (budget $BUDGET) in $PRE_ROOT"

# ---------------------------------------------------------------------------------------------- 4. estimate
EST_ENV=()
[ "$DEVICE" = cpu ] && EST_ENV=(nnUNet_n_proc_DA=0)   # as alice_benchmark runs pretraining on the CPU
# shellcheck disable=SC2086
env "${EST_ENV[@]}" nnUNet_preprocessed="$PRE_ROOT" nnUNet_results="$WORK/estimate_results" \
    alice_pretrain -d "$DID" -p "$PLANS" -c 3d_fullres -device "$DEVICE" --steps 1000 \
    --unlabeled "$RAW/imagesUnlabeled" $PRE_ARGS --estimate "$EST_STEPS" > "$WORK/estimate.txt" 2>&1 \
    || { tail -20 "$WORK/estimate.txt"; fail "alice_pretrain --estimate"; }
grep -v '^estimate: ' "$WORK/estimate.txt" | tail -8
EST=$(grep '^estimate: ' "$WORK/estimate.txt" | tail -1)
[ -n "$EST" ] || fail "no estimate line"

# the plan: Alice pretraining gets what the deadline leaves after the two fine-tuning cells of its arm;
# contention between the three arms on one card is allowed for with a factor 1.5
PLAN=$("$PY" - "$EST" "$DEADLINE" "$(elapsed)" "$EPOCHS" "$FT_SECONDS" "$MAX_STEPS" "$LABELS" "$DRY" "$CELLS_PER_LABEL" <<'EOF'
import json, math, sys
est = dict(kv.split("=", 1) for kv in sys.argv[1][len("estimate: "):].split())
deadline, now, epochs, ft_s, max_steps = (float(a) for a in sys.argv[2:7])
n_cells, dry = len(sys.argv[7].split()) * int(sys.argv[9]), sys.argv[8] == "1"
step_s = float(est["step_s"])
contention, cell_overhead, startup, margin = 1.5, 45.0, 20.0, 25.0
it_s = max(0.45 * step_s, 0.03) * contention          # an nnU-Net iteration ~ an MAE step ~ 0.45 Alice steps
iterations = max(2, min(250, int(ft_s / it_s / epochs)))
left = deadline - now - startup - margin - n_cells * (cell_overhead + ft_s)
steps = int(max(10, min(max_steps, left / (step_s * contention))))
if dry:
    steps, iterations = min(steps, int(max_steps)), 2
plan = {"step_s": step_s, "peak_mem_gib": float(est["peak_mem_gib"]), "pretrain_steps": steps,
        "epochs": int(epochs), "iterations": iterations, "val_iterations": 1 if dry else 2,
        "pretrain_budget_s": round(steps * step_s * contention, 1), "estimate": est}
print(json.dumps(plan))
EOF
) || fail "plan"
echo "$PLAN" > "$WORK/plan.json"
pl() { "$PY" -c "import json, sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$PLAN" "$1"; }
STEPS=$(pl pretrain_steps); ITERS=$(pl iterations); VALITS=$(pl val_iterations)
say "estimate: $(pl step_s) s per Alice step, peak $(pl peak_mem_gib) GiB -> pretraining $STEPS steps per arm," \
    "fine-tuning $EPOCHS epochs x $ITERS iterations"

# ---------------------------------------------------------------------------------------------- 5. the arms
LEFT=$(( DEADLINE - $(elapsed) ))
[ "$LEFT" -gt 30 ] || fail "no time left for the arms (${LEFT}s)"
say "arms: $(for m in $METHODS; do arm_methods "$m"; done | xargs), labels $LABELS, seeds $SEEDS, side by side," \
    "stopped after ${LEFT}s"
for m in $METHODS; do   # the set-up of the alice folder, including the unlabeled pool the estimate preprocessed
    [ "$m" = alice ] && continue
    mkdir -p "$(bench_dir "$m")/state"
    cp -r "$(bench_dir alice)/nnUNet_preprocessed" "$(bench_dir alice)/init" "$(bench_dir "$m")/" 2>/dev/null
    cp "$(bench_dir alice)/state/preprocessed.done" "$(bench_dir "$m")/state/" 2>/dev/null
done
PIDS=()
for m in $METHODS; do
    # shellcheck disable=SC2086,SC2046
    timeout --signal=TERM --kill-after=20 "$LEFT" alice_benchmark -d "$DID" --budget "$BUDGET" \
        --methods $(arm_methods "$m") \
        --labels $LABELS --seeds $SEEDS --pretrain-steps "$STEPS" --epochs "$EPOCHS" --iterations "$ITERS" \
        --val-iterations "$VALITS" --device "$DEVICE" -o "$(bench_dir "$m")" > "$WORK/arm_$m.log" 2>&1 &
    PIDS+=($!)
done
RC=0
for p in "${PIDS[@]}"; do wait "$p" || RC=$?; done
say "arms finished (last non-zero exit: $RC)"
for m in $METHODS; do echo "--- $m"; grep -E '^# (done|FAILED)|^error' "$WORK/arm_$m.log" | tail -5; done

# ---------------------------------------------------------------------------------------------- 6. the table
mkdir -p "$WORK/merged"
"$PY" - "$WORK/merged" "$BUDGET" "$DATASET" "$DEVICE" "$STEPS" "$EPOCHS" "$ITERS" "$VALITS" \
    $(for m in $METHODS; do bench_dir "$m"; done) <<'EOF'
import sys
from nnunet_alice.harness import report as bench_report
from nnunet_alice.harness.config import get_budget
merged, budget, dataset, device = sys.argv[1:5]
steps, epochs, iters, valits = (int(a) for a in sys.argv[5:9])
rows = [r for d in sys.argv[9:] for r in bench_report.collect(d)]
b = get_budget(budget, device=device, pretrain_steps=steps, epochs=epochs, iterations=iters, val_iterations=valits)
bench_report.write_all(merged, rows, b, dataset)
print(bench_report.markdown_table(rows))
print(f"{sum(r.get('status') == 'ok' for r in rows)} cell(s) ok of {len(rows)}")
EOF
cp "$WORK/merged"/results.md "$WORK/merged"/results.csv "$OUTDIR/" 2>/dev/null
cp "$WORK/merged"/results_dice.png "$OUTDIR/" 2>/dev/null
"$PY" - "$OUTDIR/evidence.json" "$PLAN" "$(elapsed)" "$BUDGET" "$DRY" <<'EOF'
import json, platform, sys
import torch
plan = json.loads(sys.argv[2])
card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "CPU"
json.dump({"card": card, "torch": torch.__version__, "budget": sys.argv[4], "dry_run": sys.argv[5] == "1",
           "wall_s": int(sys.argv[3]), **plan}, open(sys.argv[1], "w"), indent=1)
EOF
tar -czf "$OUTDIR/logs.tar.gz" -C "$WORK" --exclude='*.pth' --exclude='*.b2nd' --exclude='*.nii.gz' \
    --exclude='*.pkl' --exclude='*.npz' --exclude='*.npy' --exclude=site --exclude=raw \
    $(cd "$WORK" && ls -d arm_*.log estimate.txt prep.txt plan.json bench_*/logs bench_*/cells 2>/dev/null) 2>/dev/null
say "done: $OUTDIR (results.md, results.csv, results_dice.png, evidence.json, logs.tar.gz, evidence_log.txt)"
[ -f "$OUTDIR/results.md" ] || exit 1
