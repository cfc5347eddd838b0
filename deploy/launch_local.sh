#!/usr/bin/env bash
# Starts the tailorkv cluster as plain processes on loopback (profiler,
# kv-host, gpu-worker; the worker keeps its sparse layers' host KV in
# kv-host's shared-memory arenas, attached over kv-host's UNIX socket),
# waits until each reports SERVING over grpc.health.v1,
# has the profiler measure the model and store its layer plan (tkv-profile,
# progress shown), starts the worker with that plan fetched from the
# profiler, streams one generation through tailorkv-cli, starts the gateway
# (OpenAI-compatible HTTP) in front of the worker and asks through it too
# (streamed as server-sent events), then stops
# everything with SIGTERM (a trap makes sure nothing is left running on any
# exit).
#
# Usage: deploy/launch_local.sh [MODEL] [BUILD_DIR] [PROMPT] [--raw] [--max-tokens N]
#                               [--backend auto|cpu|cuda] [--plan dense|profiler]
#                               [--calibration-tokens N] [--remote-kv-host] [--keep-running]
#   --plan     profiler (default): profile, then serve the profiler's plan;
#              dense: skip profiling, every layer dense
#   --calibration-tokens  calibration tokens profiled (default 4096, the profiler's own)
#   --remote-kv-host  serve the sparse layers' host KV from kv-host's remote data plane
#              (TCP on loopback, token-authenticated, as a kv-host node on another
#              host would; the worker then runs on the CPU backend)
#   MODEL      default models/SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch_model.sh)
#   BUILD_DIR  default build
#   PROMPT     default "What is the capital of France? Answer in one sentence."
#   --raw      send the prompt as plain text instead of a chat turn (chat is the default)
#   --keep-running  leave the cluster up after the generation until Ctrl-C
# Ports: TAILORKV_WORKER_PORT (50051), TAILORKV_PROFILER_PORT (50071),
#        TAILORKV_HTTP_PORT (8080: the gateway's HTTP API), TAILORKV_GATEWAY_PORT (50090);
#        kv-host on a UNIX socket in a fresh /tmp/tailorkv-kvhost.* folder
#        (its fd channel beside it, .fd). Logs go to $BUILD_DIR/launch-logs/.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

positional=()
chat_flag=--chat
max_tokens=64
backend=auto
keep_running=0
remote_kv_host=0
plan=profiler
calibration_tokens=4096
while (($#)); do
  case "$1" in
    --raw) chat_flag=--raw ;;
    --chat) chat_flag=--chat ;;
    --max-tokens) max_tokens="$2"; shift ;;
    --backend) backend="$2"; shift ;;
    --keep-running) keep_running=1 ;;
    --remote-kv-host) remote_kv_host=1 ;;
    --plan) plan="$2"; shift ;;
    --calibration-tokens) calibration_tokens="$2"; shift ;;
    -h|--help) sed -n '2,32p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "launch_local.sh: unknown option $1" >&2; exit 2 ;;
    *) positional+=("$1") ;;
  esac
  shift
done
model="${positional[0]:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
build_dir="${positional[1]:-build}"
prompt="${positional[2]:-What is the capital of France? Answer in one sentence.}"

worker_port="${TAILORKV_WORKER_PORT:-50051}"
profiler_port="${TAILORKV_PROFILER_PORT:-50071}"
http_port="${TAILORKV_HTTP_PORT:-8080}"
gateway_port="${TAILORKV_GATEWAY_PORT:-50090}"

die() { echo "launch_local.sh: $*" >&2; exit 1; }

[[ -f "$model" || -d "$model" ]] || die "model '$model' not found (run scripts/fetch_model.sh)"
[[ "$plan" == dense || "$plan" == profiler ]] || die "--plan must be dense or profiler, got '$plan'"
for bin in gpu-worker/server/gpu-worker kv-host/kv-host profiler/profiler profiler/tkv-profile services/cli/tailorkv-cli \
  services/gateway/gateway; do
  [[ -x "$build_dir/$bin" ]] || die "$build_dir/$bin not built (cmake -S . -B $build_dir -G Ninja && ninja -C $build_dir)"
done
cli="$build_dir/services/cli/tailorkv-cli"
log_dir="$build_dir/launch-logs"
mkdir -p "$log_dir"

