#!/usr/bin/env bash
# Builds the tailorkv images on this machine's Docker engine.
#   deploy/docker/build_images.sh [--from-source] [BUILD_DIR]
# default: the base image (deploy/docker/base_image.sh), then tailorkv:cpu from
#   the programs of BUILD_DIR (default build; the CPU-only *-cpu twins are built
#   there first when the tree has CUDA), gathered by deploy/docker/collect.sh:
#   no second compilation (what CI and deploy/compose_test.sh run)
# --from-source: tailorkv:cpu from deploy/Dockerfile (compiles inside the
#   build stage; slow on few cores)
# The GPU image (tailorkv:gpu) needs NVIDIA's CUDA base images: see deploy/Dockerfile.
set -euo pipefail
cd "$(dirname "$0")/../.."
from_source=0
if [[ "${1:-}" == --from-source ]]; then from_source=1; shift; fi
build="${1:-build}"
deploy/docker/base_image.sh
start=$SECONDS
if ((from_source)); then
  docker build -q -f deploy/Dockerfile -t tailorkv:cpu . >/dev/null
else
  cmake -S . -B "$build" >/dev/null   # (re)configures: the *-cpu targets exist only in CUDA trees
  # (The list is read whole first: `ninja | grep -q` under pipefail fails
  # whenever grep exits before ninja has written everything.)
  targets="$(ninja -C "$build" -t targets all 2>/dev/null || true)"
  if grep -q '^gpu-worker-cpu:' <<<"$targets"; then
    cmake --build "$build" --target gpu-worker-cpu profiler-cpu tkv-profile-cpu >/dev/null
  fi
  cmake --build "$build" --target gpu-worker kv-host profiler tkv-profile tailorkv-cli gateway >/dev/null
  ctx="$(mktemp -d /tmp/tailorkv-image.XXXXXX)"
  trap 'rm -rf "$ctx"' EXIT
  deploy/docker/collect.sh "$build" "$ctx" cpu
  docker build -q -f deploy/docker/Dockerfile.prebuilt -t tailorkv:cpu "$ctx" >/dev/null
fi
size="$(docker image inspect -f '{{.Size}}' tailorkv:cpu | awk '{printf "%.0f MB", $1/1e6}')"
echo "[images] tailorkv:cpu built in $((SECONDS - start)) s, $size" >&2
