# Shell functions for scripts that drive the compose cluster (sourced by
# deploy/docker/run_cluster.sh and deploy/compose_test.sh).
# Needs: $repo (the repository root) and $project (the compose project name).

compose() { docker-compose -p "$project" -f "$repo/docker-compose.yml" "$@"; }
# The container id of a service.
container() { compose ps -q "$1"; }
# healthy / unhealthy / starting, or the container state when it has no check.
health() {
  docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$(container "$1")"
}
# wait_healthy SERVICE SECONDS: returns 1 (with the service's last log lines)
# when it is not healthy in time.
wait_healthy() {
  local deadline=$((SECONDS + $2))
  until [[ "$(health "$1")" == healthy ]]; do
    if ((SECONDS >= deadline)); then
      echo "$1 not healthy after $2 s (state $(health "$1"))" >&2
      compose logs --tail 20 "$1" >&2 2>&1 || true
      return 1
    fi
    sleep 0.5
  done
}
# A free TCP port on the loopback interface.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
