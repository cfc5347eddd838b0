#!/usr/bin/env bash
# The cluster in containers, end to end, with faults (CI runs it through ctest
# `compose`, label containers):
#  1. a Docker engine (deploy/docker/engine.sh: installed and started when
#     missing), the model in ./models (scripts/fetch_model.sh), the base image
#     and tailorkv:cpu from this build tree (deploy/docker/build_images.sh);
#  2. `docker-compose up -d` of docker-compose.yml, waiting until every service
#     is healthy; each one's time from container start to SERVING;
#  3. one greedy generation over gRPC (the gateway's relay) and one over HTTP;
#  4. kv-host killed (SIGKILL from the host) while a generation streams: Docker
#     restarts it, the worker re-attaches, and the generation must finish with
#     exactly the text it gives without the fault;
#  5. the worker restarted (`docker-compose restart`): serves again through the
#     gateway; then killed (SIGKILL) with a generation in flight: the client
#     gets an error instead of hanging, Docker restarts the worker, it serves;
#  6. `down -v`, the engine stopped if this script started it, and the host's
#     iptables rules and bridges compared with what they were before.
# Figures go to BUILD_DIR/compose-test/result.json (docs/results.md quotes them).
# Usage: deploy/compose_test.sh [BUILD_DIR]   (root, or sudo, for the engine)
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
build="$(cd "${1:-build}" && pwd)"
out="$build/compose-test"
state="$out/engine"
project="tailorkv-compose-test"
cli="$build/services/cli/tailorkv-cli"
mkdir -p "$out"
t0=$SECONDS
log() { echo "[compose_test $((SECONDS - t0))s] $*" >&2; }
fail() { log "FAIL: $*"; exit 1; }

SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
net_state() {  # what the test must leave as it found it
  { $SUDO iptables -S 2>/dev/null; $SUDO ip6tables -S 2>/dev/null
    ip -o link show type bridge 2>/dev/null | awk -F': ' '{print "bridge " $2}'; } | sort
}
net_state > "$out/net.before"

source deploy/docker/lib.sh
export TAILORKV_HTTP_PORT="$(free_port)" TAILORKV_GATEWAY_PORT="$(free_port)"
export TAILORKV_MODELS="$repo/models"

cleanup() {
  local status=$?
  trap - EXIT
  if docker info >/dev/null 2>&1; then
    if ((status != 0)); then compose logs --tail 30 >&2 2>&1 || true; fi
    compose down -v --remove-orphans >/dev/null 2>&1 || true
  fi
  deploy/docker/engine.sh stop "$state" || status=1
  net_state > "$out/net.after"
  if ! diff -u "$out/net.before" "$out/net.after" >&2; then
    log "FAIL: iptables rules or bridges differ from before the test"
    status=1
  fi
  ((status == 0)) && log "ok in $((SECONDS - t0)) s" || log "failed (status $status)"
  exit "$status"
}
trap cleanup EXIT

deploy/docker/engine.sh start "$state"
./scripts/fetch_model.sh >/dev/null
t_images=$SECONDS
deploy/docker/build_images.sh "$build"
images_s=$((SECONDS - t_images))
image_mb="$(docker image inspect -f '{{.Size}}' tailorkv:cpu | awk '{printf "%.0f", $1/1e6}')"
base_mb="$(docker image inspect -f '{{.Size}}' debian:12 | awk '{printf "%.0f", $1/1e6}')"

# Seconds from the container's start to its "ready on" log line.
ready_after() {
  local c; c="$(container "$1")"
  python3 - "$(docker inspect -f '{{.State.StartedAt}}' "$c")" \
    "$(docker logs -t "$c" 2>&1 | grep -m1 ' ready on ' | cut -d' ' -f1)" <<'PY'
import sys, datetime
def t(s):  # RFC 3339 with nanoseconds: keep microseconds
    s = s.rstrip("Z")
    head, _, frac = s.partition(".")
    return datetime.datetime.fromisoformat(head + "." + (frac + "000000")[:6])
print("%.3f" % (t(sys.argv[2]) - t(sys.argv[1])).total_seconds() if sys.argv[2] else "null")
PY
}

