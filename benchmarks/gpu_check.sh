#!/usr/bin/env bash
# One GPU check, for a bare H100/H200 machine (torch, Triton, pytest and nvcc installed, no internet,
# the repository copied in, run as root), in at most 7 minutes, build included:
#   stage    limit  what
#   env        10   nvidia-smi, versions
#   warm       40   every recorded Triton launch compiled for this GPU in parallel (compile_check --jobs):
#                   registers and spills in the log, and the tests then find the kernels in Triton's cache
#   triton    100   the Triton GPU tests (they need no build): pytest -m "gpu and triton"
#   build     120   the CUDA extension, FSAM_FORCE_CUDA=1: a compile or link error fails the check
#   native     80   the native CUDA and the other GPU tests: pytest -m "gpu and not triton"
#   backends   10   which backends load, and why not
#   bench      what is left of the total less 15 s; skipped under 60 s (benchmarks/run.py --budget)
#   tables     10   README tables and the targets (benchmarks/table.py)
# Every stage runs under `timeout` (plus 5 s to kill), so the fixed limits and the slack add up to
# 405 s and the benchmark gets what the others leave of FSAM_CHECK_TOTAL. A failed build skips the
# native tests and the benchmark. Tests print one line each (-v) and a summary of failures, errors
# and skips (-rfEs), so a stage killed by its limit still tells what passed. Plots are drawn from the
# CSV afterwards, on any machine (benchmarks/plot.py), except in the tiny mode, which tries them.
# Everything lands in the output folder (no subfolders): gpu_check.log (every stage's output),
# summary.txt (stage, exit code, seconds), <gpu>-<mode>.csv, tables.md.
# Exit status: 0 when the tests and the build passed, 1 otherwise.
#
#   bash benchmarks/gpu_check.sh "$OUT"
#
# Environment: PYTHON (default python3), FSAM_CHECK_TOTAL (seconds, default 420; 900 in tiny mode),
# FSAM_CHECK_SKIP_BUILD=1 (use the package as it is), FSAM_CHECK_MODE (full; quick, or tiny: the dry
# run on a CPU machine, which runs the same test bodies on the CPU targets, native-cpu and the Triton
# interpreter, at small sizes, with 300 s per test stage, and the tiny benchmark: CI runs it so the
# plumbing cannot rot).
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTPUT_FOLDER}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
MODE=${FSAM_CHECK_MODE:-full}
# the dry run's tests run in the interpreter and at small sizes on 2-core CI machines: longer limits
if [ "$MODE" = tiny ]; then TRITON_LIMIT=300 NATIVE_LIMIT=300 DEFAULT_TOTAL=900; else TRITON_LIMIT=100 NATIVE_LIMIT=80 DEFAULT_TOTAL=420; fi
TOTAL=${FSAM_CHECK_TOTAL:-$DEFAULT_TOTAL}
T0=$(date +%s)
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
FAILED=0
export PYTHONUNBUFFERED=1
: > "$LOG"
echo "stage rc seconds" > "$SUMMARY"

stage() {  # stage NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "===== $name (limit ${limit}s): $*" >> "$LOG"
  timeout --kill-after=5 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  echo "$name $rc $(( $(date +%s) - start ))" >> "$SUMMARY"
  echo "===== $name: exit $rc after $(( $(date +%s) - start )) s" >> "$LOG"
  return $rc
}
skipped() {  # skipped NAME WHY
  echo "$1 skipped 0" >> "$SUMMARY"
  echo "===== $1: skipped ($2)" >> "$LOG"
}

if [ "$MODE" = tiny ]; then
  # no GPU needed: the CPU targets of the same tests (the interpreter needs TRITON_INTERPRET at import)
  TRITON_TESTS=(env TRITON_INTERPRET=1 "$PY" -m pytest -m "triton and not gpu")
  NATIVE_TESTS=("$PY" -m pytest -m "native and not gpu")
