#!/usr/bin/env bash
# Prepare the folder that travels to a lent GPU machine for `python -m benchmarks.gpu_check` (docs/gpu.md).
#
# The GPU machine has Python 3.12 with torch, numpy, scipy, scikit-image, pandas, matplotlib, timm, einops, ...
# but not nnU-Net and its own packages, and it cannot download anything. This script, run here (where PyPI is
# reachable), fills a git-ignored folder with
#   wheels/  nnunetv2 and the packages it needs that the GPU machine lacks (binary ones for cp312 manylinux,
#            acvl-utils and batchgenerators built from their sdists: pure Python),
#   stubs/   a placeholder SimpleITK module (the real wheel is ~53 MB; nnU-Net imports it at module level but
#            the benchmark never reads or writes an image with it) -- on PYTHONPATH for the benchmark ONLY,
#   plans/   plans/dataset JSON files copied from $nnUNet_preprocessed/<Dataset> if DATASET is given.
#
# usage: bash benchmarks/gpu_wheels.sh [DEST=.gpu_wheels] [PYVER=3.12] [DATASET=Dataset993_AliceSynth]
# then (on the device):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/pylibs DEST/wheels/*.whl
#   PYTHONPATH=/tmp/pylibs:DEST/stubs:. python3 -m benchmarks.gpu_check --plans DEST/plans/... --out $OUT
# Keep DEST out of git (e.g. `echo /.gpu_wheels/ >> .git/info/exclude`); pass it as the run's `carry`.
set -euo pipefail

DEST=${1:-.gpu_wheels}
PYVER=${2:-3.12}
DATASET=${3:-}
PIP=${PIP:-python3 -m pip}
mkdir -p "$DEST/wheels" "$DEST/stubs/SimpleITK" "$DEST/plans"
W="$DEST/wheels"

# versions as in the development environment (nnunetv2 2.8.1)
BINARY="blosc2==4.14.1 numexpr==2.14.2 ndindex==1.10.1 connected-components-3d==4.1.1"
PURE="nnunetv2==2.8.1 dynamic-network-architectures==0.4.4 batchgeneratorsv2==0.3.6 nibabel==5.4.2"
SDIST="acvl-utils==0.2.6 batchgenerators==0.25.5"

# shellcheck disable=SC2086
$PIP download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$W" $BINARY $PURE
# shellcheck disable=SC2086
$PIP wheel -q --no-deps -w "$W" $SDIST
rm -f "$W"/*.tar.gz

cat > "$DEST/stubs/SimpleITK/__init__.py" <<'EOF'
"""Placeholder for SimpleITK on the GPU benchmark machine ONLY (benchmarks/gpu_wheels.sh).

nnU-Net imports SimpleITK at module level; the benchmark never reads or writes an image, so any use is an error.
"""
__version__ = "0.0.0-stub"


def __getattr__(name):
    raise ImportError(f"SimpleITK stub: SimpleITK.{name} is not available on this machine")
EOF

if [ -n "$DATASET" ]; then
    src="${nnUNet_preprocessed:?set nnUNet_preprocessed}/$DATASET"
    cp "$src"/nnUNet*Plans.json "$src/dataset.json" "$DEST/plans/"
fi
ls -la "$W" "$DEST/plans"
du -sh "$DEST"
