#!/usr/bin/env bash
# Build the folder that travels to the bare GPU machine (bench/device/README.md): Ray 2.60 without its Java
# jar, the wheels Ray core + Tune + Train need there and the machine lacks, and the sim suite's datasets
# packed (simulated here: the GPU machine has no MuJoCo). Run from anywhere, with the project's venv active.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bench/device/make_kit.sh [--python 3.12|3.11] [--out DIR] [--datasets NAME,NAME] [--data-dir DIR]
                                [--transitions N] [--cache DIR] [--no-wheels]

  --python      the Python the kit's wheels are for (default 3.12, the GPU machine's; 3.11 builds a kit
                for this machine's venv, to test run.sh here)
  --out         the kit folder (default bench/device/kit, ignored by git; name it in the device tool's carry)
  --datasets    sim datasets to pack (default: the sim suite, sim-{halfcheetah,hopper,walker2d}-mixed-v0)
  --data-dir    where the datasets' HDF5 files are, and where a missing one is simulated
                (default $D4RL_DATASET_DIR, else ~/.d4rl/datasets: the files the CPU runs train on)
  --transitions transitions of a dataset simulated now (default pipeline.simulate's)
  --cache       downloaded wheels (default ~/.cache/invdyn-device-kit)
  --no-wheels   datasets only (a kit for run.sh --no-install, as the tests make)

Prints the kit's size and the total that would travel (working tree + kit), which must stay under 64 MiB.
EOF
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYVER=3.12
OUT="$ROOT/bench/device/kit"
DATASETS=sim-halfcheetah-mixed-v0,sim-hopper-mixed-v0,sim-walker2d-mixed-v0
DATA_DIR=${D4RL_DATASET_DIR:-$HOME/.d4rl/datasets}
TRANSITIONS=
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/invdyn-device-kit
WHEELS=1
PYTHON=${PYTHON:-python}
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --python) PYVER=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --datasets) DATASETS=$2; shift 2 ;;
    --data-dir) DATA_DIR=$2; shift 2 ;;
    --transitions) TRANSITIONS=$2; shift 2 ;;
    --cache) CACHE=$2; shift 2 ;;
    --no-wheels) WHEELS=0; shift ;;
    *) echo "make_kit.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$PYVER" in 3.12|3.11) ;; *) echo "make_kit.sh: --python must be 3.12 or 3.11, got '$PYVER'" >&2; exit 2 ;; esac
TAG=cp${PYVER/./}
OUT=$(realpath -m "$OUT"); DATA_DIR=$(realpath -m "$DATA_DIR"); CACHE=$(realpath -m "$CACHE")
cd "$ROOT"  # python -m pipeline.simulate runs from the checkout

# What the GPU machine lacks, pinned to the versions this venv tested (bench/device/README.md, "What the kit
# holds"): Ray's own jsonschema (+ referencing, rpds-py, jsonschema-specifications), Tune/Train's pydantic
# (+ pydantic-core, annotated-types, typing-inspection, and the typing-extensions pydantic 2.14 needs) and
# tensorboardX (Tune's default logger). Everything else Ray imports is in the machine's image.
PINS=(ray==2.60.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
      rpds-py==2026.9.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
      typing-inspection==0.4.5 typing-extensions==4.16.0 tensorboardX==2.6.5)

rm -rf "$OUT"
mkdir -p "$OUT/data"
if [ "$WHEELS" = 1 ]; then
  DL="$CACHE/$TAG"
  mkdir -p "$DL" "$OUT/wheels"
  echo "== wheels for Python $PYVER ($TAG) -> $DL"
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DL" "${PINS[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  for whl in "$DL"/*.whl; do
    case "$(basename "$whl")" in
      ray-*) "$PYTHON" "$ROOT/bench/device/kit_wheels.py" repack "$whl" "$OUT/wheels"
             "$PYTHON" "$ROOT/bench/device/kit_wheels.py" check "$OUT/wheels/$(basename "$whl")" ;;
      *) cp "$whl" "$OUT/wheels/" ;;
    esac
  done
fi

echo "== datasets from $DATA_DIR"
mkdir -p "$DATA_DIR"
for name in ${DATASETS//,/ }; do
  if [ ! -f "$DATA_DIR/$name.hdf5" ]; then
    "$PYTHON" -m pipeline.simulate "$name" --out "$DATA_DIR" ${TRANSITIONS:+--transitions "$TRANSITIONS"}
  fi
  "$PYTHON" "$ROOT/bench/device/kit_data.py" pack "$DATA_DIR/$name.hdf5" "$OUT/data/$name.npz.xz"
done

"$PYTHON" "$ROOT/bench/device/kit_manifest.py" write "$OUT" --python "$PYVER" --datasets "$DATASETS"
