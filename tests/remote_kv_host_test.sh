#!/usr/bin/env bash
# A gpu-worker whose sparse layers' host KV lives on a kv-host node in another
# network namespace (issue 17), real processes, SmolLM2 on the CPU backend:
#  1. two hosts: namespaces tkvw-<pid> (the worker) and tkvn-<pid> (the
#     node), a veth pair between them; LINK_DELAY (tc netem, each way) where
#     the kernel has netem (this CI's does not: then none), LINK_RATE (tc
#     tbf, e.g. 1gbit) when set;
#  2. kv-host on the node with --data-listen and a token; the worker with
#     --kv-host-remote; the same worker with its host tier in process (the
#     reference), in the worker's namespace;
#  3. greedy generations through both: token-identical texts (prompts longer
#     than sink + recent + Top-K, so decode steps gather from the node);
#  4. a wrong token: the worker refuses to start, naming the node;
#  5. the node partitioned mid-generation (iptables DROP in its namespace): the request ends
#     with an error within the worker's bound, no hang; killed mid-generation:
#     the same.
# Needs root (ip netns) and the test model. Usage: tests/remote_kv_host_test.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
build="$(cd "${1:-build}" && pwd)"
model="$PWD/models/SmolLM2-135M-Instruct.Q4_1.gguf"
[[ -f "$model" ]] || { echo "remote_kv_host_test: $model missing (scripts/fetch_model.sh)" >&2; exit 1; }
[[ "$(id -u)" == 0 ]] || { echo "remote_kv_host_test: needs root for ip netns" >&2; exit 1; }
command -v tc >/dev/null || { apt-get install -y -qq iproute2 >/dev/null; }
delay="${LINK_DELAY:-}"
rate="${LINK_RATE:-}"
w="tkvw-$$"; n="tkvn-$$"
sub=$(( ($$ % 200) + 20 ))
node_ip="10.$sub.77.1"; worker_ip="10.$sub.77.2"
token="t0k-$$-$RANDOM"
dir="$(mktemp -d /tmp/tkv-remote.XXXXXX)"
cli="$build/services/cli/tailorkv-cli"
plan="hybrid:2:48:8:24:32:gpu:late:i8"
pids=()
t0=$SECONDS
log() { echo "[remote_kv_host_test $((SECONDS - t0))s] $*" >&2; }
fail() { log "FAIL: $*"; for f in "$dir"/*.log; do echo "--- $f" >&2; tail -n 15 "$f" >&2; done; exit 1; }
cleanup() {
  local status=$?
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  ip netns del "$w" 2>/dev/null || true
  ip netns del "$n" 2>/dev/null || true
  rm -rf "$dir"
  exit "$status"
}
trap cleanup EXIT

ip netns add "$w"
ip netns add "$n"
ip link add "v$w" type veth peer name "v$n"
ip link set "v$w" netns "$w"
ip link set "v$n" netns "$n"
ip -n "$w" addr add "$worker_ip/24" dev "v$w"
ip -n "$n" addr add "$node_ip/24" dev "v$n"
for ns in "$w" "$n"; do ip -n "$ns" link set lo up; ip -n "$ns" link set "v$ns" up; done
shaping="none"
for ns in "$w" "$n"; do
  if [[ -n "$delay" ]]; then
    ip netns exec "$ns" tc qdisc add dev "v$ns" root netem delay "$delay" ${rate:+rate "$rate"} 2>/dev/null ||
      fail "LINK_DELAY: this kernel has no netem (tc qdisc netem)"
    shaping="netem delay $delay${rate:+ rate $rate} each way"
  elif [[ -n "$rate" ]]; then
    ip netns exec "$ns" tc qdisc add dev "v$ns" root tbf rate "$rate" burst 256kb latency 50ms
    shaping="tbf rate $rate each way"
  fi
done
log "hosts up: worker $worker_ip, node $node_ip (shaping: $shaping)"

start() {  # name ns cmd...
  local name="$1" ns="$2"; shift 2
  ip netns exec "$ns" "$@" >"$dir/$name.log" 2>&1 &
  pids+=("$!")
}
wait_serving() {  # ns addr seconds
  local deadline=$((SECONDS + $3))
  until ip netns exec "$1" "$cli" health --server "$2" --wait-seconds 1 >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "$2 not SERVING in $3 s"
  done
}

start kv-host "$n" "$build/kv-host/kv-host" --listen "unix:$dir/kvh.sock" --budget 512M \
  --data-listen "$node_ip:50600" --data-token "$token" --data-lease-ms 3000
wait_serving "$n" "unix://$dir/kvh.sock" 30
worker=(--model "$model" --backend cpu --threads 1 --kv-plan "$plan" --max-running 2)
start remote "$w" "$build/gpu-worker/server/gpu-worker" "${worker[@]}" --listen 127.0.0.1:50601 \
  --kv-host-remote "$node_ip:50600" --kv-host-token "$token"
start local "$w" "$build/gpu-worker/server/gpu-worker" "${worker[@]}" --listen 127.0.0.1:50602
wait_serving "$w" 127.0.0.1:50601 120
wait_serving "$w" 127.0.0.1:50602 120
grep -q "lives on the kv-host node $node_ip:50600" "$dir/remote.log" || fail "the remote worker does not say where its host tier is"

# 3. Token identity: prompts of ~150 to ~400 tokens (Top-48 of them per step).
filler="The river town kept its records in a stone house by the bridge, and every spring the clerks copied them again. "
gen() {  # port prompt tokens
  ip netns exec "$w" "$cli" generate --server "127.0.0.1:$1" --raw --prompt "$2" --max-tokens "$3" --timeout 120
}
for i in 1 2 3; do
  prompt="$(for _ in $(seq 1 $((i * 6))); do printf '%s' "$filler"; done)The code word of the clerks was ember-$i. Repeat the code word:"
  gen 50602 "$prompt" 40 > "$dir/local.$i" 2>"$dir/local.$i.err" || fail "local generation $i: $(tail -n1 "$dir/local.$i.err")"
  gen 50601 "$prompt" 40 > "$dir/remote.$i" 2>"$dir/remote.$i.err" || fail "remote generation $i: $(tail -n1 "$dir/remote.$i.err")"
  cmp -s "$dir/local.$i" "$dir/remote.$i" || { diff "$dir/local.$i" "$dir/remote.$i" >&2; fail "prompt $i: remote text differs"; }
  grep -q 'completion_tokens=40' "$dir/remote.$i.err" || fail "prompt $i: not 40 tokens: $(tail -n1 "$dir/remote.$i.err")"
  log "prompt $i ($(grep -o 'prompt_tokens=[0-9]*' "$dir/remote.$i.err")): identical; remote $(grep -o '[0-9.]* tok/s' "$dir/remote.$i.err"), local $(grep -o '[0-9.]* tok/s' "$dir/local.$i.err")"
done

grep -q "rows go over gRPC" "$dir/remote.log" && fail "the rows channel was not used"
log "the rows travelled on kv-host's rows channel (plain TCP, ticket-authenticated)"

# 4. A wrong token: the worker refuses to start and says why.
if ip netns exec "$w" timeout 60 "$build/gpu-worker/server/gpu-worker" "${worker[@]}" --listen 127.0.0.1:50603 \
     --kv-host-remote "$node_ip:50600" --kv-host-token wrong >"$dir/wrong.log" 2>&1; then
  fail "a worker with a wrong token started"
fi
grep -q "UNAUTHENTICATED" "$dir/wrong.log" || fail "wrong token: $(tail -n1 "$dir/wrong.log")"
log "a wrong token: refused (UNAUTHENTICATED)"

# 5. Partition, then death, of the node mid-generation: errors, no hang.
long="$(for _ in $(seq 1 12); do printf '%s' "$filler"; done)Tell the story of the town:"
gen 50601 "$long" 400 > /dev/null 2>"$dir/part.err" &
client=$!
sleep 2
command -v iptables >/dev/null || apt-get install -y -qq iptables >/dev/null
ip netns exec "$n" iptables -A INPUT -s "$worker_ip" -j DROP
t_cut=$SECONDS
rc=0; wait "$client" || rc=$?
((rc != 0)) || fail "the generation reported success across a partition"
log "partitioned mid-generation: the request ended after $((SECONDS - t_cut)) s: $(tail -n1 "$dir/part.err" | cut -c1-120)"
((SECONDS - t_cut <= 30)) || fail "the request took over 30 s to end after the partition"
ip netns exec "$n" iptables -D INPUT -s "$worker_ip" -j DROP
gen 50601 "$long" 8 > /dev/null 2>"$dir/heal.err" || fail "no generation after the partition healed: $(tail -n1 "$dir/heal.err")"
log "after the partition healed: the worker generates again (a new session on the node)"
gen 50601 "$long" 400 > /dev/null 2>"$dir/kill.err" &
client=$!
sleep 2
kill -KILL "${pids[0]}"
t_kill=$SECONDS
rc=0; wait "$client" || rc=$?
((rc != 0)) || fail "the generation reported success after the node died"
((SECONDS - t_kill <= 30)) || fail "the request took over 30 s to end after the node died"
log "node killed mid-generation: the request ended after $((SECONDS - t_kill)) s: $(tail -n1 "$dir/kill.err" | cut -c1-120)"
log "ok"
