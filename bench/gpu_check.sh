#!/usr/bin/env bash
# The GPU check in one prepared run: <= 8 minutes on one CUDA GPU or one 8-GPU node. Prints one
# JSON line per part as it finishes (KAN conv per implementation, rkan_resnet50 / resnet50 eager
# and compiled training img/s, DDP over NCCL vs DeepSpeed ZeRO-1, FFCV JPEG decode to the GPU), writes them
# all to bench/results/gpu_check.json. Exit 0 when every part passed or was skipped (no CUDA:
# every part says "skipped: no CUDA"), 1 when a part failed, 124 when the 480 s limit cut it short.
#   bench/gpu_check.sh [--parts kan_conv,throughput,distributed,ffcv_decode,throughput_compiled] [--device cpu]
# The interpreter is the project's venv, found as the make targets find it: $VENV (default .venv),
# else the venv .ci/run caches under $RKAN_DIST_CACHE (default /var/cache/rkan-dist) for these
# dependency files; PYTHON=... overrides both. No venv: one line saying to run `make setup`, exit 2.
# Tests: RKAN_GPU_CHECK_FAIL=PART fails a part on purpose, RKAN_GPU_CHECK_HANG=distributed hangs a
# worker of that part, RKAN_GPU_CHECK_TIMEOUT_S shortens its time limit.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    deps_hash=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)  # as scripts/setup.sh and .ci/run
    cached="${RKAN_DIST_CACHE:-/var/cache/rkan-dist}/venv-$deps_hash"
    for venv in "${VENV:-.venv}" "$cached"; do
        if [ -x "$venv/bin/python" ]; then
            PYTHON="$venv/bin/python"
            break
        fi
    done
    if [ -z "${PYTHON:-}" ]; then
        echo "gpu_check: error: no venv at ${VENV:-.venv} or $cached: run \`make setup\` first" \
            "(or set VENV=path, or PYTHON=an interpreter with rkan-dist installed)" >&2
        exit 2
    fi
fi
export PYTHONUNBUFFERED=1
exec timeout --kill-after 10 480 "$PYTHON" -m bench.gpu_check "$@"
