#!/usr/bin/env bash
# The image's entrypoint: `docker run IMAGE <command> [args...]` runs `python -m stereo <command> [args...]` (no
# command: the command list); a first argument that is a program file on PATH (make, python, bash) runs as it is.
# `train` with NPROC_PER_NODE=N (N > 1) starts N processes through torchrun, one per GPU; Slurm jobs run
# `python -m submitit...` through here (jobs/ launches one task per GPU itself).
set -euo pipefail
python=${STEREO_PYTHON:-python}

# `docker run --user "$(id -u):$(id -g)"` (files in the mounted runs/ then belong to you) gives a uid the image does
# not know: no home, no user name. Caches (matplotlib, wandb, torch.compile) need both.
if [ ! -w "${HOME:-/}" ]; then
    export HOME="/tmp/home-$(id -u)"
    mkdir -p "$HOME"
fi
if [ -z "${USER:-}" ]; then
    USER=$(id -un 2>/dev/null) || USER="uid$(id -u)"  # id prints the bare number when it fails
    export USER
fi
if mountpoint -q /runs 2>/dev/null && [ ! -w /runs ]; then
    echo "stereo-entrypoint: the mounted /runs is not writable by uid $(id -u) (it belongs to uid" \
         "$(stat -c %u /runs)); create it yourself first and run as its owner:" \
         "mkdir -p runs && docker run --user \"\$(id -u):\$(id -g)\" -v \"\$PWD/runs:/runs\" ..." >&2
fi

# The configs' shards/ is /data/shards: in a fresh data volume `make train` writes the demo shards there.
if mountpoint -q /data 2>/dev/null && [ -w /data ] && [ ! -e /data/shards ]; then
    mkdir /data/shards
fi

if [ $# -eq 0 ]; then
    set -- --help
fi
if [[ $1 != -* ]] && type -P "$1" >/dev/null; then  # a program file, not a shell builtin (eval, export)
    exec "$@"
fi
nproc=${NPROC_PER_NODE:-1}
if [ "$1" = train ] && [ "$nproc" -gt 1 ]; then
    exec "$python" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m stereo "$@"
fi
exec "$python" -m stereo "$@"
