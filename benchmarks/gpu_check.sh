#!/usr/bin/env bash
# The GPU check, for a bare H100/H200 machine (the image's python3 with torch, Triton, pytest,
# pytest-timeout and nvcc; nothing installable, no internet; the repository copied in; run as root), in
# two calls, each one `run` of the device tool (docs/benchmarks.md, "The GPU check", has the runbook):
#
#   bash benchmarks/gpu_check.sh test  "$OUT"   # correctness: at most 285 s (FSAM_CHECK_TOTAL)
#   bash benchmarks/gpu_check.sh bench "$OUT"   # numbers: at most 225 s
#
# test   stage     limit  what
#        env         30   nvidia-smi, nvcc, versions (setuptools' too), free GPU memory
#        collect     60   the node ids of both test selections (pytest --collect-only), beside warm
#        warm        40   every recorded Triton launch compiled for this GPU (compile_check --jobs): the
#                         tests then find the kernels in Triton's cache; out of time is no failure
#        triton     120   pytest -m "gpu and triton" (needs no build)
#        build      150   beside triton: scripts/build_inplace.sh (setup.py build_ext --inplace, no pip,
#                         pyproject.toml not read), FSAM_FORCE_CUDA=1, the GPU's own arch
#        backends    20   which backends load on the GPU, and why not: fails unless native and triton do
#        native     120   pytest -m "gpu and not triton", in what is left of the total
# bench  env 30, build 150 (incremental: seconds on the machine that ran `test`, whose build/ is kept),
#        backends 20, structured 40 (benchmarks/bench_structured.py: 2:4 Linears, keep_pruned), bench
#        (benchmarks/run.py --budget: what is left less 25 s), tables 10.
#
# A test stage runs its tests in P pytest processes at once (as many as the free GPU memory holds at
# 20 GiB each, at most 4: 3 on an H100; FSAM_CHECK_PROCS), each a round-robin share of the node ids, -v
# and -rfEs, with pytest-timeout's 90 s per test. Each process records every test as it ends
# (benchmarks/gpu_check.py as a pytest plugin), so when the stage's limit stops it, summary.txt lists the
# failed tests, those running when stopped, and those never started, and rerun.txt has them all (also
# kept on the machine as build/gpu-check/rerun.txt while it stays warm):
#   FSAM_CHECK_RERUN=build/gpu-check/rerun.txt bash benchmarks/gpu_check.sh test "$OUT"   # just those
# Every stage runs under `timeout` (plus 5 s to kill) and no stage starts past the call's total, so a
# slow stage shortens the later ones instead of overrunning the call. A failed build skips the native
# tests (test) or the benchmark (bench).
#
# Out (no subfolders, at most 5 files in a GPU run): summary.txt (stage, exit code, seconds, limit; the
# test report), test.log or bench.log (every stage's output), rerun.txt (test, when something failed or
# did not run), <gpu>-<mode>.csv and tables.md (bench). Exit status: 0 when every stage passed, else 1.
#
# Environment: PYTHON (default python3), FSAM_CHECK_TOTAL (seconds), FSAM_CHECK_PROCS,
# FSAM_CHECK_RERUN (a file of node ids), FSAM_CHECK_SKIP_BUILD=1 (use the package as it is),
# FSAM_CHECK_MODE (full; quick, or tiny: the dry run on a CPU machine, which runs the same test bodies
# on the CPU targets, native-cpu and the Triton interpreter, at small sizes, with longer limits, and
# the tiny benchmark: CI runs both calls so the plumbing cannot rot).
set -uo pipefail
CALL=${1:-}
OUT=${2:-}
if [ "$CALL" != test ] && [ "$CALL" != bench ] || [ -z "$OUT" ]; then
  echo "usage: bash benchmarks/gpu_check.sh test|bench OUTPUT_FOLDER" >&2
  exit 2
fi
RERUN=${FSAM_CHECK_RERUN:-}
if [ -n "$RERUN" ]; then
  [ -f "$RERUN" ] || { echo "FSAM_CHECK_RERUN: no file $RERUN" >&2; exit 2; }
  RERUN=$(cd "$(dirname "$RERUN")" && pwd)/$(basename "$RERUN")
