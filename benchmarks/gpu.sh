#!/usr/bin/env bash
# Paper-scale subnet benchmark on one GPU: lads-r50, 512 px, keep rates 25/50/75 %, batch 1 and
# 8, fp32, bf16 and fp16 autocast, BN folded, NHWC; forward only, extraction, and end to end per
# expression (text + gating + extraction + subnet for an unseen pattern, the same cached, and
# text + dense). No download (random BERT-base-sized text backbone). About 5 minutes on an H100.
#
#   benchmarks/gpu.sh [TABLE]     # TABLE: markdown file to write (default $OUT/bench-gpu.md)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench-gpu}"
TABLE="${1:-$OUT_DIR/bench-gpu.md}"
mkdir -p "$OUT_DIR" "$(dirname "$TABLE")"
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv || true
: > "$TABLE"
for dtype in fp32 bf16 fp16; do
  timeout 200 "$PY" -m lads.cli bench --config lads-r50 --random-text --device cuda --dtype "$dtype" \
    --batch 1 8 --keep 0.25 0.5 0.75 --fold-bn --channels-last --min-time 1 --rounds 3 --out "$OUT_DIR/$dtype"
  cat "$OUT_DIR/$dtype/bench.md" >> "$TABLE"
  echo >> "$TABLE"
done
echo "wrote $TABLE"
