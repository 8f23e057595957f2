#!/usr/bin/env bash
# The one place that installs the Python stack: `make setup` and the Dockerfile both run it, so they cannot drift.
# usage: docker/install.sh VENV_DIR [TORCH_SPEC]
set -euo pipefail
venv=${1:?usage: install.sh VENV_DIR [TORCH_SPEC]}
torch_spec=${2:-torch==2.13.0}
here=$(cd "$(dirname "$0")/.." && pwd)

python3 -m venv "$venv"
pip="$venv/bin/python -m pip --disable-pip-version-check -q"
# Python 3.12 venvs come without setuptools; the builds below run without build isolation and need it.
$pip install setuptools==84.2.1
$pip install "$torch_spec"
$pip install -r "$here/requirements.txt"
# DeepSpeed from its source release; it must see torch. Ops JIT-build on first use unless DS_BUILD_<OP>=1 prebuilds
# them (the Dockerfile prebuilds the fused ones for TORCH_CUDA_ARCH_LIST).
DS_BUILD_OPS=${DS_BUILD_OPS:-0} $pip install --no-build-isolation deepspeed==0.19.8
$pip install --no-deps --no-build-isolation -e "$here"
