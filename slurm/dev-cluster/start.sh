#!/usr/bin/env bash
# Start a private Slurm cluster on this machine for the tests: one slurmctld, one slurmd per
# logical node (n1..nN, all on 127.0.0.1) and a munged of our own, all state under one folder.
#
#   slurm/dev-cluster/start.sh [--nodes 1|2|3|4]  (default 2)
#   eval "$(slurm/dev-cluster/start.sh)"          # clients then find the cluster via SLURM_CONF
#
# Idempotent: while a cluster with the same node count runs, it only prints the export line
# again; a different --nodes (or a half-dead cluster) is stopped and started afresh. The last
# line of stdout is `export SLURM_CONF=<dir>/etc/slurm.conf`; everything else goes to stderr.
# Ports held by another program (a dev cluster of another folder included) stop it with one line
# naming the holder, before anything starts.
#   RKAN_SLURM_DIR         state folder (default /tmp/rkan-dist-slurm); if user munge cannot enter
#                          it (a 0700 parent), munge's key and socket go to /tmp/rkan-dist-munge-<hash>
#   RKAN_SLURM_PORT        slurmctld's port (default 16817); node nX's slurmd takes the port + X
#   RKAN_SLURM_TIMEOUT_S   how long to wait for every node to be idle (default 30)
#   RKAN_SLURM_SLURMD_TIMEOUT_S  Slurm's SlurmdTimeout: how long a silent node (node.sh kill) takes
#                          to be set DOWN (default 60; see slurm.conf.in)
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd -P)"
# shellcheck source=common.sh
. "$HERE/common.sh"
TIMEOUT_S="${RKAN_SLURM_TIMEOUT_S:-30}"
SLURMD_TIMEOUT_S="${RKAN_SLURM_SLURMD_TIMEOUT_S:-60}"
NODES=2

while [ $# -gt 0 ]; do
    case "$1" in
        --nodes) NODES="${2:-}"; shift 2 || die "--nodes needs a value (1 to $MAX_NODES)" ;;
        --nodes=*) NODES="${1#--nodes=}"; shift ;;
        -h|--help) sed -n '2,19p' "$0" >&2; exit 0 ;;
        *) die "unknown argument '$1' (valid: --nodes 1 to $MAX_NODES)" ;;
    esac
done
case "$NODES" in [1-9]) [ "$NODES" -le "$MAX_NODES" ] ;; *) false ;; esac \
    || die "--nodes must be 1 to $MAX_NODES, got '$NODES'"

case "$PORT" in
    [1-9][0-9][0-9][0-9]|[1-6][0-9][0-9][0-9][0-9]) [ "$PORT" -le 65533 ] ;;
    *) false ;;
esac || die "RKAN_SLURM_PORT must be a TCP port in 1000-65533, got '$PORT'"
[[ "$SLURMD_TIMEOUT_S" =~ ^[1-9][0-9]*$ ]] && [ "$SLURMD_TIMEOUT_S" -ge 6 ] \
    || die "RKAN_SLURM_SLURMD_TIMEOUT_S must be a whole number of seconds >= 6, got '$SLURMD_TIMEOUT_S'"

for tool in slurmctld slurmd munged sinfo scontrol; do
    command -v "$tool" >/dev/null || die "'$tool' not found; install the Debian packages:
    apt-get install -y --no-install-recommends slurm-wlm slurm-client munge"
done
[ "$(id -u)" -eq 0 ] || die "must run as root (slurmd starts jobs as any user; munged runs as user munge)"
id munge >/dev/null 2>&1 || die "user 'munge' is missing; reinstall the munge package"

# The daemons of a cluster on ports that are taken exit at once, with "Address already in use"
# in their logs only: name whoever holds them instead. Our own cluster holding them is the
# idempotent case below.
for port in $(seq "$PORT" $((PORT + NODES))); do
    read -r holder_pid holder_name holder_dir <<<"$(port_holder "$port")"
    [ -n "$holder_pid" ] || continue
    if [ -n "$holder_dir" ]; then
        [ "$(realpath -m "$holder_dir")" = "$(realpath -m "$DIR")" ] && continue
        die "a dev cluster already runs in $holder_dir (it holds port $port): stop it first with \
\`RKAN_SLURM_DIR=$holder_dir $HERE/stop.sh\`, or use it with RKAN_SLURM_DIR=$holder_dir"
    fi
    die "port $port is taken by $holder_name (pid $holder_pid): stop it, or choose other ports with RKAN_SLURM_PORT"
