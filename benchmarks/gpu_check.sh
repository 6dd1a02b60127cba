#!/usr/bin/env bash
# Issue 8's GPU check, in under 8 minutes, from the repository root on a GPU machine:
#  1. generator and fine-tuning throughput of ResNet-18 and EfficientNet-Lite0 at 224 px, peak
#     GPU memory, share of the GPU's bf16 peak, projected wall time of whole runs (gpu_check.py);
#  2. decoding throughput of a calibration folder, 1 thread against all (load_cost.py);
#  3. the real CLI end to end on the GPU: `fddaq quantize --device cuda` of the Fashion-MNIST
#     example (pinned images, asynchronous copies, bf16 teacher and generator), then `verify`.
# `benchmarks/gpu_check.sh --device cpu --models resnet18 --steps 1` is a smoke check (5 min on
# 2 cores). `--device` (default cuda) applies to every part; other arguments go to
# gpu_check.py. Results land in $OUT (default: the current folder). Each part has its own time
# limit, and a part that fails does not stop the others; the exit status is the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
FDDAQ="${FDDAQ:-.venv/bin/fddaq}"
OUT="${OUT:-.}"
DEVICE=cuda
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --device=*) DEVICE="${1#--device=}"; shift ;;
        *) args+=("$1"); shift ;;
    esac
done
status=0
part() { local limit=$1; shift; echo "== $*"; timeout "$limit" "$@" || { rc=$?; echo "!! exit $rc: $*"; [ $status -ne 0 ] || status=$rc; }; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
part 230 "$PYTHON" benchmarks/gpu_check.py --device "$DEVICE" --json "$OUT/gpu_check.json" "${args[@]}"
part 60 "$PYTHON" benchmarks/load_cost.py --repeats 3 --json "$OUT/load_cost.json"
example=examples/fashion_mnist
part 150 "$FDDAQ" quantize "$example/model.pth" --arch fddaq:fashion_resnet --calib "$example/calib" \
    --val "$example/val" --bits 4 --device "$DEVICE" --out "$OUT/e2e" --force
part 30 "$FDDAQ" verify "$OUT/e2e/model.onnx" --checkpoint "$OUT/e2e/quantized.pt" --data "$example/val"
exit $status
