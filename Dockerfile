# FoundationStereo training image: CUDA 12.8 + cuDNN on Ubuntu 24.04 (Python 3.12), a pinned CUDA build of torch,
# DeepSpeed with its fused ops prebuilt for A100/A10/L40/H100 (sm_80, 86, 89, 90). The Python stack is installed
# by docker/install.sh, the same script `make setup` runs.
#   docker build -t foundation-stereo .          (make docker-build)
#   docker run --gpus all --ipc=host -v /data:/data -v $PWD/runs:/runs foundation-stereo train configs/stereo_v1.yaml

# --- build: the devel image has nvcc for DeepSpeed's ops ------------------------------------------------------------
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04 AS build

ARG TORCH_SPEC=torch==2.13.0+cu128
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
# No `a`/`+PTX` suffixes: DeepSpeed's builder parses plain compute capabilities.
ENV TORCH_CUDA_ARCH_LIST="8.0 8.6 8.9 9.0" \
    DS_BUILD_OPS=0 \
    DS_BUILD_FUSED_ADAM=1 \
    DS_BUILD_FUSED_LAMB=1 \
    DS_BUILD_CPU_ADAM=1 \
    DS_BUILD_UTILS=1 \
    MAX_JOBS=8 \
    PIP_NO_CACHE_DIR=1 \
    DEBIAN_FRONTEND=noninteractive

# Ubuntu's archive keeps only the current patch release of each package: pinning them would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git ninja-build \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/stereo
COPY requirements.txt pyproject.toml ./
COPY docker/install.sh docker/install.sh
COPY stereo stereo
COPY jobs jobs
COPY configs configs
RUN PIP_EXTRA_INDEX_URL="${TORCH_INDEX}" bash docker/install.sh /opt/venv "${TORCH_SPEC}" \
    && /opt/venv/bin/python -c "import deepspeed.ops.adam as a; a.FusedAdam" \
    && /opt/venv/bin/ds_report

# --- runtime: cuDNN runtime only, the built venv and the source it was installed from (editable) ---------------------
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    STEREO_HOME=/opt/stereo

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libgl1 libglib2.0-0 tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1001 --shell /bin/bash stereo \
    && mkdir -p /runs /data \
    && chown 1001:1001 /runs

COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/stereo /opt/stereo
COPY docker/entrypoint.sh /usr/local/bin/stereo-entrypoint
# Configs name runs/, shards/ and pretrained/ relative to the checkout: point them at the mounted volumes.
RUN ln -s /runs /opt/stereo/runs \
    && ln -s /data/shards /opt/stereo/shards \
    && ln -s /data/pretrained /opt/stereo/pretrained

USER 1001:1001
WORKDIR /opt/stereo
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/stereo-entrypoint"]
CMD ["--help"]