done

mkdir -p "$DIR"
MUNGE_DIR="$(munge_dir)"
if [ "$MUNGE_DIR" != "$DIR/munge" ]; then
    runuser -u munge -- test -x /tmp 2>/dev/null || die "munged (user munge) can enter neither $DIR nor /tmp: \
set RKAN_SLURM_DIR to a folder under one that other users can enter, or run \`chmod o+x\` on the closed parent"
    # A folder there that munge does not own could be someone else's trap: refuse it.
    if [ -e "$MUNGE_DIR" ] && { [ -L "$MUNGE_DIR" ] || [ "$(stat -c %U "$MUNGE_DIR")" != munge ]; }; then
        die "$MUNGE_DIR (munge's folder for $DIR) exists but is not a folder owned by user munge; remove it"
    fi
    log "munged cannot enter $DIR (a parent is closed to other users): its key and socket go to $MUNGE_DIR"
fi
MUNGE_SOCKET="$MUNGE_DIR/socket/munge.socket"

# One start/stop at a time (two pytest sessions, or a user and a test run).
exec 9>"$DIR/.lock"
flock -w 120 9 || die "another start.sh/stop.sh holds $DIR/.lock"

all_nodes_idle() {
    local states
    states=$(sinfo -h -N -o '%N %T' 2>/dev/null) || return 1
    [ "$(echo "$states" | grep -c ' idle$')" -eq "$1" ] && \
        [ "$(echo "$states" | wc -l)" -eq "$1" ]
}

# Already up with the node count asked for: nothing to do but tell clients where it is.
if cluster_up && [ "$(cat "$NODES_FILE" 2>/dev/null)" = "$NODES" ]; then
    log "already running with $NODES node(s) in $DIR"
    echo "export SLURM_CONF=$CONF"
    exit 0
fi
# Whatever is left of an earlier cluster (other node count, a dead daemon) goes first.
if [ -s "$PIDS" ]; then
    log "restarting: the running cluster has $(cat "$NODES_FILE" 2>/dev/null || echo '?') node(s) or is incomplete"
fi
flock -u 9
"$HERE/stop.sh" >&2
flock -w 120 9 || die "another start.sh/stop.sh holds $DIR/.lock"

# A fresh start each time: old job state would otherwise be recovered and rerun.
rm -rf "$DIR/state" "$DIR/spool" "$DIR/run"
mkdir -p "$DIR/etc" "$DIR/log" "$DIR/run" "$DIR/state" "$DIR/spool"
: >"$PIDS"

# --- munge: a private daemon, key and socket, so the host's munge (if any) is never touched.
# munged refuses keys and folders that others can write: key 0400, socket folder 0711.
mkdir -p "$MUNGE_DIR/socket"
chown munge:munge "$MUNGE_DIR" "$MUNGE_DIR/socket"
chmod 0711 "$MUNGE_DIR" "$MUNGE_DIR/socket"
if [ ! -s "$MUNGE_DIR/munge.key" ]; then
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile="$MUNGE_DIR/munge.key"
    else
        dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
    fi
fi
chown munge:munge "$MUNGE_DIR/munge.key"
chmod 0400 "$MUNGE_DIR/munge.key"
rm -f "$MUNGE_DIR/munged.pid" "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
runuser -u munge -- munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
    --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
    --seed-file="$MUNGE_DIR/munged.seed" 9>&- \
    || die "munged failed to start; see $MUNGE_DIR/munged.log"
for _ in $(seq 50); do [ -s "$MUNGE_DIR/munged.pid" ] && break; sleep 0.1; done
echo "munged $(cat "$MUNGE_DIR/munged.pid")" >>"$PIDS"
munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET" >/dev/null \
    || die "munge round trip failed on $MUNGE_SOCKET; see $MUNGE_DIR/munged.log"

