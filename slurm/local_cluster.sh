#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for the Slurm tests and for trying `make submit` locally.
#
# usage: slurm/local_cluster.sh install|up|down|status
#   install  install the Debian packages when missing (quick when present; never fails without apt or root)
#   up       start a private munged, slurmctld and slurmd; wait until the node is idle
#   down     stop the daemons that `up` started
#   status   print whether the cluster is up, with sinfo/squeue
#
# Everything lives under $STEREO_SLURM_DIR (default /tmp/stereo-slurm): config, munge key and socket, state,
# spool, logs and pid files, so it never touches a system Slurm. Clients need `SLURM_CONF=$STEREO_SLURM_DIR/slurm.conf`
# (printed by `up`; the tests set it themselves).
set -euo pipefail

STATE=${STEREO_SLURM_DIR:-/tmp/stereo-slurm}
CONF=$STATE/slurm.conf
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

write_conf() {
    local node_line user
    user=$(id -un)
    # `slurmd -C` describes this machine (CPUs, sockets, cores, memory); keep only the hardware fields.
    node_line=$("$(sbin slurmd)" -C | head -1 | sed -e 's/^NodeName=[^ ]*//' -e 's/UpTime=.*//')
    # Job ids restart at 1 on a fresh state folder; starting from the clock keeps them unique across cluster starts,
    # so a stale submitit result file from an earlier cluster can never match a new job.
    local first_job_id=$(( $(date +%s) % 50000000 + 1000 ))
    cat >"$CONF" <<EOF
# Written by slurm/local_cluster.sh: a one-node test cluster; every path is private to $STATE.
ClusterName=stereolocal
SlurmctldHost=localhost
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job waits cred_expire+1 s before it may start again (default 120).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
SlurmctldPort=${STEREO_SLURMCTLD_PORT:-6917}
SlurmdPort=${STEREO_SLURMD_PORT:-6918}
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
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
SchedulerParameters=bf_interval=1
JobRequeue=1
FirstJobId=$first_job_id
MinJobAge=300
KillWait=5
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
NodeName=localhost NodeAddr=127.0.0.1 $node_line State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

cmd_up() {
    local missing
    missing=$(missing_binaries)
    [ -z "$missing" ] || { log "missing: $missing (run: bash slurm/local_cluster.sh install)"; exit 1; }
    if pid_alive "$STATE/slurmctld.pid" && pid_alive "$STATE/slurmd.pid"; then
        log "already up ($CONF)"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    cmd_down >/dev/null 2>&1 || true
    rm -rf "$STATE/ctld" "$STATE/spool"
    mkdir -p "$STATE"/{munge,ctld,spool,log}
    chmod 0700 "$STATE/munge"
    if [ ! -s "$STATE/munge/munge.key" ]; then
        head -c 1024 /dev/urandom >"$STATE/munge/munge.key"
        chmod 0400 "$STATE/munge/munge.key"
    fi
    "$(sbin munged)" --force --socket "$MUNGE_SOCKET" --key-file "$STATE/munge/munge.key" \
        --pid-file "$STATE/munge/munged.pid" --log-file "$STATE/log/munged.log" --seed-file "$STATE/munge/munge.seed"
    write_conf
    export SLURM_CONF=$CONF
    "$(sbin slurmctld)" -f "$CONF" -i
    "$(sbin slurmd)" -f "$CONF" -N localhost
    local i state
    for i in $(seq 1 60); do
        state=$(sinfo -h -N -o '%T' 2>/dev/null | head -1 || true)
        if [ "$state" = idle ]; then
            log "up: node idle ($CONF)"
            echo "export SLURM_CONF=$CONF"
            return 0
        fi
        sleep 0.5
    done
    log "the node did not become idle within 30 s (state: ${state:-none}); logs in $STATE/log"
    tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
    exit 1
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
    stop_pidfile "$STATE/slurmd.pid"
    stop_pidfile "$STATE/slurmctld.pid"
    stop_pidfile "$STATE/munge/munged.pid"
    log "down"
}

cmd_status() {
    if pid_alive "$STATE/slurmctld.pid" && pid_alive "$STATE/slurmd.pid"; then
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
