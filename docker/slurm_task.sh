#!/usr/bin/env bash
# One Slurm task in a Docker container (`slurm.container_runtime: docker`); srun runs it once per task, on the node:
#   docker/slurm_task.sh IMAGE WORKDIR MOUNT... -- ARGS...   runs `python ARGS...` in IMAGE
# Each MOUNT is a host path mounted at the same path. The container runs as the job's user, on the host's network
# and IPC namespace (rendezvous, NCCL, shared memory) with the job's GPUs, and gets the job's SLURM_*, SUBMITIT_*,
# WANDB_* and NCCL_* variables. Slurm signals only this process: `docker run` passes each one to the container's
# init, which passes it to the whole process group there (the job and the trainer), as Slurm would. A container
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
exec docker run --name "$name" "${run[@]}" "$image" python "$@"
