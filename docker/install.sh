#!/usr/bin/env bash
# The one place that installs the Python stack: `make setup` and the Dockerfile both run it, so they cannot drift.
# usage: docker/install.sh VENV_DIR [TORCH_SPEC] [all|deps|project]
#   deps: the venv, torch, requirements.txt and DeepSpeed; project: this checkout, editable, into an existing venv;
#   all (the default, `make setup`): both. The Dockerfile runs them as two steps so that a source change reuses the
#   cached dependency layer.
set -euo pipefail
venv=${1:?usage: install.sh VENV_DIR [TORCH_SPEC] [all|deps|project]}
torch_spec=${2:-torch==2.13.0}
what=${3:-all}
here=$(cd "$(dirname "$0")/.." && pwd)
case $what in all | deps | project) ;; *) echo "install.sh: unknown step '$what' (all, deps or project)" >&2; exit 2 ;; esac

pip="$venv/bin/python -m pip --disable-pip-version-check -q"
if [ "$what" != project ]; then
    python3 -m venv "$venv"
    # Python 3.12 venvs come without setuptools; the builds below run without build isolation and need it.
    $pip install setuptools==84.2.1
    $pip install "$torch_spec"
    $pip install -r "$here/requirements.txt"
    # DeepSpeed from its source release; it must see torch. Its ops JIT-build on first use unless DS_BUILD_<OP>=1
    # compiles them into the installed package now. On a CPU machine the trainer always loads the shared-memory
    # comm op: built here, so that no job compiles it, whatever the checkout or the path to this venv (a GPU install
    # ignores the variable; the Dockerfile adds the CUDA ops). Built afresh, never from an installed copy or pip's
    # wheel cache, which could hold other ops or ops built for another accelerator.
    $pip uninstall -y deepspeed 2>/dev/null
    DS_BUILD_OPS=${DS_BUILD_OPS:-0} DS_BUILD_SHM_COMM=${DS_BUILD_SHM_COMM:-1} \
        $pip install --no-cache-dir --no-build-isolation deepspeed==0.19.8
fi
if [ "$what" != deps ]; then
    $pip install --no-deps --no-build-isolation -e "$here"
fi
