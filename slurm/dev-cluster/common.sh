# Sourced by start.sh, stop.sh, status.sh and node.sh: where a dev cluster keeps its files, which
# ports it takes, how to tell whether it runs, how a node's slurmd starts and how to find processes.
#   RKAN_SLURM_DIR    state folder (default /tmp/rkan-dist-slurm)
#   RKAN_SLURM_PORT   slurmctld's TCP port (default 16817); node nX's slurmd takes the port + X

# The daemons live in sbin, which a non-login root shell may not have on PATH.
export PATH="$PATH:/usr/sbin:/sbin"
DIR="${RKAN_SLURM_DIR:-/tmp/rkan-dist-slurm}"
PORT="${RKAN_SLURM_PORT:-16817}"
CONF="$DIR/etc/slurm.conf"
PIDS="$DIR/run/pids"            # "<name> <pid>" per daemon start.sh started
NODES_FILE="$DIR/run/nodes"     # node count of the running cluster
export SLURM_CONF="$CONF"

MAX_NODES=4                     # n1..n4; node nX's slurmd listens on PORT + X

log() { echo "dev-cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

# munged runs as user munge, which must reach its folder. A state folder inside one only its
# owner can enter (a `mktemp -d` folder, a 0700 home) gets the munge files in a folder of their
# own under /tmp, named after the state folder.
munge_dir() {
    if runuser -u munge -- test -x "$DIR" 2>/dev/null; then
        echo "$DIR/munge"
    else
        echo "/tmp/rkan-dist-munge-$(printf '%s' "$DIR" | sha256sum | cut -c1-16)"
    fi
}

# alive PID: the process runs. A zombie does not: its parent may be slow to reap it, and this
# machine's init reaps orphans (a killed node's slurmd) only now and then.
alive() {
    [ -n "$1" ] && kill -0 "$1" 2>/dev/null && [ "$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

# Every daemon in the pid file is alive.
pids_alive() {
    [ -s "$PIDS" ] || return 1
    local name pid
    while read -r name pid; do
        alive "$pid" || return 1
    done <"$PIDS"
}

# The cluster in $DIR runs: its daemons live and its controller answers.
cluster_up() {
    pids_alive && timeout 10 sinfo -h >/dev/null 2>&1
}

# pid_of NAME: the pid start.sh (or node.sh revive) recorded for daemon NAME (slurmctld, slurmd-n2).
pid_of() {
    [ -s "$PIDS" ] && awk -v name="$1" '$1 == name { print $2 }' "$PIDS" | tail -1
}

# start_slurmd nX: start node nX's slurmd detached in its own session, so it outlives the caller,
# and record its pid. The one place a slurmd starts (start.sh, node.sh revive). RKAN_SLURM_DIR in
# its environment names our folder to port_holder.
start_slurmd() {
    local node="$1"
    mkdir -p "$DIR/spool/slurmd-$node" "$DIR/log"
    RKAN_SLURM_DIR="$DIR" setsid slurmd -D -f "$CONF" -N "$node" </dev/null >>"$DIR/log/slurmd-$node.out" 2>&1 9>&- &
    local pid=$!
    if [ -e "$PIDS" ]; then
        awk -v name="slurmd-$node" '$1 != name' "$PIDS" >"$PIDS.tmp" && mv "$PIDS.tmp" "$PIDS"
    fi
    echo "slurmd-$node $pid" >>"$PIDS"
}

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

# stepds_of NODE: the slurmstepds (one per job step and node) of logical node NODE of our cluster,
# or of every node for "*". They detach from slurmd (a dead slurmd leaves them running) and
# overwrite their environment with their title ("slurmstepd: [12.0]"), so neither parentage nor
# environment tells whose they are; the node's log file, which each keeps open, does.
stepds_of() {
    local pid fd
    for pid in $(pids_named slurmstepd); do
        for fd in /proc/"$pid"/fd/*; do
            # shellcheck disable=SC2053
            if [[ "$(readlink "$fd" 2>/dev/null)" == "$DIR/log/slurmd-"$1".log" ]]; then
                echo "$pid"
                break
            fi
        done
    done
    return 0
}

# has_env PID NAME=VALUE...: the process's environment holds every one of these entries.
has_env() {
    local pid="$1" entry
    shift
    for entry in "$@"; do
        grep -qzxF -e "$entry" "/proc/$pid/environ" 2>/dev/null || return 1
    done
}

wait_gone() {  # wait_gone SECONDS PID... -> 0 once none is alive
    local deadline=$(( $(date +%s) + $1 )); shift
    while :; do
        local living=0 pid
        for pid in "$@"; do
            alive "$pid" && living=1
        done
        [ "$living" -eq 0 ] && return 0
        [ "$(date +%s)" -ge "$deadline" ] && return 1
        sleep 0.2
    done
}

# port_holder PORT: "<pid> <command name> <its RKAN_SLURM_DIR or nothing>" of the process
# listening on TCP PORT, or nothing when the port is free. Read from /proc (minimal images lack
# ss and lsof): the listening socket's inode, then the process holding that inode.
port_holder() {
    local hex inode fd pid
    hex=$(printf '%04X' "$1")
    inode=$(awk -v port="$hex" '$4 == "0A" && substr($2, index($2, ":") + 1) == port { print $10; exit }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null)
    [ -n "$inode" ] || return 0
    fd=$(find /proc/[0-9]*/fd -lname "socket:\[$inode\]" -print -quit 2>/dev/null)
    pid="${fd#/proc/}"; pid="${pid%%/*}"
    if [ -z "$pid" ]; then
        echo "? unknown"   # a socket of another user's or namespace's process
        return 0
    fi
    echo "$pid $(cat "/proc/$pid/comm" 2>/dev/null || echo '?') $(tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null \
        | sed -n 's/^RKAN_SLURM_DIR=//p' | head -1)"
}
