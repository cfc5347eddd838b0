#!/usr/bin/env bash
# Starts gpu-worker with each KV plan given, asks it over gRPC for its info,
# one greedy generation from a ~1,800-token prompt with a fact in the middle,
# and its load, then stops it with SIGTERM. Used on the GPU machine from the
# bundle (scripts/gpu_bundle.sh); docs/results.md quotes its output.
#   scripts/worker_plan_e2e.sh BIN_DIR MODEL PLAN [PLAN...]
set -u
bin="$1"; model="$2"; shift 2
addr=127.0.0.1:50151
prompt=$(python3 -c "
s=' '.join('The river passes the old mill, number %d, where the miller keeps a ledger of every sack of grain.'%i for i in range(40))
s+=' The secret word is heliotrope. Remember it. '
s+=' '.join('The road climbs past farm %d, where the farmer counts the sheep at dusk.'%i for i in range(40))
print(s+' What is the secret word? The secret word is')")
for plan in "$@"; do
  "$bin/gpu-worker" --model "$model" --listen "$addr" --backend cuda --kv-plan "$plan" --log-level warn &
  worker=$!
  "$bin/tailorkv-cli" health --server "$addr" --wait-seconds 90 > /dev/null || { kill $worker; exit 1; }
  "$bin/tailorkv-cli" info --server "$addr" | grep -E "kv plan|kv per|total|sparse|quant|backend"
  "$bin/tailorkv-cli" generate --server "$addr" --prompt "$prompt" --max-tokens 24 --temperature 0
  "$bin/tailorkv-cli" load --server "$addr" | head -4
  kill -TERM $worker; wait $worker; echo "worker exit=$?"
done
