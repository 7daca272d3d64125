#!/usr/bin/env bash
# Stop the private Slurm cluster that start.sh started: cancel its jobs, stop its daemons by pid
# (TERM, then KILL after a wait) and kill any job step that outlived them. Idempotent: with
# nothing running it does nothing. Logs and the munge key stay in the folder for inspection.
#   RKAN_SLURM_DIR   state folder (default /tmp/rkan-dist-slurm)
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

[ -d "$DIR" ] || exit 0
MUNGE_DIR="$(munge_dir)"
exec 9>"$DIR/.lock"
flock -w 120 9 || die "another start.sh/stop.sh holds $DIR/.lock"

# A pid is ours only while its command line still names our folder (munged's: munge's folder):
# pids get reused.
is_ours() {
    [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -qF -e "$DIR/" -e "$MUNGE_DIR/"
}

# our_daemons NAME...: pids of those daemons started on our folder, from the pid file and,
# should that be lost, from the processes whose command line names our folder.
our_daemons() {
    local name pid
    {
        [ -s "$PIDS" ] && while read -r name pid; do
            for wanted in "$@"; do [ "${name%%-*}" = "$wanted" ] && echo "$pid"; done
        done <"$PIDS"
        for wanted in "$@"; do pids_named "$wanted"; done
    } | sort -u | while read -r pid; do is_ours "$pid" && echo "$pid"; done
    return 0
}

# 1. Cancel every job while the controller still answers, and give them KillWait to end.
if [ -n "$(our_daemons slurmctld)" ] && timeout 5 squeue -h >/dev/null 2>&1; then
    job_ids=$(timeout 5 squeue -h -o '%i' 2>/dev/null || true)
    if [ -n "$job_ids" ]; then
        log "cancelling jobs: $(echo $job_ids)"
        # shellcheck disable=SC2086
        timeout 10 scancel $job_ids 2>/dev/null || true
        deadline=$(( $(date +%s) + 15 ))
        while [ -n "$(timeout 5 squeue -h -o '%i' 2>/dev/null || true)" ] && \
                [ "$(date +%s)" -lt "$deadline" ]; do
            sleep 0.3
        done
    fi
fi

# 2. Daemons, all at once: each takes about 2 s to wind down after SIGTERM.
stop_daemons() {
    local pids
    pids=$(our_daemons "$@")
    [ -n "$pids" ] || return 0
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    # shellcheck disable=SC2086
    if ! wait_gone 10 $pids; then
        log "daemons ignored SIGTERM, killing: $(echo $pids)"
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
        # shellcheck disable=SC2086
        wait_gone 5 $pids || true
    fi
}
stop_daemons slurmd slurmctld munged

# 3. Steps that outlived their slurmd (jobs that scancel could not reach), with their tasks.
strays=$(with_descendants $(stepds_of '*'))
if [ -n "$strays" ]; then
    log "killing leftover job steps: $(echo $strays)"
    # shellcheck disable=SC2086
    kill -KILL $strays 2>/dev/null || true
    # shellcheck disable=SC2086
    wait_gone 5 $strays || true
fi

rm -f "$PIDS" "$DIR/run/nodes"
log "stopped (state folder $DIR kept)"