else
  TRITON_TESTS=("$PY" -m pytest -m "gpu and triton")
  NATIVE_TESTS=("$PY" -m pytest -m "gpu and not triton")
fi
# tests/conftest.py runs Triton compiled when -m cannot select the interpreter target ("gpu and triton")
PYTEST_ARGS=(tests -v -rfEs --durations=15 -p no:cacheprovider -o addopts="")

stage env 10 bash -c "nvidia-smi || true; nvcc --version | tail -2 || true; $PY -c 'import torch, triton, sys; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no cuda\")'"

# Triton first: its kernels have never run on a GPU, and they need no build.
if [ "$MODE" != tiny ]; then
  CC=$($PY -c 'import torch; c = torch.cuda.get_device_capability(); print(f"{c[0]}{c[1]}")' 2>/dev/null || echo 90)
  stage warm 40 "$PY" -m fsam_kernels.triton_kernels.compile_check "$CC" --jobs "$(nproc)"
  rc=$?
  [ $rc -eq 0 ] || [ $rc -eq 124 ] || [ $rc -eq 137 ] || FAILED=1  # out of time: the tests compile the rest
fi
stage triton $TRITON_LIMIT "${TRITON_TESTS[@]}" "${PYTEST_ARGS[@]}" --timeout=90 || FAILED=1

BUILT=1
if [ "${FSAM_CHECK_SKIP_BUILD:-0}" != 1 ]; then
  # one architecture (the GPU's own) keeps the build short; FSAM_FORCE_CUDA makes any failure fatal
  ARCH=$($PY -c 'import torch; c = torch.cuda.get_device_capability(); print(f"{c[0]}.{c[1]}")' 2>/dev/null || echo "9.0")
  stage build 120 env FSAM_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" \
    "$PY" -m pip install --no-index --no-build-isolation --no-deps -e . || { BUILT=0; FAILED=1; }
fi
if [ $BUILT = 1 ]; then
  stage backends 10 "$PY" -c 'import torch, fsam_kernels as f; from fsam_kernels.backends import load_error, backend_names; d = "cuda" if torch.cuda.is_available() else "cpu"; print(d, f.available_backends(d)); [print(n, "->", load_error(n)) for n in backend_names()]'
  stage native $NATIVE_LIMIT "${NATIVE_TESTS[@]}" "${PYTEST_ARGS[@]}" --timeout=70 || FAILED=1
else
  skipped native "the CUDA build failed"
fi

GPU=$($PY -c 'import torch; print(torch.cuda.get_device_name(0).lower().replace("nvidia ", "nvidia-").replace(" ", "-") if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo gpu)
CSV="$OUT/$GPU-$MODE.csv"
# the benchmark gets what the earlier stages left, less 15 s for the tables and their kill slack
LEFT=$(( TOTAL - ($(date +%s) - T0) - 15 ))
if [ $BUILT = 0 ]; then
  skipped bench "the CUDA build failed"
elif [ $LEFT -lt 60 ]; then
  skipped bench "${LEFT}s left"
else
  # the case in flight when the budget runs out may take 20 s more
  stage bench $LEFT "$PY" benchmarks/run.py --"$MODE" --csv "$CSV" --budget $(( LEFT - 20 ))
  rc=$?
  [ $rc -eq 0 ] || [ $rc -eq 124 ] || [ $rc -eq 137 ] || FAILED=1  # out of time is not a failure
fi

if [ -s "$CSV" ]; then
  stage tables 10 bash -c "$PY benchmarks/table.py '$CSV' > '$OUT/tables.md'" || FAILED=1
  if [ "$MODE" = tiny ]; then
    stage plots 60 "$PY" benchmarks/plot.py "$CSV" --out "$OUT" || FAILED=1
  fi
fi
echo "total $FAILED $(( $(date +%s) - T0 ))" >> "$SUMMARY"
cat "$SUMMARY"
ls -la "$OUT"
exit $FAILED
