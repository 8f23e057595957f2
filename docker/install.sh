#!/usr/bin/env bash
# The one place that installs the Python stack: `make setup` and the Dockerfile both run it, so they cannot drift.
# usage: docker/install.sh VENV_DIR [TORCH_SPEC]
set -euo pipefail
venv=${1:?usage: install.sh VENV_DIR [TORCH_SPEC]}
torch_spec=${2:-torch==2.13.0}
here=$(cd "$(dirname "$0")/.." && pwd)

python3 -m venv "$venv"
pip="$venv/bin/python -m pip --disable-pip-version-check -q"
$pip install "$torch_spec"
$pip install -r "$here/requirements.txt"
# DeepSpeed from its source release without prebuilt ops (they JIT-build on first use); it must see torch.
DS_BUILD_OPS=${DS_BUILD_OPS:-0} $pip install --no-build-isolation deepspeed==0.19.8
$pip install --no-deps --no-build-isolation -e "$here"
