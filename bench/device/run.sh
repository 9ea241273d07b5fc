#!/usr/bin/env bash
# The GPU measurements of issue #15 in one command (bench/device/README.md): install the kit offline, then
# the throughput bench, the population bench and the sim-suite job with and without --population on a local
# Ray, each step timed and logged; ends by writing three files to the output folder: tables.md,
# summary.json and logs.tar.gz (the device tool brings back at most 8 files, 2 folders deep).
set -uo pipefail # no -e: a failed step is recorded and the next one still runs

usage() {
  cat <<'EOF'
usage: bench/device/run.sh [--device cuda|cpu] [--quick] [--kit DIR] [--no-install] [--only STEPS]
                           [--budget SECONDS] [OUTDIR]

  OUTDIR        where tables.md, summary.json and logs.tar.gz go (default $OUT, the device tool's folder)
  --device      cuda (default) or cpu
  --quick       tiny budgets (1 epoch; 4 search points of hidden 64/128; members 1,3 of hidden 128): checks
                the kit and the sequence in 4-7 min on a 2-core CPU
  --kit         the folder make_kit.sh built (default bench/device/kit)
  --no-install  use the Python environment as it is (Ray importable already); only the kit's datasets are
                used
  --only        comma-separated steps to run (default all): check,install,data,env,throughput,population,
                job,job_population
  --budget      seconds for the whole run (default 510, under the device tool's 9 minutes); a step gets at
                most its own limit and what is left, minus 20 s for the final tables
  PYTHON=...    the interpreter (default python3)
EOF
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DEVICE=cuda
QUICK=0
KIT="$ROOT/bench/device/kit"
INSTALL=1
ONLY=all
BUDGET=510
OUTDIR=${OUT:-}
PY=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --device) DEVICE=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --kit) KIT=$2; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    --only) ONLY=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    -*) echo "run.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    *) OUTDIR=$1; shift ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "run.sh: --device must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;; esac
if [ -z "$OUTDIR" ]; then
  echo "run.sh: no output folder: pass OUTDIR or set OUT (see --help)" >&2
  exit 2
fi
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
KIT=$(realpath -m "$KIT")
cd "$ROOT" || exit 2

T0=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/invdyn-device.XXXXXX")
LOGS="$WORK/logs"
RES="$WORK/results"
mkdir -p "$LOGS" "$RES" "$WORK/site"
printf 'step\trc\twall_s\tcommand\n' >"$WORK/steps.tsv"

export PYTHONUNBUFFERED=1 MPLBACKEND=Agg INVDYN_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
export D4RL_DATASET_DIR="$WORK/d4rl" INVDYN_HOME="$WORK/invdyn-home"
if [ "$INSTALL" = 1 ]; then
  export PYTHONPATH="$WORK/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

selected() { [ "$ONLY" = all ] || [[ ",$ONLY," == *",$1,"* ]]; }

# step NAME LIMIT_S COMMAND...: run it under a timeout into logs/NAME.log and record rc and wall time
step() {
  local name=$1 limit=$2
  shift 2
  selected "$name" || return 0
  local left=$((BUDGET - ($(date +%s) - T0) - 20))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    printf '%s\t%s\t%s\t%s\n' "$name" "budget" 0 "$*" >>"$WORK/steps.tsv"
    echo "== $name: not run, the --budget of ${BUDGET}s is spent"
    return 0
  fi
  echo "== $name (at most ${limit}s): $*"
  local t rc ms
  t=$(date +%s%N)
  timeout -k 15 "$limit" "$@" >"$LOGS/$name.log" 2>&1 </dev/null
  rc=$?
  ms=$((($(date +%s%N) - t) / 1000000))
  printf '%s\t%s\t%d.%03d\t%s\n' "$name" "$rc" $((ms / 1000)) $((ms % 1000)) "$*" >>"$WORK/steps.tsv"
  if [ "$rc" = 0 ]; then
    echo "   ok, $((ms / 1000)) s"
  else
    echo "   FAILED (rc $rc$([ "$rc" = 124 ] && echo ', timed out'), $((ms / 1000)) s); last lines of logs/$name.log:"
    tail -n 5 "$LOGS/$name.log" | sed 's/^/   | /'
  fi
}

# a step whose script or option is not in this checkout yet is recorded as such, not run
missing() {
  printf '%s\t%s\t0\t%s\n' "$1" "missing" "$2" >>"$WORK/steps.tsv"
  echo "== $1: not run: $2" | tee "$LOGS/$1.log"
}

NOWHEELS=$([ "$INSTALL" = 1 ] || echo --no-wheels)
step check 60 "$PY" bench/device/kit_manifest.py check "$KIT" $NOWHEELS
if [ "$INSTALL" = 1 ]; then
  step install 180 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" "$KIT"/wheels/*.whl
fi
step data 60 "$PY" bench/device/kit_data.py unpack "$KIT"/data/*.npz.xz "$D4RL_DATASET_DIR"
step env 60 "$PY" bench/device/env_report.py --device "$DEVICE"

if [ "$QUICK" = 1 ]; then
  THROUGHPUT=(--epochs 1 --rounds 1)
  MEMBERS=1,3
  POP_EPOCHS=1
  POP_HIDDEN=128
  # two shapes x two learning rates: a population trial holds two groups of two members
  JOB=(--search-space '{"hidden_dim": [64, 128], "lr": [0.001, 0.0003]}' --max-epochs 1)
else
  THROUGHPUT=(--epochs 3 --rounds 3)
  MEMBERS=1,9,27
  POP_EPOCHS=5
  POP_HIDDEN=512
  JOB=(--search)
fi
step throughput 180 "$PY" bench/train_throughput.py --device "$DEVICE" --dataset sim-halfcheetah-mixed-v0 \
  "${THROUGHPUT[@]}" --skip-early-stop --out "$RES/throughput.md"
if selected population; then
  if [ -f bench/population.py ]; then
    mkdir -p "$RES/population"
    step population 180 "$PY" bench/population.py --device "$DEVICE" --members "$MEMBERS" \
      --epochs "$POP_EPOCHS" --hidden "$POP_HIDDEN" --out "$RES/population/population.md"
  else
    missing population "bench/population.py is not in this checkout"
  fi
fi
# the chosen models are evaluated without physics: the kit's datasets carry no simulator state (and the GPU
# machine has no MuJoCo), so the job notes "cannot be simulated" and reports the action metrics only
JOBCMD=("$PY" -m pipeline.pretrain_all --datasets sim "${JOB[@]}" --no-mlflow --verbose 0)
step job 200 "${JOBCMD[@]}" --out "$RES/job"
if selected job_population; then
  if "$PY" -m pipeline.pretrain_all --help 2>/dev/null | grep -q -- "--population"; then
    step job_population 200 "${JOBCMD[@]}" --population --out "$RES/job_population"
  else
    missing job_population "pipeline.pretrain_all has no --population option in this checkout"
  fi
fi

"$PY" bench/device/report.py "$WORK" "$OUTDIR" --device "$DEVICE" --quick "$QUICK" --total-s $(($(date +%s) - T0))
rc=$?
if [ "$rc" = 0 ] || [ "$rc" = 3 ]; then # 3: written, some step failed
  rm -rf "$WORK"
else # the tables could not be made: bring back the raw logs at least
  tar -czf "$OUTDIR/logs.tar.gz" -C "$WORK" logs steps.tsv
  echo "run.sh: bench/device/report.py failed (rc $rc); raw logs in $OUTDIR/logs.tar.gz, work folder $WORK" >&2
fi
exit $rc
