#!/usr/bin/env bash
# Sets up .venv, lints (ruff, configured in pyproject.toml) and runs the test suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check --quiet .
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest "$@"
