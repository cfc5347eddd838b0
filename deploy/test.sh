#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: installs what is
# missing, fetches the test model, builds (CPU; CUDA parts too when nvcc is
# present, for one architecture) and runs every test with ctest.
# Usage: deploy/test.sh [extra ctest args]     Env: BUILD_DIR (default build)
set -euo pipefail
cd "$(dirname "$0")/.."
build="${BUILD_DIR:-build}"
jobs="${JOBS:-$(nproc)}"
./deploy/install-deps.sh
./scripts/fetch_model.sh >/dev/null
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build" -j "$jobs"
# The GPU label only runs where a GPU exists; those tests skip (not pass) here.
ctest --test-dir "$build" --output-on-failure -j "$jobs" --timeout 900 "$@"
