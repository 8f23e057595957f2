#!/usr/bin/env bash
# The image's entrypoint: `docker run IMAGE <command> [args...]` runs `python -m stereo <command> [args...]`
# (no command: the command list). `train` with NPROC_PER_NODE=N (N > 1) starts N processes through torchrun,
# one per GPU; Slurm jobs do not come through here (jobs/ launches one task per GPU itself).
set -euo pipefail
python=${STEREO_PYTHON:-python}
if [ $# -eq 0 ]; then
    set -- --help
fi
nproc=${NPROC_PER_NODE:-1}
if [ "$1" = train ] && [ "$nproc" -gt 1 ]; then
    exec "$python" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m stereo "$@"
fi
exec "$python" -m stereo "$@"
