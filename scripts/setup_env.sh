#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv and installs everything the demo,
# the tests and the benchmarks need. torch is pinned first so that pip never resolves an unpinned
# (multi-GB CUDA) torch; the package is then installed without build isolation so its native
# extension compiles against that torch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FSAM_VENV:-.venv}
TORCH_SPEC=${FSAM_TORCH_SPEC:-torch==2.13.0}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip setuptools wheel
python -m pip install -q "$TORCH_SPEC"
python -m pip install -q -r requirements-dev.txt
python -m pip install -q --no-build-isolation -e .
