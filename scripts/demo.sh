#!/usr/bin/env bash
# Sets up .venv and runs the main job: the synthetic benchmark, LADS and the dense baseline
# trained with the tiny preset, evaluation, predictions, subnet pictures, a report.
# Extra arguments go to `lads demo` (e.g. --set train.max_minutes=3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 .venv/bin/lads demo "$@"
