#!/usr/bin/env bash
# Makes a Docker engine available, and later puts the host back as it was.
#   engine.sh start STATE_DIR   installs docker.io + docker-compose when missing,
#                               starts dockerd when none runs (recording the
#                               firewall rules and bridges it will change)
#   engine.sh stop STATE_DIR    stops the dockerd that `start` started, restores
#                               the recorded iptables rules (FORWARD policy
#                               included) and deletes the bridges it created;
#                               an engine that was already running is left alone
# Needs root (or sudo) for apt-get and dockerd.
set -euo pipefail
cmd="${1:-}"; state="${2:-}"
[[ ( "$cmd" == start || "$cmd" == stop ) && -n "$state" ]] || { echo "usage: engine.sh start|stop STATE_DIR" >&2; exit 2; }
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
mkdir -p "$state"

bridges() { ip -o link show type bridge 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | sort; }

if [[ "$cmd" == start ]]; then
  need=()
  command -v dockerd >/dev/null || need+=(docker.io)
  command -v docker-compose >/dev/null || need+=(docker-compose)
  command -v iptables-save >/dev/null || need+=(iptables)
  if ((${#need[@]})); then
    echo "[engine] installing ${need[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
  if docker info >/dev/null 2>&1; then
    echo "[engine] using the running Docker engine" >&2
    rm -f "$state/started"
    exit 0
  fi
  for v in iptables ip6tables; do
    $SUDO $v-save > "$state/$v.before" 2>/dev/null || true
    $SUDO $v -S FORWARD 2>/dev/null | head -1 > "$state/$v.forward" || true
  done
  bridges > "$state/bridges.before"
  $SUDO dockerd --data-root "${TAILORKV_DOCKER_ROOT:-/var/lib/docker}" >"$state/dockerd.log" 2>&1 &
  echo $! > "$state/started"
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && { echo "[engine] dockerd started (pid $(cat "$state/started"))" >&2; exit 0; }
    sleep 0.5
  done
  tail -n 20 "$state/dockerd.log" >&2
  echo "[engine] dockerd did not come up in 30 s" >&2
  exit 1
fi

# stop
[[ -f "$state/started" ]] || { echo "[engine] engine not started by us: left running" >&2; exit 0; }
pid="$(cat "$state/started")"
$SUDO kill -TERM "$pid" 2>/dev/null || true
for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
if kill -0 "$pid" 2>/dev/null; then $SUDO kill -KILL "$pid" 2>/dev/null || true; fi
# containerd (started by dockerd) goes with it; wait so no shim holds a bridge.
for _ in $(seq 1 20); do pgrep -x containerd >/dev/null || break; sleep 0.5; done
for b in $(comm -13 "$state/bridges.before" <(bridges)); do
  $SUDO ip link delete "$b" 2>/dev/null && echo "[engine] removed bridge $b" >&2 || true
done
# dockerd adds chains to the filter and nat tables and sets FORWARD to DROP:
# empty those tables, then load what was there before (nothing, often).
for v in iptables ip6tables; do
  command -v $v >/dev/null || continue
  for t in filter nat; do $SUDO $v -t $t -F 2>/dev/null || true; $SUDO $v -t $t -X 2>/dev/null || true; done
  if [[ -s "$state/$v.before" ]]; then $SUDO $v-restore < "$state/$v.before"; fi
  policy="$(awk '{print $3}' "$state/$v.forward" 2>/dev/null || true)"
  if [[ -n "$policy" ]]; then $SUDO $v -P FORWARD "$policy"; fi
done
rm -f "$state/started"
echo "[engine] dockerd stopped; iptables and bridges as before" >&2