fi
cd "$(dirname "$0")/.."
ROOT=$(pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
MODE=${FSAM_CHECK_MODE:-full}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# stage limits (seconds); the dry run's tests run in the interpreter on 2-core CI machines: longer
if [ "$MODE" = tiny ]; then
  L_ENV=60 L_COLLECT=180 L_WARM=0 L_TRITON=600 L_BUILD=600 L_BACKENDS=60 L_NATIVE=600 L_TABLES=60 L_TEST=300
  if [ "$CALL" = test ]; then DEFAULT_TOTAL=1500; else DEFAULT_TOTAL=600; fi
else
  L_ENV=30 L_COLLECT=60 L_WARM=40 L_TRITON=120 L_BUILD=150 L_BACKENDS=20 L_NATIVE=120 L_TABLES=10 L_TEST=90
  if [ "$CALL" = test ]; then DEFAULT_TOTAL=285; else DEFAULT_TOTAL=225; fi
fi
TOTAL=${FSAM_CHECK_TOTAL:-$DEFAULT_TOTAL}
T0=$(date +%s)
WORK="$ROOT/build/gpu-check/$CALL"  # per-stage logs and node id lists (git-ignored)
rm -rf "$WORK"
mkdir -p "$WORK"
LOG="$OUT/$CALL.log"
SUMMARY="$OUT/summary.txt"
FAILED=0
: > "$LOG"
rm -f "$OUT/rerun.txt"
echo "$CALL stage  rc  seconds  limit" > "$SUMMARY"

# `timeout` runs each stage in a process group of its own: if this script is stopped, stop them too
descendants() { local c; for c in $(ps -o pid= --ppid "$1"); do descendants "$c"; echo "$c"; done; }
cleanup() { local pids; pids=$(descendants $$); [ -z "$pids" ] || kill $pids 2>/dev/null; }
trap 'cleanup; exit 143' TERM INT
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
cap() {  # cap LIMIT RESERVE: LIMIT, or less so that RESERVE seconds of the total stay for what follows
  local l=$(( $(left) - $2 ))
  echo $(( l < $1 ? l : $1 ))
}
run_stage() {  # run_stage NAME LIMIT COMMAND...: COMMAND under its limit, output in WORK/NAME.log
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  if [ "$limit" -lt 5 ]; then
    echo "not started: ${limit}s left of the ${TOTAL}s total" > "$WORK/$name.log"
    echo "124 0 $limit" > "$WORK/$name.done"
    return 124
  fi
  echo "\$ $*" > "$WORK/$name.log"
  timeout --kill-after=5 "$limit" "$@" >> "$WORK/$name.log" 2>&1
  rc=$?
  echo "$rc $(( $(date +%s) - start )) $limit" > "$WORK/$name.done"
  return $rc
}
record() {  # record NAME: its line in the summary and its output in the log; returns its exit code
  local name=$1 rc secs limit
  read -r rc secs limit < "$WORK/$name.done"
  printf '%-10s %4s %8s %6s\n' "$name" "$rc" "$secs" "$limit" >> "$SUMMARY"
  { echo "===== $name (limit ${limit}s)"; cat "$WORK/$name.log"; echo "===== $name: exit $rc after ${secs}s"; } >> "$LOG"
  return "$rc"
}
stage() { run_stage "$@"; record "$1"; }
skipped() {  # skipped NAME WHY
  printf '%-10s %4s %8s %6s  (%s)\n' "$1" - 0 - "$2" >> "$SUMMARY"
  echo "===== $1: skipped ($2)" >> "$LOG"
}
out_of_time_ok() { [ "$1" -eq 0 ] || [ "$1" -eq 124 ] || [ "$1" -eq 137 ]; }

# ---- env: versions, and the GPU's name, arch and how many test processes its memory holds
stage env "$L_ENV" bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm --format=csv 2>&1 || true; nvcc --version 2>&1 | tail -2 || true; nproc; '$PY' -m benchmarks.gpu_check env"
ENV_RC=$?
[ $ENV_RC -eq 0 ] || FAILED=1
fact() { sed -n "s/^check: .*\\b$1=\\([^ ]*\\).*/\\1/p" "$WORK/env.log" | tail -1; }
GPU=$(fact gpu); GPU=${GPU:-unknown}
ARCH=$(fact arch)
CC=$(fact cc)
PROCS=${FSAM_CHECK_PROCS:-$(fact procs)}
PROCS=${PROCS:-1}
CPUS=$(nproc)
if [ "$MODE" != tiny ] && [ "$GPU" = cpu ]; then
  echo "no CUDA device: this check needs a GPU (FSAM_CHECK_MODE=tiny is its dry run on a CPU)" | tee -a "$LOG"
  FAILED=1
fi
# one architecture (the GPU's own) keeps the build short; FSAM_FORCE_CUDA makes any failure fatal
if [ "$MODE" = tiny ]; then BUILD_ENV=(FSAM_NO_CUDA=1); else BUILD_ENV=(FSAM_FORCE_CUDA=1 "TORCH_CUDA_ARCH_LIST=${ARCH:-9.0}"); fi
build() {  # build LIMIT [JOBS]: the extension in place; returns the stage's exit code
  run_stage build "$1" env "${BUILD_ENV[@]}" MAX_JOBS="${2:-$CPUS}" PYTHON="$PY" FSAM_BUILD_DIR="$ROOT/build/inplace" \
    bash scripts/build_inplace.sh
}
DEVICE=cuda
[ "$MODE" != tiny ] || DEVICE=cpu

if [ "$CALL" = test ]; then
  # ---- the test call
  if [ "$MODE" = tiny ]; then
    SEL_TRITON="triton and not gpu" SEL_NATIVE="native and not gpu"
    ENV_TRITON=(TRITON_INTERPRET=1)  # the interpreter needs it before import
    THREADS=$(( CPUS / PROCS > 0 ? CPUS / PROCS : 1 ))
  else
    # tests/conftest.py runs Triton compiled when -m cannot select the interpreter target
    SEL_TRITON="gpu and triton" SEL_NATIVE="gpu and not triton"
    ENV_TRITON=()
    THREADS=2  # the tests' CPU work is small; the build beside them gets the cores
  fi
  PYTEST_ARGS=(-v -rfEs --durations=10 -p no:cacheprovider -o addopts="" -p benchmarks.gpu_check)
  # one test's limit (pytest-timeout, where installed): a hung test fails alone
  [ "$(fact timeout)" = no ] || PYTEST_ARGS+=(--timeout="$L_TEST")
  collect() {  # both selections' node ids (tests/conftest.py picks Triton's mode from -m, so each its own)
    "$PY" -m pytest tests --collect-only -q -m "$SEL_TRITON" -p no:cacheprovider -o addopts="" > "$WORK/triton.collect" 2>&1 &
    "$PY" -m pytest tests --collect-only -q -m "$SEL_NATIVE" -p no:cacheprovider -o addopts="" > "$WORK/native.collect" 2>&1
    local rc=$?
    wait $! || rc=1
    for s in triton native; do
      tail -3 "$WORK/$s.collect"
      "$PY" -m benchmarks.gpu_check ids "$WORK/$s.collect" "$RERUN" > "$WORK/$s.ids" || { cat "$WORK/$s.collect"; rc=1; }
      echo "$s: $(wc -l < "$WORK/$s.ids") tests to run${RERUN:+ (those in $RERUN)}"
    done
    return $rc
  }
  export -f collect
  export PY SEL_TRITON SEL_NATIVE WORK RERUN
  run_tests() {  # run_tests NAME LIMIT MARKEXPR [VAR=VALUE...]: WORK/NAME.ids in PROCS pytest processes at once
    local name=$1 limit=$2 sel=$3 start k rc=0 r pids=() ids=()
    shift 3
    start=$(date +%s)
    "$PY" -m benchmarks.gpu_check split "$WORK/$name.ids" "$PROCS" "$WORK/$name.shard"
    [ "$limit" -ge 5 ] || rc=124  # no time left: every test is reported as not run
    for (( k = 0; k < PROCS && rc == 0; k++ )); do
      [ -s "$WORK/$name.shard$k" ] || continue
      mapfile -t ids < "$WORK/$name.shard$k"
      FSAM_CHECK_PROGRESS="$WORK/$name.progress$k" OMP_NUM_THREADS=$THREADS timeout --kill-after=5 "$limit" \
        env "$@" "$PY" -m pytest -m "$sel" "${PYTEST_ARGS[@]}" "${ids[@]}" > "$WORK/$name.shard$k.log" 2>&1 &
      pids+=($!)
    done
    for k in "${!pids[@]}"; do
      wait "${pids[$k]}"
      r=$?
      [ $r -le $rc ] || rc=$r  # the worst: 1 failed tests, 124/137 out of time
    done
    echo "$PROCS processes, OMP_NUM_THREADS=$THREADS, limit ${limit}s: pytest -m '$sel' ${PYTEST_ARGS[*]} NODE_IDS" > "$WORK/$name.log"
    for (( k = 0; k < PROCS; k++ )); do
      [ -f "$WORK/$name.shard$k.log" ] || continue
      { echo "----- $name process $k of $PROCS"; cat "$WORK/$name.shard$k.log"; } >> "$WORK/$name.log"
    done
    echo "$rc $(( $(date +%s) - start )) $limit" > "$WORK/$name.done"
    "$PY" -m benchmarks.gpu_check report "$name" "$WORK/$name.ids" "$WORK/rerun" "$WORK/$name".progress* \
      >> "$WORK/report.txt"
    record "$name"
  }
  test_stage() {  # test_stage NAME LIMIT MARKEXPR [VAR=VALUE...]: tests, unless there are none to run
    if [ ! -s "$WORK/$1.ids" ]; then
      if [ -n "$RERUN" ] && [ "$COLLECT_RC" -eq 0 ]; then skipped "$1" "none to rerun"; return 0; fi
      skipped "$1" "no tests collected"; return 1
    fi
    run_tests "$@"
  }

  run_stage collect "$(cap "$L_COLLECT" 0)" bash -c collect &
  COLLECT_PID=$!
  if [ "$MODE" != tiny ] && [ -z "$RERUN" ]; then
    stage warm "$(cap "$L_WARM" 200)" "$PY" -m fsam_kernels.triton_kernels.compile_check "$CC" --jobs "$CPUS"
    out_of_time_ok $? || FAILED=1  # out of time: the tests compile the rest
  fi
  wait $COLLECT_PID
  record collect
  COLLECT_RC=$?
  [ $COLLECT_RC -eq 0 ] || FAILED=1

  BUILD_PID=
  if [ "${FSAM_CHECK_SKIP_BUILD:-0}" != 1 ]; then
    # beside the Triton tests (they need no build); the build's files replace the old ones by rename
    build "$(cap "$L_BUILD" 40)" $(( CPUS > PROCS + 2 ? CPUS - PROCS : 2 )) &
    BUILD_PID=$!
  fi
  # the Triton tests may run until the build's limit; the native tests get the rest
  test_stage triton "$(cap "$L_TRITON" 60)" "$SEL_TRITON" "${ENV_TRITON[@]}" || FAILED=1
  BUILT=1
  if [ -n "$BUILD_PID" ]; then
    wait $BUILD_PID
    record build || { BUILT=0; FAILED=1; }
  else
    skipped build "FSAM_CHECK_SKIP_BUILD=1"
  fi
  stage backends "$(cap "$L_BACKENDS" 0)" "$PY" -m benchmarks.gpu_check backends "$DEVICE" || FAILED=1
  if [ $BUILT = 1 ]; then
    test_stage native "$(cap "$L_NATIVE" 10)" "$SEL_NATIVE" || FAILED=1
  else
    skipped native "the build failed"
  fi
  if [ -s "$WORK/report.txt" ]; then
    { echo; cat "$WORK/report.txt"; } >> "$SUMMARY"
  fi
  # the list also stays on the machine (build/ is kept while it is warm): FSAM_CHECK_RERUN=$KEPT
  KEPT="$ROOT/build/gpu-check/rerun.txt"
  if [ -s "$WORK/rerun" ]; then
    cp "$WORK/rerun" "$OUT/rerun.txt"
    cp "$WORK/rerun" "$KEPT"
    echo "rerun.txt: the $(wc -l < "$WORK/rerun") tests above that failed or did not run; to run them again:" >> "$SUMMARY"
    echo "  FSAM_CHECK_RERUN=build/gpu-check/rerun.txt bash benchmarks/gpu_check.sh test \"\$OUT\"" >> "$SUMMARY"
  else
    rm -f "$KEPT"
  fi
else
  # ---- the benchmark call: the build is incremental on the machine that ran `test`
  BUILT=1
  if [ "${FSAM_CHECK_SKIP_BUILD:-0}" != 1 ]; then
    build "$(cap "$L_BUILD" 60)"
    record build || { BUILT=0; FAILED=1; }
  else
    skipped build "FSAM_CHECK_SKIP_BUILD=1"
  fi
  stage backends "$(cap "$L_BACKENDS" 60)" "$PY" -m benchmarks.gpu_check backends "$DEVICE" || FAILED=1
  CSV="$OUT/$GPU-$MODE.csv"
  # 2:4 end to end (semi-structured Linears, keep_pruned's step): rows in $OUT/structured.csv
  if [ $BUILT = 1 ]; then
    stage structured "$(cap 40 85)" "$PY" -m benchmarks.bench_structured --out "$OUT" --mode "$MODE"
    out_of_time_ok $? || FAILED=1
  fi
  # the benchmark gets what is left, less 25 s for the tables and the kill slack
  LEFT=$(( $(left) - 25 ))
  if [ $BUILT = 0 ]; then
    skipped bench "the build failed"
  elif [ $LEFT -lt 60 ]; then
    skipped bench "${LEFT}s left"
  else
    # the case in flight when the budget runs out may take 20 s more
    stage bench $LEFT "$PY" benchmarks/run.py --"$MODE" --csv "$CSV" --budget $(( LEFT - 20 ))
    out_of_time_ok $? || FAILED=1  # out of time is not a failure
  fi
  if [ -s "$CSV" ]; then
    stage tables "$L_TABLES" bash -c "'$PY' benchmarks/table.py '$CSV' > '$OUT/tables.md'" || FAILED=1
    if [ "$MODE" = tiny ]; then
      stage plots 60 "$PY" benchmarks/plot.py "$CSV" --out "$WORK" || FAILED=1
    fi
  fi
fi
printf '%-10s %4s %8s %6s\n' total "$FAILED" "$(( $(date +%s) - T0 ))" "$TOTAL" >> "$SUMMARY"
cat "$SUMMARY"
ls -la "$OUT"
exit $FAILED
