#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, over a bundle made by
# scripts/gpu_bundle.sh: decode of the 8B shape with the sparse layers' host
# tier in kv-host's arenas (a kv-host daemon started here, the bench attached
# over its UNIX socket) and in-process, in the same run (docs/results.md,
# "kv-host"); then stops the daemon.
# Usage: scripts/gpu_kvhost_run.sh [plans] [contexts]
set -uo pipefail
cd "$(dirname "$0")/.."
plans="${1:-hybrid:2:896:64:64:32:gpu:late:i8}"
contexts="${2:-32768,131072}"
out="${OUT:-$PWD/results}"
mkdir -p "$out"
export LD_LIBRARY_PATH="$PWD/.bundle/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
bin=.bundle/bin
dir="$(mktemp -d /tmp/tkv-kvhost.XXXXXX)"
"$bin/kv-host" --listen "unix:$dir/kv.sock" --budget 0.8 --warm-bytes 0.8 > "$out/kv_host.log" 2>&1 &
kvh=$!
trap 'kill -TERM $kvh 2>/dev/null; wait $kvh 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 1 100); do [ -S "$dir/kv.sock.fd" ] && break; sleep 0.1; done
rc=0
for store in in-process "unix://$dir/kv.sock"; do
  name=$([ "$store" = in-process ] && echo in_process || echo kv_host)
  "$bin/tkv_llama_bench" --plans "$plans" --contexts "$contexts" --prefill "" --decode-tokens repeat \
    --kv-host "$store" --out "$out/decode_$name.json" 2>&1 | tee "$out/decode_$name.log" || rc=1
done
"$bin/tailorkv-cli" kv-host stats --server "unix://$dir/kv.sock" | tee "$out/kv_host_stats.txt"
exit $rc
