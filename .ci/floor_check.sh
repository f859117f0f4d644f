#!/usr/bin/env bash
# CI: the oldest supported torch (docs/install.md, "Supported versions"), installed the way the README
# says, in a fresh venv with the setuptools `python3 -m venv` gives (65 with Python 3.11).
#
# A fresh venv gets torch $FSAM_FLOOR_TORCH_SPEC (default torch==2.4.1: the index here serves it as a
# CUDA wheel, ~3 GB, ~150 s), then `pip install --no-build-isolation .` from a copy of the tree, a
# non-editable install whose extension is compiled against that torch in the copy's build dir: the
# working tree's own extension (built against the main venv's torch) is left alone. The copy's
# fsam_kernels is deleted before the tests, so they can only import the installed package (children
# included). The tests: the core suite on the native and torch backends (not the Triton kernels: the
# Triton this torch pins, 3.0, is below their floor, and the backend must say so), the compile, DDP and
# version checks. Everything is deleted at the end.
#
# Knobs: FSAM_FLOOR_VENV (reuse this venv, e.g. for local iterations), FSAM_FLOOR_TORCH_SPEC, MAX_JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
WORK=$(mktemp -d /tmp/fsam-floor.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
VENV=${FSAM_FLOOR_VENV:-$WORK/venv}
TORCH_SPEC=${FSAM_FLOOR_TORCH_SPEC:-torch==2.4.1}
export MAX_JOBS=${MAX_JOBS:-2} FSAM_NO_CUDA=1
unset FSAM_NO_NATIVE FSAM_FORCE_CUDA FSAM_BACKEND PYTHONPATH

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
echo "floor-check: $("$PY" --version), setuptools $("$PY" -c 'import setuptools; print(setuptools.__version__)') (the venv's own)"
# The README's install: torch first, setuptools' wheel builder (not in a fresh venv), then the package.
"$PY" -m pip install -q "$TORCH_SPEC" setuptools wheel
"$PY" -m pip install -q numpy pytest pytest-timeout
echo "floor-check: venv ready in $(( $(date +%s) - start )) s"

mkdir "$WORK/src"
cp -r setup.py pyproject.toml README.md MANIFEST.in csrc fsam_kernels tests "$WORK/src/"
find "$WORK/src" -name '*.so' -delete
cd "$WORK/src"
build_start=$(date +%s)
"$PY" -m pip install -q --no-build-isolation .
echo "floor-check: built and installed in $(( $(date +%s) - build_start )) s"
rm -rf fsam_kernels
"$PY" -m fsam_kernels

# The core suite: the public API, the native ops, both CPU backends against the reference, bad input
# and storage swaps, numeric policy, checkpoints; then compile, DDP, the CLI and the version floors.
TRITON_INTERPRET=0 "$PY" -m pytest -q -p no:cacheprovider --timeout 600 \
  tests/test_versions.py tests/test_cli.py tests/test_fsam_api.py tests/test_native_ops.py \
  tests/test_backend_conformance.py tests/test_numeric_policy.py tests/test_robustness.py \
  tests/test_checkpoints_and_copies.py tests/test_compile.py tests/test_ddp.py \
  -k "not triton or versions"
echo "floor-check: done in $(( $(date +%s) - start )) s"