# Epoch seconds of the last log line of SERVICE matching PATTERN (Docker's
# own timestamps), or of now.
log_epoch() {
  docker logs -t "$(container "$1")" 2>&1 | grep -- "$2" | tail -n1 | cut -d' ' -f1 |
    python3 -c 'import sys,datetime
s=sys.stdin.read().strip().rstrip("Z")
h,_,f=s.partition(".")
print(datetime.datetime.fromisoformat(h+"."+(f+"000000")[:6]).replace(tzinfo=datetime.timezone.utc).timestamp() if s else "null")'
}
now() { date +%s.%N; }
since() { python3 -c "import sys; print('%.2f' % (float(sys.argv[2]) - float(sys.argv[1])) if sys.argv[2] != 'null' else 'null')" "$1" "$2"; }

log "up (HTTP 127.0.0.1:$TAILORKV_HTTP_PORT, gRPC 127.0.0.1:$TAILORKV_GATEWAY_PORT)"
t_up=$SECONDS
compose up -d 2>/dev/null
for s in profiler kv-host gpu-worker gateway; do wait_healthy "$s" 300 || fail "$s not healthy"; done
up_s=$((SECONDS - t_up))
declare -A ready
for s in profiler kv-host gpu-worker gateway; do ready[$s]="$(ready_after "$s")"; done
plan_c="$(container plan)"
plan_s="$(python3 -c 'import sys,datetime
f=lambda s: datetime.datetime.fromisoformat(s.rstrip("Z")[:26])
print("%.1f" % (f(sys.argv[2])-f(sys.argv[1])).total_seconds())' \
  "$(docker inspect -f '{{.State.StartedAt}}' "$plan_c")" "$(docker inspect -f '{{.State.FinishedAt}}' "$plan_c")")"
[[ "$(docker inspect -f '{{.State.ExitCode}}' "$plan_c")" == 0 ]] || fail "the profile job failed"
log "all healthy in ${up_s} s (to SERVING: profiler ${ready[profiler]} s, kv-host ${ready[kv-host]} s, gpu-worker ${ready[gpu-worker]} s after a ${plan_s} s profile, gateway ${ready[gateway]} s)"

grpc="127.0.0.1:$TAILORKV_GATEWAY_PORT"
http="http://127.0.0.1:$TAILORKV_HTTP_PORT"
prompt="Count from 1 to 300, separated by commas."
gen() { "$cli" generate --server "$grpc" --prompt "$prompt" --timeout 120 --max-tokens "${1:-120}"; }

# 3. gRPC and HTTP.
gen > "$out/ref.txt" 2> "$out/ref.err" || { cat "$out/ref.err" >&2; fail "generation over gRPC"; }
grep -q 'finish=length' "$out/ref.err" || fail "gRPC generation did not run to max_tokens: $(tail -n1 "$out/ref.err")"
[[ -s "$out/ref.txt" ]] || fail "gRPC generation returned no text"
"$cli" generate --http "$http" --prompt "What is the capital of France?" --max-tokens 24 > "$out/http.txt" 2> "$out/http.err" \
  || { cat "$out/http.err" >&2; fail "generation over HTTP"; }
grep -qi paris "$out/http.txt" || fail "HTTP answer without Paris: $(cat "$out/http.txt")"
log "gRPC: $(wc -c < "$out/ref.txt") bytes; HTTP: $(tr -d '\n' < "$out/http.txt")"

