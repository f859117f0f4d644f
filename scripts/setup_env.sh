#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv and installs everything the demo,
# the tests and the benchmarks need. torch is pinned first so that pip never resolves an unpinned
# (multi-GB CUDA) torch; the package is then installed without build isolation so its native
# extension compiles against that torch. What is already current is skipped: the dependencies when
# the torch pin and requirements-dev.txt are unchanged, the package build when setup.py,
# pyproject.toml and csrc/ are (the install is editable: Python changes need no reinstall).
#
# Which torch: FSAM_TORCH_SPEC is the exact requirement (default torch==2.13.0) and FSAM_TORCH_INDEX_URL,
# when set, the only index it is installed from; by default pip's own index, which decides the build:
# on Linux x86-64 PyPI serves the CUDA build (~5 GB with its nvidia libraries), so a CPU-only machine
# wants FSAM_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu (the CPU build, ~0.8 GB). The torch
# installed, its build and its size on disk are printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FSAM_VENV:-.venv}
TORCH_SPEC=${FSAM_TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX=${FSAM_TORCH_INDEX_URL:-}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
. "$VENV/bin/activate"
stamp() { sha256sum "$@" | sha256sum | cut -c1-16; }
DEPS=$(echo "$TORCH_SPEC $TORCH_INDEX" | cat - requirements-dev.txt | sha256sum | cut -c1-16)
BUILD=$(stamp setup.py pyproject.toml csrc/* | tr -d '\n')-${FSAM_NO_NATIVE:-0}${FSAM_NO_CUDA:-0}${FSAM_FORCE_CUDA:-0}
if [ "$(cat "$VENV/.fsam-deps" 2>/dev/null)" != "$DEPS" ]; then
  python -m pip install -q --upgrade pip setuptools wheel
  if [ -n "$TORCH_INDEX" ]; then
    echo "setup_env: installing $TORCH_SPEC from $TORCH_INDEX"
    python -m pip install -q --index-url "$TORCH_INDEX" "$TORCH_SPEC"
  else
    python -m pip install -q "$TORCH_SPEC"
  fi
  python -m pip install -q -r requirements-dev.txt
  echo "$DEPS" > "$VENV/.fsam-deps"
  rm -f "$VENV/.fsam-build"
else
  echo "setup_env: dependencies current ($VENV)"
fi
if [ "$(cat "$VENV/.fsam-build" 2>/dev/null)" != "$BUILD" ] || ! python -c "import fsam_kernels" 2>/dev/null; then
  python -m pip install -q --no-build-isolation -e .
  echo "$BUILD" > "$VENV/.fsam-build"
else
  echo "setup_env: fsam_kernels build current"
fi
python scripts/torch_size.py
