#!/usr/bin/env bash
# Issue 8's GPU check: generator and fine-tuning throughput of ResNet-18 and EfficientNet-Lite0
# at 224 px, peak GPU memory, share of the GPU's bf16 peak, projected wall time of whole runs.
# Run from the repository root on a GPU machine (under 8 minutes); `--device cpu --steps 3`
# for a smoke check. Extra arguments go to benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
timeout 470 "$PYTHON" benchmarks/gpu_check.py --device "${DEVICE:-cuda}" --json "${OUT:-.}/gpu_check.json" "$@"
