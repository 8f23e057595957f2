#!/usr/bin/env bash
# `make docker-test`: builds the CPU image (docker/build.sh cpu; cached layers are reused) and runs the docker-marked
# tests against it: the demo trained, exported and run as an unknown uid, torch.compile, the non-Slurm tests, and a
# Slurm job in the image preempted and resumed on the local cluster (STEREO_SLURM_DIR and ports as for `make test`).
# Prints the build time, the image size and each step's time. IMAGE=... names the image (foundation-stereo:cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
image=${IMAGE:-foundation-stereo:cpu}
report=$(mktemp /tmp/stereo-docker-test.XXXXXX.json)
start=$(date +%s)

set +e
bash docker/build.sh cpu "$image" 2>&1 | tee /tmp/stereo-docker-build.log \
    | grep --line-buffered -E '^\[docker/build.sh\]|^#[0-9]+ \[|DeepSpeed ops prebuilt' | cut -c1-150
build_status=${PIPESTATUS[0]}
set -e
if [ "$build_status" -ne 0 ]; then
    tail -40 /tmp/stereo-docker-build.log
    exit 1
fi
built=$(date +%s)
docker=${DOCKER:-docker}
bytes=$("$docker" image inspect --format '{{.Size}}' "$image")
compiler=$("$docker" history --no-trunc --format '{{.Size}}\t{{.CreatedBy}}' "$image" | grep -m1 'g++ make openssl tini' | cut -f1)

status=0
STEREO_TEST_IMAGE=$image STEREO_DOCKER_REPORT=$report DOCKER=$docker \
    "$PY" -m pytest -m docker tests/test_docker.py -v -s -p no:cacheprovider || status=$?
end=$(date +%s)

echo
echo "make docker-test: $image"
echo "  build (docker/build.sh cpu): $((built - start)) s  (log /tmp/stereo-docker-build.log)"
echo "  image size: $((bytes / 1000000)) MB  (runtime packages incl. g++ for torch.compile: $compiler)"
"$PY" -c 'import json, sys; [print(f"  {k}: {v:.0f} s") for k, v in json.load(open(sys.argv[1])).items()]' \
    "$report" 2>/dev/null || true
echo "  tests: $((end - built)) s; total: $((end - start)) s; $([ $status -eq 0 ] && echo passed || echo FAILED)"
rm -f "$report"
exit $status
