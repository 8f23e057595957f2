# FoundationStereo training image. By default: the CUDA build of torch 2.13.0 that `make setup` installs on a GPU node
# (CUDA 13.0, cuDNN 9.20, NCCL 2.29; docs/container.md) on Ubuntu 24.04 (Python 3.12), DeepSpeed with its CUDA ops
# prebuilt for A100/A10/L40/H100 (sm_80, 86, 89, 90). The Python stack is installed by docker/install.sh, the same
# script `make setup` runs. The build arguments make the CPU variant `make docker-test` builds and runs
# (docker/build.sh cpu): other base images, a local torch wheel, DeepSpeed's CPU ops.
#   make docker-build   (docker/build.sh cuda: docker build -t foundation-stereo:latest .)
#   mkdir -p runs && docker run --gpus all --ipc=host --user "$(id -u):$(id -g)" -v /data:/data -v "$PWD/runs:/runs" \
#       foundation-stereo:latest train configs/stereo_v1.yaml

# Both stages must share one distribution and Python: the venv moves from the first to the second.
ARG BUILD_BASE=nvidia/cuda:13.0.2-devel-ubuntu24.04
ARG RUNTIME_BASE=nvidia/cuda:13.0.2-base-ubuntu24.04
# An image holding torch wheels at its root (docker/build.sh makes one from a local wheel); empty by default.
ARG WHEELS=scratch

FROM ${WHEELS} AS wheels

# --- build: compilers (nvcc in the CUDA devel image) for DeepSpeed's ops ----------------------------------------------
FROM ${BUILD_BASE} AS build

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=
# The accelerator DeepSpeed builds its ops for: the build has no GPU, so it cannot detect one.
ARG DS_ACCELERATOR=cuda
# DS_BUILD_<op>=1 for each: ops compiled now, imported at run time (none is JIT-built in a job). Not CPU_ADAM: it
# is compiled for the build machine's CPU (-march=native) and could crash on a node with another one.
ARG DS_PREBUILD="FUSED_ADAM FUSED_LAMB UTILS"
# No `a`/`+PTX` suffixes: DeepSpeed's builder parses plain compute capabilities.
ARG TORCH_CUDA_ARCH_LIST="8.0 8.6 8.9 9.0"
ENV MAX_JOBS=8 \
    DEBIAN_FRONTEND=noninteractive

# Distribution archives keep only the current patch release of each package: pinning them would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/stereo
COPY requirements.txt pyproject.toml ./
COPY docker/install.sh docker/prebuilt_ops.py docker/
# The dependencies only (the slow layer, kept while only sources change). The host's CA bundle, when the build
# needs one to reach the package index, comes as a secret and stays out of every layer.
# hadolint ignore=SC2086
RUN --mount=type=bind,from=wheels,target=/wheels \
    --mount=type=secret,id=pip_cert \
    --mount=type=cache,target=/root/.cache/pip \
    for op in $DS_PREBUILD; do export "DS_BUILD_$op=1"; done \
    && if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && if [ -n "$TORCH_INDEX" ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX"; fi \
    && PIP_FIND_LINKS=/wheels bash docker/install.sh /opt/venv "$TORCH_SPEC" deps \
    && /opt/venv/bin/python docker/prebuilt_ops.py

# --- runtime: Python, a C++ compiler for torch.compile, the venv and the project (editable) ---------------------------
FROM ${RUNTIME_BASE}

ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    STEREO_HOME=/opt/stereo

# g++, the Python headers and openssl (a header checksum): torch.compile builds C++ at run time (Triton's launcher
# on GPU, the kernels on CPU).
# make: the Makefile's targets (`make train`) work inside the image; tini: signals reach the whole process group.
# No libGL: OpenCV is the headless build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev g++ make openssl tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1001 --shell /bin/bash stereo \
    && mkdir -p /runs /data \
    && chown 1001:1001 /runs

COPY --from=build /opt/venv /opt/venv
WORKDIR /opt/stereo
COPY requirements.txt pyproject.toml Makefile ./
COPY docker/install.sh docker/install.sh
COPY stereo stereo
COPY jobs jobs
COPY configs configs
# Configs name runs/, shards/ and pretrained/ relative to the checkout: point them at the mounted volumes; the
# Makefile's .venv is the image's venv.
RUN bash docker/install.sh /opt/venv "" project \
    && ln -s /runs /opt/stereo/runs \
    && ln -s /data/shards /opt/stereo/shards \
    && ln -s /data/pretrained /opt/stereo/pretrained \
    && ln -s /opt/venv /opt/stereo/.venv
COPY docker/entrypoint.sh /usr/local/bin/stereo-entrypoint

USER 1001:1001
ENTRYPOINT ["/usr/bin/tini", "-g", "--", "/usr/local/bin/stereo-entrypoint"]
CMD ["--help"]
