#!/usr/bin/env bash
# Sets up .venv (see setup_env.sh) and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. "${FSAM_VENV:-.venv}/bin/activate"
python -m pytest tests "$@"
