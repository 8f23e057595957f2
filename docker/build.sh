#!/usr/bin/env bash
# Builds the image. usage: docker/build.sh cuda|cpu [IMAGE]
#   cuda (`make docker-build`, IMAGE default foundation-stereo:latest): the Dockerfile's defaults, CUDA base images
#     and the CUDA build of torch from the package index.
#   cpu (`make docker-test`, IMAGE default foundation-stereo:cpu): the same Dockerfile on Debian bookworm (pulled,
#     or made with debootstrap where the registry cannot be reached), the CPU torch wheel pip finds for
#     TORCH_CPU_SPEC (your pip configuration decides where: a local wheel directory, or an index such as
#     PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu), and DeepSpeed's CPU ops.
# The host's CA bundle (PIP_CERT, else SSL_CERT_FILE, when set) reaches pip inside the build as a BuildKit secret,
# never as a layer. Starts dockerd (niced) when none answers and this is root; the log is /tmp/stereo-dockerd.log.
set -euo pipefail
cd "$(dirname "$0")/.."
variant=${1:?usage: docker/build.sh cuda|cpu [IMAGE]}
PY=${PY:-.venv/bin/python}
DEBIAN_BASE=${DEBIAN_BASE:-stereo-debian:bookworm}  # the CPU variant's base for both stages
TORCH_CPU_SPEC=${TORCH_CPU_SPEC:-torch==2.13.0+cpu}
CPU_PYTHON=3.11  # bookworm's python3: the torch wheel must match it

log() { echo "[docker/build.sh] $*" >&2; }

# A client that builds with BuildKit (secrets, bind mounts): the buildx plugin, or an engine-bundled client older
# than 23 (later ones need buildx). DOCKER=... chooses one.
pick_docker() {
    local candidate
    for candidate in ${DOCKER:-$(type -ap docker)}; do
        if "$candidate" buildx version >/dev/null 2>&1; then
            echo "$candidate"; return
        fi
        local major
        major=$("$candidate" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1) || true
        if [ -n "$major" ] && [ "$major" -lt 23 ]; then
            echo "$candidate"; return
        fi
    done
    log "no docker client that can build with BuildKit: install the buildx plugin (or set DOCKER=/path/to/docker)"
    exit 1
}

ensure_daemon() {
    "$docker" info >/dev/null 2>&1 && return
    if [ "$(id -u)" != 0 ] || ! command -v dockerd >/dev/null; then
        log "no Docker daemon answers; start one (e.g. sudo dockerd &) and rerun"
        exit 1
    fi
    log "starting dockerd (nice 10; log /tmp/stereo-dockerd.log)"
    setsid nice -n 10 dockerd >/tmp/stereo-dockerd.log 2>&1 < /dev/null &
    for _ in $(seq 60); do
        "$docker" info >/dev/null 2>&1 && return
        sleep 1
    done
    tail -20 /tmp/stereo-dockerd.log >&2
    log "dockerd did not come up within 60 s (its log is above)"
    exit 1
}

# Debian bookworm for both stages: the registry's, else a minimal root file system from Debian's archive.
debian_base() {
    "$docker" image inspect "$DEBIAN_BASE" >/dev/null 2>&1 && return
    if "$docker" pull debian:bookworm-slim >/dev/null 2>&1; then
        "$docker" tag debian:bookworm-slim "$DEBIAN_BASE"
        return
    fi
    command -v debootstrap >/dev/null || { log "the registry is unreachable and debootstrap is missing"; exit 1; }
    log "registry unreachable: making $DEBIAN_BASE with debootstrap (about 2 minutes)"
    local root
    root=$(mktemp -d /tmp/stereo-debian.XXXXXX)
    nice debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >"$root.log" 2>&1 \
        || { tail -20 "$root.log" >&2; exit 1; }
    printf '%s\n' "deb http://deb.debian.org/debian bookworm main" \
        "deb http://deb.debian.org/debian bookworm-updates main" \
        "deb http://deb.debian.org/debian-security bookworm-security main" > "$root/etc/apt/sources.list"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | "$docker" import - "$DEBIAN_BASE" >/dev/null
    rm -rf "$root" "$root.log"
}

# The CPU torch wheel as an image (the build mounts it): named after the wheel's hash so that the cached layers
# that installed it stay valid.
torch_wheels() {
    local dir wheel name
    dir=$(mktemp -d /tmp/stereo-wheels.XXXXXX)
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$CPU_PYTHON" \
        --platform manylinux_2_28_x86_64 --dest "$dir" "$TORCH_CPU_SPEC" >&2
    wheel=$(ls "$dir"/*.whl)
    name="stereo-torch-wheels:$(sha256sum "$wheel" | cut -c1-16)"
    if ! "$docker" image inspect "$name" >/dev/null 2>&1; then
        tar -C "$dir" -c "$(basename "$wheel")" | "$docker" import - "$name" >/dev/null
    fi
    rm -rf "$dir"
    echo "$name"
}

docker=$(pick_docker)
ensure_daemon
args=(--progress=plain)
cert=${PIP_CERT:-${SSL_CERT_FILE:-}}
if [ -n "$cert" ] && [ -f "$cert" ]; then
    args+=(--secret "id=pip_cert,src=$cert")
fi
case $variant in
    cuda) image=${2:-foundation-stereo:latest} ;;
    cpu)
        image=${2:-foundation-stereo:cpu}
        debian_base
        args+=(--build-arg "BUILD_BASE=$DEBIAN_BASE" --build-arg "RUNTIME_BASE=$DEBIAN_BASE"
               --build-arg "WHEELS=$(torch_wheels)" --build-arg "TORCH_SPEC=$TORCH_CPU_SPEC"
               --build-arg DS_ACCELERATOR=cpu --build-arg DS_PREBUILD=SHM_COMM)
        ;;
    *) log "unknown variant '$variant' (cuda or cpu)"; exit 2 ;;
esac
log "building $image ($variant)"
DOCKER_BUILDKIT=1 nice "$docker" build "${args[@]}" -t "$image" .
