#!/usr/bin/env bash
# One Slurm task in a Docker container (`slurm.container_runtime: docker`); srun runs it once per task, on the node:
#   docker/slurm_task.sh IMAGE WORKDIR MOUNT... -- ARGS...   runs `python ARGS...` (submitit's job) in IMAGE
# Each MOUNT is a host path mounted at the same path. The container runs as the job's user, on the host's network
# and IPC namespace (rendezvous, NCCL, shared memory) with the job's GPUs, and gets the job's SLURM_*, SUBMITIT_*,
# WANDB_* and NCCL_* variables.
# Signals: Slurm signals this script and the `docker` client; the client passes each signal to the container's init,
# which passes it to the whole process group there (the job and the trainer), as Slurm would; this script waits.
# Requeues are the batch shell's, on the host (jobs/submit.py): nothing in the container needs Slurm. A container
# Slurm could not stop (the client killed after KillWait) is removed when the task starts again.
set -euo pipefail
image=$1 workdir=$2
shift 2
run=(--rm --network=host --ipc=host --user "$(id -u):$(id -g)" --workdir "$workdir")
while [ "$1" != -- ]; do
    run+=(--volume "$1:$1")
    shift
done
shift
for name in $(compgen -e); do
    case $name in SLURM_* | SUBMITIT_* | WANDB_* | NCCL_*) run+=(--env "$name") ;; esac
done
gpus=${SLURM_STEP_GPUS:-${SLURM_JOB_GPUS:-}}
if [ -n "$gpus" ]; then
    run+=(--gpus "\"device=$gpus\"")
fi
name="stereo-${SLURM_JOB_ID}-${SLURM_PROCID}"
docker rm --force "$name" >/dev/null 2>&1 || true

trap : USR1 USR2 TERM  # handled (not ignored: the client must not inherit that), so this script outlives them
docker run --name "$name" "${run[@]}" "$image" python "$@" &
client=$!
status=0
while :; do
    wait "$client" && status=0 || status=$?
    kill -0 "$client" 2>/dev/null || break  # a signal interrupted the wait: the client still runs
done
exit "$status"
