#!/usr/bin/env bash
# A Slurm cluster on this machine (two nodes by default), for the Slurm tests and for trying `make submit` locally.
#
# usage: slurm/local_cluster.sh install|up|down|status
#   install  install the Debian packages when missing (quick when present; never fails without apt or root)
#   up       start what is not running of a private munged, slurmctld and one slurmd per node, keeping the state
#            and the running jobs; wait until the nodes answer
#   down     stop the daemons that `up` started
#   status   print whether the cluster is up, with sinfo/squeue
#
# Everything lives under $STEREO_SLURM_DIR (default /tmp/stereo-slurm): config, munge key and socket, state,
# spool, logs and pid files, so it never touches a system Slurm. Clients need `SLURM_CONF=$STEREO_SLURM_DIR/slurm.conf`
# (printed by `up`; the tests set it themselves). Ports: $STEREO_SLURMCTLD_PORT (default 6917) for the controller,
# $STEREO_SLURMD_PORT (default 6918) and the ports after it for the nodes.
#
# Nodes: $STEREO_SLURM_NODES (default 2) slurmd daemons on 127.0.0.1, each with its own port, spool and log, named
# stereo-node1, stereo-node2, ... (Slurm maps `localhost` to the machine's name and refuses two nodes with one host
# name, so the names come from /etc/hosts: `up` adds them when root). STEREO_SLURM_NODES=1 runs one node named
# localhost and needs no /etc/hosts entry. Each node offers the whole machine (slurmd -C).
#
# Partitions: `local` (the default; PreemptMode=REQUEUE, GraceTime=$GRACE_TIME_S s) and `urgent` (a higher priority
# tier): a job submitted to `urgent` that needs a busy node preempts the `local` jobs there, as on a real cluster.
set -euo pipefail

STATE=${STEREO_SLURM_DIR:-/tmp/stereo-slurm}
CONF=$STATE/slurm.conf
NODES=${STEREO_SLURM_NODES:-2}
CTLD_PORT=${STEREO_SLURMCTLD_PORT:-6917}
SLURMD_PORT=${STEREO_SLURMD_PORT:-6918}
GRACE_TIME_S=30
MUNGE_SOCKET=$STATE/munge/munge.socket
PACKAGES=(slurmctld slurmd slurm-client munge)
BINARIES=(slurmctld slurmd sbatch squeue scontrol munged)

log() { echo "local_cluster: $*" >&2; }

missing_binaries() {
    local b missing=()
    for b in "${BINARIES[@]}"; do
        command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || missing+=("$b")
    done
    echo "${missing[*]}"
}

cmd_install() {
    local missing
    missing=$(missing_binaries)
    if [ -z "$missing" ]; then
        log "Slurm and munge already installed"
    elif [ "$(id -u)" != 0 ]; then
        log "missing: $missing; not root, so not installing (as root: apt-get install ${PACKAGES[*]})"
    elif ! command -v apt-get >/dev/null 2>&1; then
        log "missing: $missing; no apt-get here, install Slurm ($(printf '%s ' "${PACKAGES[@]}")) another way"
    else
        log "installing ${PACKAGES[*]} (missing: $missing)"
        # A failed install must not fail `make setup`: only the Slurm tests need these packages.
        export DEBIAN_FRONTEND=noninteractive
        if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"; } >&2; then
            log "apt-get failed; the Slurm tests will not run until ${PACKAGES[*]} are installed"
        fi
    fi
    missing=$(missing_binaries)
    if [ -z "$missing" ]; then
        log "ready: the Slurm tests (pytest -m slurm) start the cluster themselves via 'slurm/local_cluster.sh up'"
        log "by hand: make slurm-up; export SLURM_CONF=$CONF; make submit CONFIG=tiny; make slurm-down"
    else
        log "the Slurm tests need: ${BINARIES[*]} (missing: $missing) and root (the daemons run as root)"
    fi
}