# 4. kv-host dies mid-generation.
kv_before="$(docker inspect -f '{{.RestartCount}}' "$(container kv-host)")"
gen > "$out/kvfault.txt" 2> "$out/kvfault.err" &
client=$!
sleep 1.5
kill -0 "$client" 2>/dev/null || fail "the generation ended before kv-host was killed"
t_kill=$(now)
$SUDO kill -KILL "$(docker inspect -f '{{.State.Pid}}' "$(container kv-host)")"
wait "$client" || { cat "$out/kvfault.err" >&2; fail "the generation failed when kv-host died"; }
kv_after="$(docker inspect -f '{{.RestartCount}}' "$(container kv-host)")"
((kv_after > kv_before)) || fail "kv-host was not restarted (restart count $kv_after)"
cmp -s "$out/ref.txt" "$out/kvfault.txt" || { diff "$out/ref.txt" "$out/kvfault.txt" >&2; fail "text differs after kv-host's death"; }
wait_healthy kv-host 60 || fail "kv-host not healthy after its restart"
wait_healthy gpu-worker 60 || fail "the worker not healthy after kv-host's restart"
kv_ready_s="$(since "$t_kill" "$(log_epoch kv-host ' ready on ')")"
reattach_s="$(since "$t_kill" "$(log_epoch gpu-worker 'attached again')")"
[[ "$reattach_s" != null ]] || fail "the worker did not log its re-attachment to kv-host"
log "kv-host killed mid-generation: serving again after ${kv_ready_s} s, worker re-attached after ${reattach_s} s, text identical"

# 5. The worker restarted, then killed with a generation in flight.
serves_again() {  # seconds: a generation through the gateway succeeds
  local deadline=$((SECONDS + $1))
  until gen 8 > /dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}
t_restart=$(now)
compose restart gpu-worker >/dev/null 2>&1
wait_healthy gpu-worker 180 || fail "the worker not healthy after its restart"
serves_again 60 || fail "no generation through the gateway after the worker's restart"
restart_s="$(since "$t_restart" "$(now)")"
log "worker restarted: serving through the gateway after ${restart_s} s"

w_before="$(docker inspect -f '{{.RestartCount}}' "$(container gpu-worker)")"
gen > /dev/null 2> "$out/wkill.err" &
client=$!
sleep 1.5
t_crash=$(now)
$SUDO kill -KILL "$(docker inspect -f '{{.State.Pid}}' "$(container gpu-worker)")"
client_rc=0
wait "$client" || client_rc=$?
client_s="$(since "$t_crash" "$(now)")"
((client_rc != 0)) || fail "the in-flight generation reported success after the worker was killed"
grep -qiE 'unavailable|internal|cancel|abort' "$out/wkill.err" || fail "unexpected client error: $(tail -n2 "$out/wkill.err")"
wait_healthy gpu-worker 180 || fail "the worker not healthy after its crash"
serves_again 60 || fail "no generation through the gateway after the worker's crash"
crash_s="$(since "$t_crash" "$(now)")"
w_after="$(docker inspect -f '{{.RestartCount}}' "$(container gpu-worker)")"
((w_after > w_before)) || fail "the worker was not restarted after its crash"
log "worker killed mid-generation: client error after ${client_s} s ($(tail -n1 "$out/wkill.err" | cut -c1-100)), serving again after ${crash_s} s"

python3 - "$out/result.json" <<PY
import json, sys
json.dump({
  "images": {"build_seconds": $images_s, "tailorkv_cpu_mb": $image_mb, "debian12_base_mb": $base_mb},
  "up_seconds_all_healthy": $up_s,
  "seconds_to_serving": {"profiler": ${ready[profiler]}, "kv-host": ${ready[kv-host]},
                         "gpu-worker": ${ready[gpu-worker]}, "gateway": ${ready[gateway]}},
  "profile_job_seconds": $plan_s,
  "kv_host_killed_mid_generation": {"completed": True, "text_identical": True,
                                    "restart_count": $kv_after, "kv_host_ready_seconds": $kv_ready_s,
                                    "worker_reattached_seconds": $reattach_s},
  "worker_restarted": {"serving_through_gateway_seconds": $restart_s},
  "worker_killed_mid_generation": {"client_error_seconds": $client_s, "serving_again_seconds": $crash_s},
  "test_seconds_so_far": $((SECONDS - t0)),
}, open(sys.argv[1], "w"), indent=1)
PY
log "results in $out/result.json"
