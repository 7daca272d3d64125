#!/usr/bin/env bash
# Train on one machine with N processes under torchrun (one per GPU, or CPU processes with gloo).
#   launch/local.sh NPROC CONFIG [section.key=value ...]
# Same as `rkan-dist train --nproc NPROC --config CONFIG ...`, for people who prefer torchrun's flags
# (set TORCHRUN_ARGS for extra ones, e.g. "--nnodes 2 --node-rank 0 --rdzv-endpoint host:29500").
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 NPROC CONFIG [section.key=value ...]" >&2
    exit 2
fi
nproc=$1; config=$2; shift 2
PYTHON=${PYTHON:-python}
if [ -z "${TORCHRUN_ARGS:-}" ]; then TORCHRUN_ARGS="--standalone"; fi
# shellcheck disable=SC2086
exec "$PYTHON" -m torch.distributed.run $TORCHRUN_ARGS --nproc_per_node "$nproc" \
    -m rkan_dist.cli train --config "$config" "$@"
