#!/usr/bin/env bash
# Sets up .venv (see setup_env.sh) and runs the demo: Adam vs SAM vs FSAM on scikit-learn's digits.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. "${FSAM_VENV:-.venv}/bin/activate"
python examples/demo.py "$@"
