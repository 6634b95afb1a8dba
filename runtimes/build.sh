#!/bin/sh
# Build (and optionally push) the runtime images the Kubernetes engine runs: one per runtimes/*/Dockerfile,
# named <registry>/runtime-<name>:<version>, e.g. headwater/runtime-python3:0.1.0.
#   runtimes/build.sh [VERSION] [REGISTRY]      VERSION defaults to Headwater's, REGISTRY to "headwater"
#   PUSH=1 runtimes/build.sh 0.1.0 registry.example.org/headwater
# Every image is built from runtimes/ (the go and php images reuse python3's server).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
version=${1:-$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$here/../pyproject.toml")}
registry=${2:-headwater}
docker=${DOCKER:-docker}
for dockerfile in "$here"/*/Dockerfile; do
    name=$(basename "$(dirname "$dockerfile")")
    image="$registry/runtime-$name:$version"
    echo "building $image"
    "$docker" build -f "$dockerfile" -t "$image" "$here"
    if [ "${PUSH:-0}" = 1 ]; then
        "$docker" push "$image"
    fi
done
