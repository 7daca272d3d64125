#!/usr/bin/env bash
# Whether the dev cluster of RKAN_SLURM_DIR runs: while its daemons live and its controller
# answers, prints "running: N node(s), state in <dir>" and exits 0; otherwise prints
# "not running: <dir>" and exits 1. Starts and stops nothing.
#   RKAN_SLURM_DIR   state folder (default /tmp/rkan-dist-slurm)
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

if cluster_up; then
    echo "running: $(cat "$NODES_FILE" 2>/dev/null || echo '?') node(s), state in $DIR"
    exit 0
fi
echo "not running: $DIR"
exit 1
