#!/usr/bin/env bash
# The GPU path of torchsphere in one script (under 8 minutes on one GPU with the defaults):
#   1. the CUDA tests: the tests that skip without CUDA, and tests/test_sphere_norm.py under
#      TORCHSPHERE_TEST_DEVICE=cuda (the whole device-parametrized suite takes longer than this budget);
#   2. benchmarks/bench_ops.py on CUDA at the official shapes (batch 128), bf16 autocast, eager and compiled;
#   3. benchmarks/bench_train_step.py on CUDA at width 1.0, the official widths (128, 192, 256), bf16 autocast,
#      eager and compiled;
#   4. a 300-step `torchsphere train` of SphereNet-9 on the synthetic dataset at CIFAR shape (3x32x32, 10 classes);
# each part timed and capped by its share of the budget, then the figures go into docs/benchmarks.md (sections
# labelled with torch.cuda.get_device_name()). Run from anywhere; it measures this checkout (PYTHONPATH=<repo>/src).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT=""
MINUTES="7"
DOC=""
DEVICE="cuda"
QUICK=0
DRY=0
FULL=0
STEPS=""
BACKEND="inductor"
COMMAND_LINE="benchmarks/gpu.sh${*:+ $*}"

usage() {
    cat <<'EOF'
Usage: benchmarks/gpu.sh [options]

Runs torchsphere's GPU checks and benchmarks on one CUDA device and writes the figures into docs/benchmarks.md:
the CUDA tests, bench_ops and bench_train_step (bf16 autocast, eager and torch.compile, official sizes) and a
300-step `torchsphere train` on synthetic CIFAR-shaped data. With the defaults it stays under 8 minutes.

Options:
  --out DIR          folder for the logs and the training run (default: reports/gpu/<date-time>)
  --python PATH      the Python with torch and torchsphere's requirements (default: $PYTHON or python3)
  --minutes M        total time budget in minutes, shared out over the parts, each stopped at its share
                     (default 7: tests 10%, bench_ops 22%, bench_train_step 48%, train 15%)
  --doc FILE         Markdown file the figures go into (default: docs/benchmarks.md; with --device cpu:
                     OUT/benchmarks.md, since CPU figures of this script only check it)
  --steps N          training steps of the `torchsphere train` part (default 300; --quick: 4)
  --full             every operator, mode and input in the benchmarks (needs about --minutes 30); without
                     it: bench_ops runs SphereConv2d linear in its default mode, bench_train_step every
                     operator in memory_efficient mode (as create_model builds them) on 32x32x3, one
                     process per operator in the order linear, cosine, sigmoid, learnable_sigmoid, so that
                     a cut-off run keeps the first ones
  --compile-backend B  torch.compile backend of the compiled columns (default inductor)
  --device cpu|cuda  cpu: run every part on the CPU instead, to check the script (no CUDA needed; use --quick)
  --quick            tiny sizes and 1 round everywhere: checks that every part runs, measures nothing useful
  --dry-run          print the commands it would run and exit (no CUDA check, nothing written)
  -h, --help         this help

Exit codes: 0 all parts passed; 1 a part failed or hit its time limit (the others still ran and the figures of
those that finished are written); 2 bad arguments; 3 no CUDA device (torch.cuda.is_available() is False).
EOF
}

die() {  # message [exit code]
    echo "gpu.sh: $1" >&2
    exit "${2:-2}"
}

need_value() {  # option remaining-argument-count
    [[ "$2" -ge 2 ]] || die "$1 needs a value (see --help)"
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --out) need_value "$1" $#; OUT="$2"; shift 2 ;;
        --python) need_value "$1" $#; PY="$2"; shift 2 ;;
        --minutes) need_value "$1" $#; MINUTES="$2"; shift 2 ;;
        --doc) need_value "$1" $#; DOC="$2"; shift 2 ;;
        --steps) need_value "$1" $#; STEPS="$2"; shift 2 ;;
        --compile-backend) need_value "$1" $#; BACKEND="$2"; shift 2 ;;
        --device) need_value "$1" $#; DEVICE="$2"; shift 2 ;;
        --full) FULL=1; shift ;;
        --quick) QUICK=1; shift ;;
        --dry-run) DRY=1; shift ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