pids=()
names=()
stop_all() {
  local status=$?
  trap - EXIT INT TERM
  # Reverse start order: the worker drains first, its dependencies last.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    if kill -0 "${pids[i]}" 2>/dev/null; then
      echo "stopping ${names[i]} (pid ${pids[i]})" >&2
      kill -TERM "${pids[i]}" 2>/dev/null || true
    fi
  done
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    # Each process drains within its grace period; escalate only after that.
    for _ in $(seq 1 150); do
      kill -0 "${pids[i]}" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "${pids[i]}" 2>/dev/null; then
      echo "${names[i]} did not stop after SIGTERM; sending SIGKILL" >&2
      kill -KILL "${pids[i]}" 2>/dev/null || true
    fi
    wait "${pids[i]}" 2>/dev/null || true
  done
  [[ -n "${kvhost_dir:-}" ]] && rm -rf "$kvhost_dir"
  exit "$status"
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start() {
  local name="$1"; shift
  "$@" >"$log_dir/$name.log" 2>&1 &
  pids+=("$!")
  names+=("$name")
  echo "started $name (pid $!), log $log_dir/$name.log" >&2
}

wait_serving() {
  local name="$1" addr="$2" service="$3" seconds="$4" pid="$5"
  local deadline=$((SECONDS + seconds))
  until "$cli" health --server "$addr" --service "$service" --wait-seconds 1 >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 20 "$log_dir/$name.log" >&2 || true
      die "$name exited before serving (log above)"
    fi
    ((SECONDS < deadline)) || { tail -n 20 "$log_dir/$name.log" >&2; die "$name not SERVING after ${seconds}s"; }
  done
  echo "$name SERVING on $addr" >&2
}

model_dir="$(cd "$(dirname "$model")" && pwd)"
start profiler "$build_dir/profiler/profiler" --listen "127.0.0.1:$profiler_port" \
  --models-dir "$model_dir" --plans-dir "$build_dir/launch-plans" --backend "$backend"
# A short path: a UNIX socket's path must fit 107 bytes (with ".fd" added).
kvhost_dir="$(mktemp -d /tmp/tailorkv-kvhost.XXXXXX)"
kvhost_sock="$kvhost_dir/kv-host.sock"
kvhost_flags=()
worker_kv_flags=(--kv-host "unix://$kvhost_sock")
if ((remote_kv_host)); then
  # A node's data plane on loopback; the token reaches both through the
  # environment (not the process list).
  data_port="${TAILORKV_KVHOST_DATA_PORT:-50062}"
  export TAILORKV_KV_HOST_TOKEN="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  kvhost_flags=(--data-listen "127.0.0.1:$data_port")
  worker_kv_flags=(--kv-host-remote "127.0.0.1:$data_port")
  backend=cpu
fi
start kv-host "$build_dir/kv-host/kv-host" --listen "unix:$kvhost_sock" --budget 0.25 "${kvhost_flags[@]}"
wait_serving profiler "127.0.0.1:$profiler_port" tailorkv.v1.Profiler 30 "${pids[0]}"
wait_serving kv-host "unix://$kvhost_sock" tailorkv.v1.KvHost 30 "${pids[1]}"

plan_flags=(--kv-plan dense)
if [[ "$plan" == profiler ]]; then
  echo "--- profiling $(basename "$model") on the profiler ($calibration_tokens calibration tokens)" >&2
  "$build_dir/profiler/tkv-profile" run --server "127.0.0.1:$profiler_port" \
    --model "$(basename "$model")" --calibration profiler/data/calibration.txt \
    --max-tokens "$calibration_tokens" --out "$build_dir/launch-plans/latest" >&2
  plan_flags=(--kv-plan profiler --profiler "127.0.0.1:$profiler_port"
              --plan-cache "$build_dir/launch-plans/worker-plan-cache.json")
fi
start gpu-worker "$build_dir/gpu-worker/server/gpu-worker" --model "$model" \
  --listen "127.0.0.1:$worker_port" --backend "$backend" "${worker_kv_flags[@]}" "${plan_flags[@]}"
wait_serving gpu-worker "127.0.0.1:$worker_port" tailorkv.v1.Generation 300 "${pids[2]}"

"$cli" info --server "127.0.0.1:$worker_port" >&2
echo "--- prompt: $prompt" >&2
"$cli" generate --server "127.0.0.1:$worker_port" "$chat_flag" --max-tokens "$max_tokens" \
  --prompt "$prompt"
echo "--- kv-host after the request (its session closed; the worker's warm arena stays)" >&2
"$cli" kv-host stats --server "unix://$kvhost_sock" >&2
if [[ -x "$build_dir/bench/tkv_load_test" ]]; then
  # The engine's scheduler: one request alone, then four at once (mixed prompts).
  echo "--- the scheduler: 1 request alone, then 4 at once (tkv_load_test)" >&2
  "$build_dir/bench/tkv_load_test" --server "127.0.0.1:$worker_port" --clients 4 --max-tokens 8 \
    --min-words 8 --max-words 120 --stalled 0 >&2 || die "concurrent requests failed"
  "$cli" load --server "127.0.0.1:$worker_port" >&2
fi

# The front door: OpenAI-compatible HTTP over the worker.
start gateway "$build_dir/services/gateway/gateway" --workers "127.0.0.1:$worker_port" \
  --listen "127.0.0.1:$gateway_port" --http-listen "127.0.0.1:$http_port"
http_base="http://127.0.0.1:$http_port"
python3 - "$http_base" "$prompt" "$max_tokens" "${pids[3]}" <<'PY' || die "the gateway's HTTP API failed (log: $log_dir/gateway.log)"
import json, os, sys, time, urllib.request
base, prompt, max_tokens, pid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
deadline = time.time() + 30
while True:  # /health turns 200 once the gateway has seen a ready worker
    try:
        if urllib.request.urlopen(base + "/health", timeout=2).status == 200:
            break
    except Exception:
        os.kill(pid, 0)  # the gateway still runs
        if time.time() > deadline:
            sys.exit("gateway not healthy after 30 s")
        time.sleep(0.2)
print(f"--- the same question over HTTP: POST {base}/v1/chat/completions (stream)", file=sys.stderr)
body = {"model": "tailorkv", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})
usage = None
with urllib.request.urlopen(req, timeout=300) as resp:
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        usage = event.get("usage") or usage
        for choice in event["choices"]:
            sys.stdout.write(choice["delta"].get("content") or "")
            sys.stdout.flush()
print()
print(f"[usage {usage}]", file=sys.stderr)
PY
echo "--- gateway metrics (Prometheus text at $http_base/metrics), a few lines:" >&2
python3 -c "import sys,urllib.request; t=urllib.request.urlopen(sys.argv[1]+'/metrics').read().decode(); print('\n'.join(l for l in t.splitlines() if l.startswith(('tailorkv:time_to_first_token_seconds_count','tailorkv:generation_tokens_total','tailorkv:request_success_total'))))" "$http_base" >&2

if ((keep_running)); then
  echo "cluster running (worker 127.0.0.1:$worker_port, HTTP $http_base/v1); Ctrl-C stops it" >&2
  wait "${pids[2]}"
fi
