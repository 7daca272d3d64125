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

# /proc instead of pgrep: minimal images lack procps. One "pid ppid comm" line per process;
# comm sits in parentheses and may itself contain spaces or ")".
process_table() {
    cat /proc/[0-9]*/stat 2>/dev/null | awk '{
        close_at = 0
        for (i = length($0); i > 0; i--) if (substr($0, i, 1) == ")") { close_at = i; break }
        comm = substr($0, index($0, "(") + 1, close_at - index($0, "(") - 1)
        split(substr($0, close_at + 2), rest, " ")
        print $1, rest[2], comm
    }'
}

pids_named() {  # pids whose command name is exactly $1
    process_table | awk -v name="$1" '$3 == name { print $1 }'
}

with_descendants() {  # the given pids and every process below them
    [ $# -gt 0 ] || return 0
    process_table | awk -v roots="$*" '
        { parent[$1] = $2; pids[NR] = $1 }
        END {
            n = split(roots, queue, " ")
            for (i = 1; i <= n; i++) seen[queue[i]] = 1
            for (head = 1; head <= n; head++) {
                print queue[head]
                for (j = 1; j <= NR; j++)
                    if (parent[pids[j]] == queue[head] && !(pids[j] in seen)) {
                        seen[pids[j]] = 1; queue[++n] = pids[j]
                    }
            }
        }'
}

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

# slurmstepd (one per job step) detaches from slurmd, so a dead slurmd leaves its steps
# behind; they carry our SLURM_CONF in their environment.
our_stepds() {
    local pid
    for pid in $(pids_named slurmstepd); do
        tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ" | grep -qxF "SLURM_CONF=$CONF" && echo "$pid"
    done
    return 0
}

wait_gone() {  # wait_gone SECONDS PID... -> 0 once none is alive
    local deadline=$(( $(date +%s) + $1 )); shift
    while :; do
        local alive=0 pid
        for pid in "$@"; do
            # A zombie is gone for our purposes; its parent may be slow to reap it.
            kill -0 "$pid" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] \
                && alive=1
        done
        [ "$alive" -eq 0 ] && return 0
        [ "$(date +%s)" -ge "$deadline" ] && return 1
        sleep 0.2
    done
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
strays=$(with_descendants $(our_stepds))
if [ -n "$strays" ]; then
    log "killing leftover job steps: $(echo $strays)"
    # shellcheck disable=SC2086
    kill -KILL $strays 2>/dev/null || true
    # shellcheck disable=SC2086
    wait_gone 5 $strays || true
fi

rm -f "$PIDS" "$DIR/run/nodes"
log "stopped (state folder $DIR kept)"
