#!/usr/bin/env bash
# The soak (issue 18, RELIABILITY.md L4): kv-host + gpu-worker (hybrid plan,
# host tier in kv-host) + gateway under mixed gRPC/HTTP load with killed and
# stalled clients for N minutes; RSS, fds and KV bytes sampled; fails when
# they grow or a request is unaccounted for. Criteria: scripts/soak.py.
#
#   scripts/soak.sh [--build DIR] [--model FILE] [--minutes N] [--out DIR] [soak.py options]
#
# Defaults: build/, models/SmolLM2-135M-Instruct.Q4_1.gguf, 30 minutes,
# out build/soak-<time>/ (samples.csv, requests.csv, summary.json).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="$root/build"
model="${TAILORKV_MODEL_DIR:-$root/models}/SmolLM2-135M-Instruct.Q4_1.gguf"
minutes=30
out=""
rest=()
while [ $# -gt 0 ]; do
  case "$1" in
    --build) build="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    --minutes) minutes="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exec python3 "$root/scripts/soak.py" --help ;;
    *) rest+=("$1"); shift ;;
  esac
done
[ -n "$out" ] || out="$build/soak-$(date +%Y%m%d-%H%M%S)"
exec python3 "$root/scripts/soak.py" --bin-dir "$build" --model "$model" --minutes "$minutes" --out "$out" "${rest[@]}"