[[ "$MINUTES" =~ ^[0-9]+([.][0-9]+)?$ ]] && awk -v m="$MINUTES" 'BEGIN { exit !(m > 0) }' \
    || die "--minutes must be a number > 0; got '$MINUTES'"
[[ -z "$STEPS" || "$STEPS" =~ ^[1-9][0-9]*$ ]] || die "--steps must be an integer >= 1; got '$STEPS'"
[[ "$DEVICE" == cpu || "$DEVICE" == cuda ]] || die "--device must be cpu or cuda; got '$DEVICE'"
[[ "$BACKEND" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "--compile-backend must be a backend name; got '$BACKEND'"
command -v "$PY" >/dev/null 2>&1 || die "--python: '$PY' is not an executable (give the Python that has torch)"
[[ -z "$OUT" ]] && OUT="$ROOT/reports/gpu/$(date -u +%Y%m%d-%H%M%S)"
[[ -z "$DOC" || -d "$(dirname "$DOC")" ]] || die "--doc: the folder of '$DOC' does not exist"
OUT="$(realpath -m "$OUT")"  # the parts run from the repository root
if [[ -z "$DOC" ]]; then  # CPU figures of this script are checks, not benchmarks: they stay out of the docs
    [[ "$DEVICE" == cuda ]] && DOC="$ROOT/docs/benchmarks.md" || DOC="$OUT/benchmarks.md"
fi
DOC="$(realpath -m "$DOC")"

# the share of the budget each part gets (seconds); the benchmarks stop starting new configurations 20 s earlier
share() {  # fraction -> integer seconds of the budget
    awk -v m="$MINUTES" -v f="$1" 'BEGIN { printf "%d", m * 60 * f }'
}
T_TESTS=$(share 0.10)
T_OPS=$(share 0.22)
T_STEP=$(share 0.48)
T_TRAIN=$(share 0.15)
bench_minutes() {  # seconds -> --max-minutes for a benchmark that must end within them
    awk -v s="$1" 'BEGIN { v = (s - 20) / 60; if (v < 0.1) v = 0.1; printf "%.2f", v }'
}

TEST_FILES=(tests/test_fused.py::test_fused_matches_reference_on_cuda)
OPS_ARGS=(--device "$DEVICE" --autocast bf16 --compile --compile-backend "$BACKEND" --no-reference --doc "$DOC")
STEP_ARGS=(--device "$DEVICE" --autocast bf16 --compile --compile-backend "$BACKEND" --widths 1.0 --doc "$DOC")
[[ -z "$STEPS" ]] && { [[ "$QUICK" == 1 ]] && STEPS=4 || STEPS=300; }
TRAIN_ARGS=(--steps "$STEPS" --eval-every "$(( STEPS < 100 ? STEPS : 100 ))" --train-eval-size 0 --quiet)
SYNTHETIC="{num_classes: 10, channels: 3, image_size: 32, train_size: 10000, test_size: 2000}"
if [[ "$FULL" == 0 ]]; then
    OPS_ARGS+=(--operators linear --modes default)                # the layer the op target names
    STEP_ARGS+=(--inputs 32x32x3 --modes memory_efficient)        # as create_model builds the models
fi
if [[ "$DEVICE" == cuda ]]; then
    TEST_FILES+=(tests/test_sphere_norm.py)  # the whole device-parametrized suite: TORCHSPHERE_TEST_DEVICE=cuda pytest
else
    OPS_ARGS+=(--threads 1)
    STEP_ARGS+=(--threads 1)
    TRAIN_ARGS+=(--threads 1)
fi
if [[ "$QUICK" == 1 ]]; then
    OPS_ARGS+=(--shapes 4,8,8,8 --rounds 1 --inner 1)
    STEP_ARGS+=(--widths 0.0625 --batch 8 --rounds 1 --inner 1 --operators linear)
    TRAIN_ARGS+=(--width-mult 0.0625 --batch-size 16 --eval-batch-size 64)
    SYNTHETIC="{num_classes: 10, channels: 3, image_size: 32, train_size: 256, test_size: 64}"
else
    OPS_ARGS+=(--rounds 10)
    STEP_ARGS+=(--rounds 10)
fi

PARTS=(tests bench_ops bench_train_step train)
declare -A LIMIT=([tests]=$T_TESTS [bench_ops]=$T_OPS [bench_train_step]=$T_STEP [train]=$T_TRAIN)
cmd_of() {  # part -> its command, one word per line of the array CMD
    case "$1" in
        tests) CMD=(env "TORCHSPHERE_TEST_DEVICE=$DEVICE" "$PY" -m pytest -q -rs -p no:cacheprovider "${TEST_FILES[@]}") ;;
        bench_ops) CMD=("$PY" benchmarks/bench_ops.py "${OPS_ARGS[@]}" --max-minutes "$(bench_minutes "$T_OPS")") ;;
        bench_train_step) CMD=("$PY" benchmarks/bench_train_step.py "${STEP_ARGS[@]}"
                               --max-minutes "$(bench_minutes "$T_STEP")") ;;
        train) CMD=("$PY" -m torchsphere train --config "$OUT/train.yaml" --device "$DEVICE" "${TRAIN_ARGS[@]}"
                    --output "$OUT/train") ;;
    esac
}

