#!/bin/sh
# `scontrol` inside a container that docker/slurm_task.sh started (mounted there, never part of the image): Slurm
# cannot be reached from the container, so submitit's `scontrol requeue JOB` is left in the task's request folder
# and docker/slurm_task.sh makes it on the host once the container has ended.
if [ "$1" = requeue ] && [ $# -eq 2 ] && [ -d "${STEREO_SCONTROL_REQUESTS:-}" ]; then
    echo "$2" >> "$STEREO_SCONTROL_REQUESTS/requeue"
    exit 0
fi
echo "scontrol $*: Slurm is out of reach in this container (only \`scontrol requeue JOB\` goes to the host)" >&2
exit 1
