#!/usr/bin/env bash
# A quick concurrency check of a running worker over gRPC: N clients at once
# (tailorkv-cli generate, greedy, mixed prompt lengths), then one alone;
# prints completed requests, generated tokens and aggregate tokens/s of each.
# Not the issue-14 load test (32 clients, latency percentiles): a smoke test.
# Usage: scripts/load_smoke.sh ADDR [N=8] [MAX_TOKENS=64] [CLI=.bundle/bin/tailorkv-cli]
set -uo pipefail
addr="$1"; n="${2:-8}"; max_tokens="${3:-64}"; cli="${4:-.bundle/bin/tailorkv-cli}"
dir=$(mktemp -d); trap 'rm -rf "$dir"' EXIT
prompt() {  # $1: index -> a prompt of 20..~600 words
  local words=$(( 20 + ($1 * 97) % 600 )) s="Notes:"
  for ((w = 0; w < words; ++w)); do s+=" word$(( (w * 7 + $1) % 50 ))"; done
  echo "$s Summary:"
}
run() {  # $1: clients
  local t0 t1 ok=0 tokens=0
  t0=$(date +%s.%N)
  for ((i = 0; i < $1; ++i)); do
    "$cli" generate --server "$addr" --raw --max-tokens "$max_tokens" --temperature 0 \
      --prompt "$(prompt "$i")" > "$dir/out.$i" 2>&1 &
  done
  wait
  t1=$(date +%s.%N)
  for ((i = 0; i < $1; ++i)); do
    if grep -q "completion_tokens=" "$dir/out.$i"; then
      ok=$((ok + 1))
      tokens=$((tokens + $(grep -o "completion_tokens=[0-9]*" "$dir/out.$i" | cut -d= -f2)))
    fi
  done
  awk -v c="$1" -v ok="$ok" -v tok="$tokens" -v t0="$t0" -v t1="$t1" \
    'BEGIN { printf "clients %d: %d completed, %d tokens in %.2f s, %.1f tokens/s\n", c, ok, tok, t1 - t0, tok / (t1 - t0) }'
}
run "$n"
run 1