# --- slurm.conf: every logical node claims the host's CPUs and memory, as if it had them alone.
# The tests run 4 nodes x 4 one-CPU tasks (16 ranks) on a 2-core host, so a node advertises at
# least MIN_CPUS CPUs: deliberate overcommit, the ranks then share the real cores. Slurm would set
# a node with fewer CPUs than configured to INVALID_REG; SlurmdParameters=config_overrides in
# slurm.conf.in makes it trust the configured count. Above the real count the topology is one
# socket of single-thread cores, so CR_Core hands out exactly one CPU per core. Memory is not a
# consumable resource (CR_Core), so N nodes each claiming 90% of the host's memory hold nothing
# back; 90% rather than all keeps a node valid should config_overrides ever go.
MIN_CPUS=4
HOST="$(hostname -s)"
hw="$(slurmd -C 2>/dev/null | head -1)"
hw_field() { echo "$hw" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
CPUS="$(hw_field CPUs)"; CPUS="${CPUS:-$(nproc)}"
MEM_MB="$(hw_field RealMemory)"; MEM_MB=$(( ${MEM_MB:-2048} * 9 / 10 ))
TOPOLOGY=""
if [ "$CPUS" -lt "$MIN_CPUS" ]; then
    CPUS=$MIN_CPUS
    TOPOLOGY=" Boards=1 SocketsPerBoard=1 CoresPerSocket=$MIN_CPUS ThreadsPerCore=1"
else
    for key in Boards SocketsPerBoard CoresPerSocket ThreadsPerCore; do
        value="$(hw_field "$key")"
        [ -n "$value" ] && TOPOLOGY="$TOPOLOGY $key=$value"
    done
fi
NODE_RANGE="n[1-$NODES]"; PORT_RANGE="[$((PORT + 1))-$((PORT + NODES))]"
[ "$NODES" -eq 1 ] && { NODE_RANGE="n1"; PORT_RANGE="$((PORT + 1))"; }
: >"$DIR/etc/plugstack.conf"   # empty: ignore whatever SPANK plugins the host configures

sed -e "s|@DIR@|$DIR|g" -e "s|@HOST@|$HOST|g" -e "s|@PORT@|$PORT|g" -e "s|@MUNGE_SOCKET@|$MUNGE_SOCKET|g" \
    -e "s|@NODE_RANGE@|$NODE_RANGE|g" -e "s|@PORT_RANGE@|$PORT_RANGE|g" \
    -e "s|@CPUS@|$CPUS|g" -e "s|@TOPOLOGY@|$TOPOLOGY|g" -e "s|@MEM_MB@|$MEM_MB|g" \
    -e "s|@SLURMD_TIMEOUT@|$SLURMD_TIMEOUT_S|g" \
    "$HERE/slurm.conf.in" >"$CONF"
echo "$NODES" >"$NODES_FILE"

# --- daemons, each in its own session so they outlive this script and our terminal.
# RKAN_SLURM_DIR in their environment lets port_holder name this cluster's folder.
export RKAN_SLURM_DIR="$DIR"
setsid slurmctld -D -f "$CONF" </dev/null >>"$DIR/log/slurmctld.out" 2>&1 9>&- &
echo "slurmctld $!" >>"$PIDS"
for n in $(seq 1 "$NODES"); do start_slurmd "n$n"; done

deadline=$(( $(date +%s) + TIMEOUT_S ))
until all_nodes_idle "$NODES"; do
    if ! pids_alive; then
        log "a daemon exited during start-up; logs in $DIR/log:"
        tail -n 5 "$DIR"/log/*.log >&2 2>/dev/null || true
        flock -u 9; "$HERE/stop.sh" >&2 || true
        die "start failed"
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
        sinfo -N >&2 2>/dev/null || true
        flock -u 9; "$HERE/stop.sh" >&2 || true
        die "nodes not idle after ${TIMEOUT_S}s; logs in $DIR/log"
    fi
    sleep 0.2
done
log "up: $NODES node(s), state in $DIR"
echo "export SLURM_CONF=$CONF"
