#!/usr/bin/env bash
# The main job in containers (deploy/quickstart.sh --containers): a Docker
# engine (installed and started when missing), the base image and tailorkv:cpu
# from BUILD_DIR's programs, `docker-compose up` of docker-compose.yml (the
# profiler measures the model first: progress in the `plan` service's log),
# then one answer streamed over gRPC through the gateway and the same question
# over its OpenAI-compatible HTTP API; then `down -v` and the engine stopped
# if this script started it (the host's iptables rules and bridges as before),
# unless --keep-running.
# Usage: deploy/docker/run_cluster.sh [BUILD_DIR] [PROMPT] [--max-tokens N] [--keep-running]
set -euo pipefail
cd "$(dirname "$0")/../.."
repo="$PWD"
project=tailorkv
keep=0
max_tokens=64
positional=()
while (($#)); do
  case "$1" in
    --keep-running) keep=1 ;;
    --max-tokens) max_tokens="$2"; shift ;;
    -*) echo "run_cluster.sh: unknown option $1" >&2; exit 2 ;;
    *) positional+=("$1") ;;
  esac
  shift
done
build="$(cd "${positional[0]:-build}" && pwd)"
prompt="${positional[1]:-What is the capital of France? Answer in one sentence.}"
state="$build/docker-engine"
cli="$build/services/cli/tailorkv-cli"
source deploy/docker/lib.sh
export TAILORKV_MODELS="$repo/models"
export TAILORKV_HTTP_PORT="${TAILORKV_HTTP_PORT:-8080}" TAILORKV_GATEWAY_PORT="${TAILORKV_GATEWAY_PORT:-50090}"

finish() {
  local status=$?
  trap - EXIT
  if ((keep == 0)); then
    compose down -v --remove-orphans >/dev/null 2>&1 || true
    deploy/docker/engine.sh stop "$state" || true
  fi
  exit "$status"
}
trap finish EXIT

deploy/docker/engine.sh start "$state"
./scripts/fetch_model.sh >/dev/null
deploy/docker/build_images.sh "$build"
echo "--- docker-compose up (profiler, plan, kv-host, gpu-worker, gateway)" >&2
compose up -d 2>&1 | grep -v '^$' >&2
for s in profiler kv-host; do wait_healthy "$s" 120; done
# The profile runs before the worker starts: show its progress.
compose logs -f --no-color plan 2>/dev/null | sed -u 's/^[^|]*| //' >&2 &
follow=$!
wait_healthy gpu-worker 600
kill "$follow" 2>/dev/null || true
wait_healthy gateway 60
compose ps >&2
echo "--- gRPC (tailorkv.v1.Generation through the gateway, 127.0.0.1:$TAILORKV_GATEWAY_PORT)" >&2
"$cli" generate --server "127.0.0.1:$TAILORKV_GATEWAY_PORT" --prompt "$prompt" --max-tokens "$max_tokens"
echo
echo "--- HTTP (OpenAI-compatible, http://127.0.0.1:$TAILORKV_HTTP_PORT/v1/chat/completions)" >&2
"$cli" generate --http "http://127.0.0.1:$TAILORKV_HTTP_PORT" --prompt "$prompt" --max-tokens "$max_tokens"
echo
if ((keep)); then
  echo "--- the cluster keeps running (project $project): docker-compose -p $project down -v to stop;" \
       "deploy/docker/engine.sh stop $state stops the engine" >&2
fi
