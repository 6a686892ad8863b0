#!/usr/bin/env bash
# One-GPU training throughput of SiT-XL/2 in bf16: images/s and MFU, eager vs torch.compile,
# ERW warmup step vs full step, as one summary table (bench/gpu_check.py does the work).
#
#   bash bench/gpu_check.sh                            # prints the table
#   bash bench/gpu_check.sh --results docs/results.md  # and writes it into the results page
#   bash bench/gpu_check.sh --batch 16 --modes eager   # any bench/gpu_check.py option
#
# Refuses with exit status 2 when no CUDA GPU is visible. Measurements stop starting at 7
# minutes (--time-limit) and the whole check is killed at 8.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3

status=0
timeout --signal=TERM 480 "$PYTHON" -m bench.gpu_check "$@" || status=$?
if [ "$status" -eq 124 ]; then
  echo "gpu_check: stopped after 8 minutes; rerun with fewer --steps or --modes eager" >&2
fi
exit "$status"
