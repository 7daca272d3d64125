#!/usr/bin/env bash
# Whether the dev cluster of RKAN_SLURM_DIR runs: while its daemons live and its controller
# answers, prints "running: N node(s), state in <dir>" and exits 0; while the controller answers
# but a node's slurmd is dead (node.sh kill), prints "degraded: ..." naming those nodes and exits 1;
# otherwise prints "not running: <dir>" and exits 1. With -v, then one line per node:
# "<node> <state as sinfo's %T prints it, * = not answering> <reason, if any>". Starts and stops nothing.
#   RKAN_SLURM_DIR   state folder (default /tmp/rkan-dist-slurm)
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

case "${1:-}" in
    '') VERBOSE=0 ;;
    -v|--verbose) VERBOSE=1 ;;
    *) die "unknown argument '$1' (valid: -v)" ;;
esac

node_lines() {
    [ "$VERBOSE" -eq 1 ] || return 0
    timeout 10 sinfo -h -N -o '%N %T %E' 2>/dev/null | sed 's/ none$//'
}

if cluster_up; then
    echo "running: $(cat "$NODES_FILE" 2>/dev/null || echo '?') node(s), state in $DIR"
    node_lines
    exit 0
fi
if alive "$(pid_of slurmctld)" && timeout 10 sinfo -h >/dev/null 2>&1; then
    dead=""
    for node in $(seq 1 "$(cat "$NODES_FILE" 2>/dev/null || echo 0)"); do
        alive "$(pid_of "slurmd-n$node")" || dead="$dead n$node"
    done
    if [ -n "$dead" ]; then
        echo "degraded: slurmd of${dead} not running (revive with $(dirname "$0")/node.sh revive NODE), state in $DIR"
        node_lines
        exit 1
    fi
fi
echo "not running: $DIR"
exit 1
