# Sourced by start.sh, stop.sh and status.sh: where a dev cluster keeps its files, which ports it
# takes, and how to tell whether it runs.
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

# Every daemon in the pid file is alive.
pids_alive() {
    [ -s "$PIDS" ] || return 1
    local name pid
    while read -r name pid; do
        kill -0 "$pid" 2>/dev/null || return 1
    done <"$PIDS"
}

# The cluster in $DIR runs: its daemons live and its controller answers.
cluster_up() {
    pids_alive && timeout 10 sinfo -h >/dev/null 2>&1
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
