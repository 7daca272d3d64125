#!/usr/bin/env bash
# Take one logical node of the dev cluster away, or give it back, the way real nodes fail and
# recover, for tests of what a job does when it loses a node.
#
#   slurm/dev-cluster/node.sh kill nX             nX dies: its slurmd and every process of its job
#                                                 steps (slurmstepd and the tasks under it) get SIGKILL;
#                                                 the controller notices only by the missing pings
#   slurm/dev-cluster/node.sh down nX [reason]    scontrol marks nX DOWN (its jobs are killed)
#   slurm/dev-cluster/node.sh drain nX [reason]   scontrol drains nX (running jobs finish, no new ones)
#   slurm/dev-cluster/node.sh revive nX           start nX's slurmd again if it is dead, RESUME the node
#                                                 if it is down or drained, and wait until it is up
#                                                 (idle, or allocated/mixed if a waiting job took it)
#
# Logs go to stderr; an error is one line and exit 1.
#   RKAN_SLURM_DIR         state folder (default /tmp/rkan-dist-slurm)
#   RKAN_SLURM_TIMEOUT_S   how long revive waits for the node (default 30)
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd -P)"
# shellcheck source=common.sh
. "$HERE/common.sh"
TIMEOUT_S="${RKAN_SLURM_TIMEOUT_S:-30}"
USAGE="usage: node.sh kill|down|drain|revive nX [reason]"

case "${1:-}" in
    -h|--help) sed -n '2,16p' "$0" >&2; exit 0 ;;
    kill|revive) [ $# -eq 2 ] || die "$USAGE" ;;
    down|drain) [ $# -eq 2 ] || [ $# -eq 3 ] || die "$USAGE" ;;
    *) die "$USAGE" ;;
esac
ACTION="$1" NODE="$2" REASON="${3:-node.sh $1}"

[ -s "$NODES_FILE" ] && alive "$(pid_of slurmctld)" || die "no dev cluster runs in $DIR (start it with $HERE/start.sh)"
NODES="$(cat "$NODES_FILE")"
[[ "$NODE" =~ ^n[1-9]$ ]] && [ "${NODE#n}" -le "$NODES" ] \
    || die "no node '$NODE' in the cluster of $DIR: it has n1..n$NODES"

# One change at a time, and none while start.sh/stop.sh rebuild the cluster.
exec 9>"$DIR/.lock"
flock -w 120 9 || die "another start.sh/stop.sh/node.sh holds $DIR/.lock"

# The node's state as sinfo prints it: idle, allocated, mixed, completing, drained,
# down ... with "*" appended while the node does not answer pings.
node_state() {
    timeout 10 sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -1
}

# When the node's slurmd last registered with the controller (epoch seconds; 0 if never).
registered_at() {
    local when
    when=$(timeout 10 scontrol show node -o "$NODE" 2>/dev/null | tr ' ' '\n' | sed -n 's/^SlurmdStartTime=//p')
    date -d "$when" +%s 2>/dev/null || echo 0
}

# The node's live slurmd: the recorded pid while its command line still names our config and the
# node (pids get reused), else any slurmd started that way.
node_slurmd() {
    local pid
    for pid in $(pid_of "slurmd-$NODE") $(pids_named slurmd); do
        alive "$pid" && tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF -e "-f $CONF -N $NODE " && { echo "$pid"; return 0; }
    done
    return 0
}

# Every process that lives on the node besides slurmd: its slurmstepds with everything under them,
# and tasks that left that tree (a daemonised child), found by the node name Slurm gives each task.
node_processes() {
    local pid tasks=()
    for pid in $(grep -lzxF -e "SLURMD_NODENAME=$NODE" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3); do
        has_env "$pid" "SLURM_CONF=$CONF" && tasks+=("$pid")
    done
    with_descendants $(stepds_of "$NODE") "${tasks[@]}" | sort -un
}

kill_node() {
    local slurmd victims more
    slurmd="$(node_slurmd)"
    [ -n "$slurmd" ] || die "$NODE's slurmd is not running (killed already? revive it with $HERE/node.sh revive $NODE)"
    # Freeze first, then kill: a step daemon that outlived its tasks by a moment would report
    # their exit to srun, which a dead node never does. A second look catches processes forked
    # while the first list was built.
    victims="$slurmd $(node_processes)"
    # shellcheck disable=SC2086
    kill -STOP $victims 2>/dev/null || true
    more="$(node_processes)"
    # shellcheck disable=SC2086
    kill -STOP $more 2>/dev/null || true
    victims="$(echo $victims $more | tr ' ' '\n' | sort -un)"
    # shellcheck disable=SC2086
    kill -KILL $victims 2>/dev/null || true
    # shellcheck disable=SC2086
    wait_gone 10 $victims || die "processes of $NODE survived SIGKILL: $(echo $victims)"
    log "killed $NODE: slurmd $slurmd and $(( $(echo "$victims" | wc -l) - 1 )) process(es) of its job steps"
}

set_state() {  # set_state STATE: scontrol update with the reason Slurm requires for DOWN/DRAIN
    local out
    out=$(timeout 15 scontrol update NodeName="$NODE" State="$1" Reason="$REASON" 2>&1) \
        || die "scontrol update NodeName=$NODE State=$1 failed: $(echo $out)"
    log "$NODE: State=$1 Reason=$REASON"
}

revive_node() {
    local state out started=0 deadline=$(( $(date +%s) + TIMEOUT_S ))
    if [ -z "$(node_slurmd)" ]; then
        started=$(date +%s)
        start_slurmd "$NODE"
        log "$NODE: slurmd started (pid $(pid_of "slurmd-$NODE"))"
    fi
    while :; do
        state="$(node_state)"
        # Until the new slurmd registers, the controller still shows the old state (mixed, say).
        [ "$(registered_at)" -ge "$started" ] || state="unregistered"
        case "$state" in
            *'*'|''|unregistered) ;;          # not answering yet
            down*|drain*|fail*|inval*)        # marked bad by scontrol or by missed pings
                # ReturnToService=2 may return the node by itself between our look and the
                # update: that refusal ("Invalid node state transition") is no error.
                out=$(timeout 15 scontrol update NodeName="$NODE" State=RESUME 2>&1) \
                    || log "$NODE: scontrol update State=RESUME: $(echo $out)" ;;
            idle|allocated|mixed)
                log "$NODE: $state"
                return 0 ;;
        esac
        if ! alive "$(pid_of "slurmd-$NODE")"; then
            die "$NODE's slurmd exited; see $DIR/log/slurmd-$NODE.log"
        fi
        [ "$(date +%s)" -lt "$deadline" ] || die "$NODE not up after ${TIMEOUT_S}s (state '${state:-unknown}'); see $DIR/log/slurmd-$NODE.log"
        sleep 0.2
    done
}

case "$ACTION" in
    kill) kill_node ;;
    down) set_state DOWN ;;
    drain) set_state DRAIN ;;
    revive) revive_node ;;
esac