if [[ "$DRY" == 1 ]]; then
    echo "# gpu.sh --dry-run: budget $MINUTES min; output $OUT; figures into $DOC"
    for part in "${PARTS[@]}"; do
        cmd_of "$part"
        printf '# %s (limit %s s)\n' "$part" "${LIMIT[$part]}"
        printf '%q ' "${CMD[@]}"
        echo
    done
    exit 0
fi

cd "$ROOT"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
if [[ "$DEVICE" == cuda ]]; then
    rc=0
    "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)' || rc=$?
    if [[ "$rc" == 3 ]]; then
        echo "gpu.sh: no CUDA device: torch.cuda.is_available() is False with $PY (this script needs a GPU;" \
             "--device cpu --quick runs its steps on the CPU, to check it)" >&2
        exit 3
    elif [[ "$rc" != 0 ]]; then
        die "--python: '$PY' cannot import torch (exit code $rc)"
    fi
fi

mkdir -p "$OUT"
: > "$OUT/parts.tsv"
cat > "$OUT/train.yaml" <<EOF
model: spherenet9
dataset: synthetic
dataset_kwargs: $SYNTHETIC
EOF
echo "gpu.sh: budget $MINUTES min, logs in $OUT, figures into $DOC"
failed=0
for part in "${PARTS[@]}"; do
    cmd_of "$part"
    echo "gpu.sh: [$part] (limit ${LIMIT[$part]} s) $(printf '%q ' "${CMD[@]}")"
    start=$(date +%s.%N)
    rc=0
    timeout --kill-after=5 "${LIMIT[$part]}" "${CMD[@]}" > "$OUT/$part.log" 2>&1 || rc=$?
    secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    printf '%s\t%s\t%s\t%s\n' "$part" "$rc" "$secs" "${LIMIT[$part]}" >> "$OUT/parts.tsv"
    if [[ "$rc" == 0 ]]; then
        echo "gpu.sh: [$part] ok in $secs s"
    else
        failed=1
        echo "gpu.sh: [$part] exit code $rc after $secs s (124: time limit); last lines of $OUT/$part.log:" >&2
        tail -n 15 "$OUT/$part.log" >&2 || true
    fi
done
"$PY" benchmarks/gpu_report.py --out "$OUT" --device "$DEVICE" --doc "$DOC" --command "$COMMAND_LINE" \
    > "$OUT/report.log" 2>&1 || { echo "gpu.sh: writing the report failed; see $OUT/report.log" >&2; failed=1; }
echo "gpu.sh: done; figures in $DOC, logs in $OUT"
exit "$failed"
