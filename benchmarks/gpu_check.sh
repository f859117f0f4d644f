#!/usr/bin/env bash
# One GPU check, for a bare H100/H200 machine (torch, Triton and nvcc installed, no internet, the
# repository copied in, run as root), in at most 8 minutes:
#   1. environment (nvidia-smi, versions)     20 s
#   2. build the native extension             150 s   pip install --no-build-isolation --no-deps -e .
#   3. GPU tests                              150 s   pytest tests -m gpu -s (timings printed to the log)
#   4. full benchmarks                        what is left of the 8 minutes, less 85 s (at least 90 s);
#                                                     benchmarks/run.py --full skips the cases past its budget
#   5. plots                                  30 s
#   6. tables (README tables and the targets) 15 s
# Each stage runs under `timeout`, so a hang costs its own slot only, and a failed stage does not stop
# the next. Everything lands in the output folder (at most 8 files, no subfolders):
#   gpu_check.log (every stage's output), summary.txt (stage, exit code, seconds), <gpu>-full.csv, PNGs,
#   tables.md (benchmarks/table.py: per-op, end-to-end, memory, launches, and each backend vs the targets).
#
#   bash benchmarks/gpu_check.sh "$OUT"
#
# Environment: PYTHON (default python3), FSAM_CHECK_TOTAL (seconds for the whole check, default 470),
# FSAM_CHECK_BENCH_BUDGET (seconds of benchmarking; default: what is left of the total, less 85),
# FSAM_CHECK_SKIP_BUILD=1 (use the installed package as is), FSAM_CHECK_MODE (full; quick or tiny to try the plumbing on a CPU).
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTPUT_FOLDER}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
MODE=${FSAM_CHECK_MODE:-full}
TOTAL=${FSAM_CHECK_TOTAL:-470}
T0=$(date +%s)
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
export PYTHONUNBUFFERED=1
: > "$LOG"
echo "stage rc seconds" > "$SUMMARY"

stage() {  # stage NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "===== $name (limit ${limit}s): $*" >> "$LOG"
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  echo "$name $rc $(( $(date +%s) - start ))" >> "$SUMMARY"
  echo "===== $name: exit $rc after $(( $(date +%s) - start )) s" >> "$LOG"
  return $rc
}

stage env 20 bash -c "nvidia-smi; nvcc --version | tail -2; $PY -c 'import torch, triton, sys; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no cuda\")'"

if [ "${FSAM_CHECK_SKIP_BUILD:-0}" != 1 ]; then
  # one architecture (the GPU's own) keeps the build short
  ARCH=$($PY -c 'import torch; c = torch.cuda.get_device_capability(); print(f"{c[0]}.{c[1]}")' 2>/dev/null || echo "9.0")
  stage build 150 env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" \
    $PY -m pip install --no-index --no-build-isolation --no-deps -e .
fi
stage backends 20 $PY -c 'import torch, fsam_kernels as f; from fsam_kernels.backends import load_error, backend_names; d = "cuda" if torch.cuda.is_available() else "cpu"; print(d, f.available_backends(d)); [print(n, "->", load_error(n)) for n in backend_names()]'

# the interpreter tests set TRITON_INTERPRET=1 at import, which would turn the compiled GPU tests off
stage tests 150 $PY -m pytest tests -m gpu -q -s -p no:cacheprovider -o addopts="" --timeout=120 --ignore=tests/test_triton_interpreter.py

GPU=$($PY -c 'import torch; print(torch.cuda.get_device_name(0).lower().replace("nvidia ", "nvidia-").replace(" ", "-") if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo gpu)
CSV="$OUT/$GPU-$MODE.csv"
# the benchmark gets what the earlier stages left: 40 s of slack for the case in flight, 45 s for plots and tables
LEFT=$(( TOTAL - ($(date +%s) - T0) - 85 ))
BUDGET=${FSAM_CHECK_BENCH_BUDGET:-$(( LEFT > 90 ? LEFT : 90 ))}
stage bench $(( BUDGET + 40 )) $PY benchmarks/run.py --"$MODE" --csv "$CSV" --budget "$BUDGET"

if [ -s "$CSV" ]; then
  stage plots 30 bash -c "$PY benchmarks/plot.py '$CSV' --out '$OUT' && $PY benchmarks/plot.py '$CSV' --out '$OUT' --dtype bfloat16"
  stage tables 15 bash -c "$PY benchmarks/table.py '$CSV' > '$OUT/tables.md'"
fi
cat "$SUMMARY"
ls -la "$OUT"
