#!/usr/bin/env bash
# The GPU check in one prepared run: <= 8 minutes on one CUDA GPU or one 8-GPU node. Prints one
# JSON line per part as it finishes (KAN conv per implementation, rkan_resnet50 / resnet50 eager
# and compiled training img/s, DDP over NCCL vs DeepSpeed ZeRO-1, FFCV JPEG decode to the GPU), writes them
# all to bench/results/gpu_check.json. Exit 0 when every part passed or was skipped (no CUDA:
# every part says "skipped: no CUDA"), 1 when a part failed, 124 when the 480 s limit cut it short.
#   bench/gpu_check.sh [--parts kan_conv,throughput,distributed,ffcv_decode,throughput_compiled] [--device cpu]
#   PYTHON=... picks the interpreter; RKAN_GPU_CHECK_FAIL=PART fails a part on purpose (tests).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONUNBUFFERED=1
exec timeout --kill-after 10 480 "$PYTHON" -m bench.gpu_check "$@"
