#!/usr/bin/env bash
# The GPU check, as one prepared script: at most 8 minutes on one CUDA GPU, prints one JSON object
# (KAN conv fused vs reference in bf16, rkan_resnet50 vs resnet50 training img/s, the FFCV GPU
# pipeline on the digits .beton, one DDP run on 1 GPU). Without a GPU it runs tiny CPU versions.
#   bench/gpu_check.sh [--cache DIR]        PYTHON=... to pick the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONUNBUFFERED=1
exec timeout 480 "$PYTHON" -m bench.gpu_check "$@"
