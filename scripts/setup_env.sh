#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv and installs everything the demo,
# the tests and the benchmarks need. torch is pinned first so that pip never resolves an unpinned
# (multi-GB CUDA) torch; the package is then installed without build isolation so its native
# extension compiles against that torch. What is already current is skipped: the dependencies when
# the torch pin and requirements-dev.txt are unchanged, the package build when setup.py,
# pyproject.toml and csrc/ are (the install is editable: Python changes need no reinstall).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FSAM_VENV:-.venv}
TORCH_SPEC=${FSAM_TORCH_SPEC:-torch==2.13.0}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
. "$VENV/bin/activate"
stamp() { sha256sum "$@" | sha256sum | cut -c1-16; }
DEPS=$(echo "$TORCH_SPEC" | cat - requirements-dev.txt | sha256sum | cut -c1-16)
BUILD=$(stamp setup.py pyproject.toml csrc/* | tr -d '\n')-${FSAM_NO_NATIVE:-0}${FSAM_NO_CUDA:-0}${FSAM_FORCE_CUDA:-0}
if [ "$(cat "$VENV/.fsam-deps" 2>/dev/null)" != "$DEPS" ]; then
  python -m pip install -q --upgrade pip setuptools wheel
  python -m pip install -q "$TORCH_SPEC"
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