sbin() { command -v "$1" 2>/dev/null || echo "/usr/sbin/$1"; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_names() {
    if [ "$NODES" = 1 ]; then echo localhost; else seq -f "stereo-node%g" 1 "$NODES"; fi
}

# The node names must resolve (to 127.0.0.1): add the missing ones to /etc/hosts once.
ensure_node_names() {
    local name missing=()
    for name in $(node_names); do
        getent hosts "$name" >/dev/null || missing+=("$name")
    done
    [ ${#missing[@]} = 0 ] && return 0
    if [ -w /etc/hosts ]; then
        echo "127.0.0.1 ${missing[*]}  # slurm/local_cluster.sh test nodes" >>/etc/hosts
        log "added ${missing[*]} (127.0.0.1) to /etc/hosts"
    else
        log "node names ${missing[*]} do not resolve and /etc/hosts is not writable here: add" \
            "'127.0.0.1 ${missing[*]}' to /etc/hosts as root, or run one node with STEREO_SLURM_NODES=1"
        exit 1
    fi
}

all_alive() {
    local name
    pid_alive "$STATE/slurmctld.pid" || return 1
    [ "$(grep -c '^NodeName=' "$CONF" 2>/dev/null)" = "$NODES" ] || return 1
    for name in $(node_names); do pid_alive "$STATE/slurmd-$name.pid" || return 1; done
}

write_conf() {
    local hardware user name port nodes
    user=$(id -un)
    # `slurmd -C` describes this machine (CPUs, sockets, cores, memory); keep only the hardware fields.
    hardware=$("$(sbin slurmd)" -C | head -1 | sed -e 's/^NodeName=[^ ]*//' -e 's/UpTime=.*//')
    nodes=$(node_names | paste -sd, -)
    # Job ids restart at 1 on a fresh state folder; starting from the clock keeps them unique across cluster starts,
    # so a stale submitit result file from an earlier cluster can never match a new job.
    local first_job_id=$(( $(date +%s) % 50000000 + 1000 ))
    cat >"$CONF" <<EOF
# Written by slurm/local_cluster.sh: a $NODES-node test cluster on 127.0.0.1; every path is private to $STATE.
ClusterName=stereolocal
SlurmctldHost=localhost
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
# cred_expire=5: a requeued job waits cred_expire+1 s before it may start again (default 120: 121 s).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=5
SlurmctldPort=$CTLD_PORT
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No systemd and no cgroup delegation here.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
# The main scheduler runs every second (default 60 s): a requeued job starts as soon as its hold ends.
SchedulerParameters=bf_interval=1,sched_interval=1
JobRequeue=1
FirstJobId=$first_job_id
MinJobAge=3600
KillWait=5
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
EOF
    port=$SLURMD_PORT
    for name in $(node_names); do
        echo "NodeName=$name NodeHostname=$name NodeAddr=127.0.0.1 Port=$port $hardware State=UNKNOWN" >>"$CONF"
        port=$((port + 1))
    done
    cat >>"$CONF" <<EOF
PartitionName=local Nodes=$nodes Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_TIME_S
PartitionName=urgent Nodes=$nodes MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
}

# Starts only what is not running and keeps the controller's state and the nodes' spools, so that running it while
# jobs run (a daemon died; the status, cancel and submit hints suggest it) loses no job: a slurmd started again
# finds its job steps, a slurmctld its queue. Only a new cluster (no config, or another node count, with every
# daemon down) starts from empty state.
cmd_up() {
    local missing name started=()
    missing=$(missing_binaries)
    [ -z "$missing" ] || { log "missing: $missing (run: bash slurm/local_cluster.sh install)"; exit 1; }
    if all_alive; then
        log "already up ($CONF)"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    ensure_node_names
    mkdir -p "$STATE"/{munge,ctld,spool,log}
    for name in $(node_names); do mkdir -p "$STATE/spool/$name"; done
    chmod 0700 "$STATE/munge"
    if [ ! -s "$STATE/munge/munge.key" ]; then
        head -c 1024 /dev/urandom >"$STATE/munge/munge.key"
        chmod 0400 "$STATE/munge/munge.key"
    fi
    if ! pid_alive "$STATE/munge/munged.pid"; then
        "$(sbin munged)" --force --socket "$MUNGE_SOCKET" --key-file "$STATE/munge/munge.key" \
            --pid-file "$STATE/munge/munged.pid" --log-file "$STATE/log/munged.log" --seed-file "$STATE/munge/munge.seed"
        started+=(munged)
    fi
    if [ "$(grep -c '^NodeName=' "$CONF" 2>/dev/null)" != "$NODES" ]; then
        if pid_alive "$STATE/slurmctld.pid" || any_slurmd_alive; then
            log "running with another node count than STEREO_SLURM_NODES=$NODES; its jobs would be lost:" \
                "run 'make slurm-down' first (it cancels them)"
            exit 1
        fi
        rm -rf "$STATE/ctld" "$STATE/spool"  # another cluster's state
        mkdir -p "$STATE/ctld"
        for name in $(node_names); do mkdir -p "$STATE/spool/$name"; done
        write_conf
        log "new cluster: $NODES node(s), empty state"
    fi
    export SLURM_CONF=$CONF
    if ! pid_alive "$STATE/slurmctld.pid"; then
        "$(sbin slurmctld)" -f "$CONF" -i  # recovers the queue from $STATE/ctld
        started+=(slurmctld)
    fi
    for name in $(node_names); do
        if ! pid_alive "$STATE/slurmd-$name.pid"; then
            "$(sbin slurmd)" -f "$CONF" -N "$name"
            started+=("slurmd($name)")
        fi
    done
    log "started ${started[*]:-nothing}; kept what was running and the state in $STATE"
    local i states ready
    for i in $(seq 1 120); do
        states=$(sinfo -h -N -p local -o '%T' 2>/dev/null | sort | uniq -c | xargs || true)
        ready=$(sinfo -h -N -p local -o '%T' 2>/dev/null | grep -cxE 'idle|allocated|mixed|completing' || true)
        if [ "$ready" = "$NODES" ]; then
            log "up: $NODES node(s) ($states): $(node_names | xargs) ($CONF)"
            echo "export SLURM_CONF=$CONF"
            return 0
        fi
        sleep 0.5
    done
    log "the nodes did not come up within 60 s (states: ${states:-none}); logs in $STATE/log"
    tail -n 20 "$STATE/log/"slurm*.log >&2 || true
    exit 1
}

any_slurmd_alive() {
    local pidfile
    for pidfile in "$STATE"/slurmd-*.pid; do pid_alive "$pidfile" && return 0; done
    return 1
}

stop_pidfile() {
    local pidfile=$1 pid i
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    rm -f "$pidfile"
}

cmd_down() {
    # Jobs still running belong to this cluster only: cancel them so no job step outlives the daemons.
    if pid_alive "$STATE/slurmctld.pid"; then
        SLURM_CONF=$CONF scancel --full --quiet --user "$(id -un)" 2>/dev/null || true
    fi
    local pidfile
    for pidfile in "$STATE"/slurmd*.pid; do stop_pidfile "$pidfile"; done
    stop_pidfile "$STATE/slurmctld.pid"
    stop_pidfile "$STATE/munge/munged.pid"
    log "down"
}

cmd_status() {
    if all_alive; then
        echo "up: SLURM_CONF=$CONF"

        SLURM_CONF=$CONF sinfo
        SLURM_CONF=$CONF squeue
    else
        echo "down"
        return 3
    fi
}

case "${1:-}" in
    install) cmd_install ;;
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 install|up|down|status" >&2; exit 2 ;;
esac
