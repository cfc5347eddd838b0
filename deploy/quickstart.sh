#!/usr/bin/env bash
# The main job, from a fresh Debian 12 machine: installs what is missing,
# builds the services, fetches the real model (SmolLM2-135M-Instruct, GGUF
# Q4_1, checksum-verified) and starts the cluster as local processes, then
# streams a generation to the terminal over gRPC, then asks the same question
# through the gateway's OpenAI-compatible HTTP API. The worker runs on the GPU
# when one exists (CUDA build), on the CPU otherwise.
# With --containers, the same cluster runs in Docker containers instead
# (deploy/docker/run_cluster.sh: engine, images from this build, compose up,
# the answer over gRPC and HTTP, then down; needs root for the engine).
# Usage: deploy/quickstart.sh ["your prompt"] [--raw] [--max-tokens N] [--backend auto|cpu|cuda]
#        deploy/quickstart.sh --containers ["your prompt"] [--max-tokens N] [--keep-running]
set -euo pipefail
cd "$(dirname "$0")/.."
build="${BUILD_DIR:-build}"
./deploy/install-deps.sh
model="$(./scripts/fetch_model.sh)"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build" -j "$(nproc)" --target gpu-worker kv-host profiler tkv-profile tailorkv-cli tkv_load_test gateway
if [[ "${1:-}" == --containers ]]; then
  shift
  prompt=()
  if [[ $# -gt 0 && "$1" != -* ]]; then prompt=("$1"); shift; fi
  exec ./deploy/docker/run_cluster.sh "$build" "${prompt[@]}" "$@"
fi
exec ./deploy/launch_local.sh "$model" "$build" "$@"
