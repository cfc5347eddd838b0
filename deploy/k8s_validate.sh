#!/usr/bin/env bash
# Checks the Kubernetes manifests (deploy/k8s) without a cluster: renders
# each overlay with `kubectl kustomize`, validates every rendered object
# against the Kubernetes JSON schemas (kubernetes-validate from PyPI,
# pinned, --strict: unknown fields fail too) for one Kubernetes version,
# and checks the invariants the manifests rely on (below). Proves that
# the validator can fail: two broken manifests must be refused, and the
# GPU overlay's invariants must fail on the CPU overlay's objects.
#
# kubectl: the one on PATH (or $KUBECTL); where there is none, Debian's
# kubernetes-client (kubectl 1.20, kustomize v2.0.3) is installed with apt.
# The validator lives in a virtual environment under the build tree.
# Usage: deploy/k8s_validate.sh     Env: BUILD_DIR (default build), KUBECTL
# Output: one line per overlay; the rendered YAML stays in $BUILD_DIR/k8s-validate.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
build="${BUILD_DIR:-build}"
venv="$build/pyenv-k8s"
work="$build/k8s-validate"
k8s_version=1.30.0             # the schemas validated against
validator_version=1.37.0       # kubernetes-validate (ships schemas 1.25 .. 1.37)
pyyaml_version=6.0.3
overlays=(cpu gpu)

die() { echo "[k8s_validate] FAIL: $*" >&2; exit 1; }

apt_install() {
  local SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "[k8s_validate] installing: $*" >&2
  $SUDO apt-get -o DPkg::Lock::Timeout=120 update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=120 install -y -qq \
    --no-install-recommends "$@" >/dev/null
}

# --- kubectl
kubectl="${KUBECTL:-kubectl}"
if ! command -v "$kubectl" >/dev/null 2>&1; then
  [[ -z "${KUBECTL:-}" ]] || die "KUBECTL=$KUBECTL is not an executable"
  apt_install kubernetes-client
  command -v kubectl >/dev/null 2>&1 || die "kubernetes-client installed no kubectl"
fi

# --- the validator's virtual environment (recreated when the pin changes)
venv_ok() {
  [[ -x "$venv/bin/python" ]] && "$venv/bin/python" - "$validator_version" "$pyyaml_version" <<'PY' 2>/dev/null
import importlib.metadata as m, sys
sys.exit(0 if (m.version("kubernetes-validate"), m.version("PyYAML")) == (sys.argv[1], sys.argv[2]) else 1)
PY
}
if ! venv_ok; then
  python3 -c "import ensurepip" 2>/dev/null || apt_install python3-venv
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "kubernetes-validate==$validator_version" "PyYAML==$pyyaml_version"
  venv_ok || die "could not install kubernetes-validate $validator_version into $venv"
fi
py="$venv/bin/python"
rm -rf "$work"
mkdir -p "$work"

tool_version="$("$kubectl" version --client -o json 2>/dev/null | "$py" -c '
import json, sys
v = json.load(sys.stdin)
print("kubectl %s, kustomize %s" % (v["clientVersion"]["gitVersion"],
      v.get("kustomizeVersion", "v2.0.3 (built in)")))')"

# validate FILE: kubernetes-validate's output in $work/validate.out, its status returned.
validate() {
  local rc=0
  "$venv/bin/kubernetes-validate" --kubernetes-version "$k8s_version" --strict "$1" >"$work/validate.out" 2>&1 || rc=$?
  return $rc
}

# count FILE: the objects in a multi-document YAML file.
count() { "$py" -c 'import sys, yaml; print(sum(1 for d in yaml.safe_load_all(open(sys.argv[1])) if d))' "$1"; }

# invariants OVERLAY FILE: what the manifests rely on beyond the schemas.
invariants() {
  "$py" - "$1" "$2" <<'PY'
import posixpath, sys, yaml

overlay, path = sys.argv[1], sys.argv[2]
docs = [d for d in yaml.safe_load_all(open(path)) if d]
errors = []
err = errors.append

def flag(c, name):
    """The value of --name=V or --name V in a container's command line."""
    a = (c.get("command") or []) + (c.get("args") or [])
    for i, x in enumerate(a):
        if x.startswith(name + "="):
            return x.split("=", 1)[1]
        if x == name and i + 1 < len(a):
            return a[i + 1]
    return None

def env(c, name):
    return next((e.get("value") for e in c.get("env", []) if e["name"] == name), None)

def unix_path(target):  # unix:/p, unix:///p -> /p
    return "/" + target[len("unix:"):].lstrip("/") if target and target.startswith("unix:") else None

templates = {}  # "Kind/name" -> (kind, pod template)
for d in docs:
    if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        templates["%s/%s" % (d["kind"], d["metadata"]["name"])] = (d["kind"], d["spec"]["template"])
services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
if not templates:
    err("no workloads rendered")

gpu_users = []
for key, (kind, tpl) in templates.items():
    spec = tpl["spec"]
    psc = spec.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True or psc.get("runAsUser") != 10001:
        err("%s: pod securityContext wants runAsNonRoot and runAsUser 10001" % key)
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        err("%s: no RuntimeDefault seccompProfile" % key)
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for c in spec.get("initContainers", []) + spec["containers"]:
        where = "%s container %s" % (key, c["name"])
        # The model fetch Job runs on the public python image (the tailorkv
        # image has no Python); every other container runs the overlay's image.
        if c.get("image") != "tailorkv:" + overlay and not (
                c.get("name") == "fetch-model" and c.get("image") == "python:3.12-slim"):
            err("%s: image %s, want tailorkv:%s" % (where, c.get("image"), overlay))
        res = c.get("resources", {})
        for section in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in res.get(section, {}):
                    err("%s: no resources.%s.%s" % (where, section, r))
        if "nvidia.com/gpu" in res.get("limits", {}) or "nvidia.com/gpu" in res.get("requests", {}):
            gpu_users.append((key, c))
        sc = c.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False or sc.get("readOnlyRootFilesystem") is not True \
                or "ALL" not in sc.get("capabilities", {}).get("drop", []):
            err("%s: securityContext wants allowPrivilegeEscalation false, readOnlyRootFilesystem, drop ALL" % where)
        for m in c.get("volumeMounts", []):
            if m["name"] not in volumes:
                err("%s: mounts undeclared volume %s" % (where, m["name"]))
    if kind != "Job":  # long-running: probed
        for c in spec["containers"]:
            where = "%s container %s" % (key, c["name"])
            ports = {p["containerPort"] for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe"):
                if probe not in c:
                    err("%s: no %s" % (where, probe))
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                g = c.get(probe, {}).get("grpc")
                if g and g["port"] not in ports:
                    err("%s: %s on port %s, not a container port" % (where, probe, g["port"]))

# The worker Pod: gpu-worker and kv-host side by side, sharing the socket directory.
holders = [(k, t) for k, (_, t) in templates.items()
           if any(c["name"] == "gpu-worker" for c in t["spec"]["containers"])]
if len(holders) != 1:
    err("want one pod template with the gpu-worker container, got %d" % len(holders))
else:
    key, tpl = holders[0]
    spec = tpl["spec"]
    cs = {c["name"]: c for c in spec["containers"]}
    w, kv = cs["gpu-worker"], cs.get("kv-host")
    if kv is None:
        err("%s: kv-host is not in the worker's Pod" % key)
    else:
        sock = unix_path(flag(kv, "--listen"))
        if sock is None or unix_path(flag(w, "--kv-host")) != sock:
            err("%s: the worker's --kv-host %s is not kv-host's --listen %s"
                % (key, flag(w, "--kv-host"), flag(kv, "--listen")))
        else:
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            mounts = [{m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])} for c in (w, kv)]
            vol = [m.get(posixpath.dirname(sock)) for m in mounts]
            if vol[0] is None or vol[0] != vol[1] or "emptyDir" not in volumes.get(vol[0], {}):
                err("%s: worker and kv-host do not both mount one emptyDir at %s"
                    % (key, posixpath.dirname(sock)))
    if "startupProbe" not in w:
        err("%s: the worker (it loads a model) has no startupProbe" % key)
    want = {"cpu": "cpu", "gpu": "cuda"}[overlay]
    backend = flag(w, "--backend")
    if backend == "$(TAILORKV_BACKEND)":
        backend = env(w, "TAILORKV_BACKEND")
    if backend != want:
        err("%s: worker backend %s, want %s" % (key, backend, want))
    gpus = str(w.get("resources", {}).get("limits", {}).get("nvidia.com/gpu"))
    if overlay == "gpu":
        if gpus != "1":
            err("%s: the worker's nvidia.com/gpu limit is %s, want 1" % (key, gpus))
        if not any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])):
            err("%s: no toleration for nvidia.com/gpu" % key)
if overlay == "cpu" and gpu_users:
    err("the CPU overlay asks for nvidia.com/gpu: %s" % ", ".join("%s/%s" % (k, c["name"]) for k, c in gpu_users))
if overlay == "gpu" and any(c["name"] != "gpu-worker" for _, c in gpu_users):
    err("only the worker may take a GPU")

# Every Service selects a pod template and its named target ports exist there;
# the addresses the services are given (--workers, --profiler) name a Service port.
def selects(svc, tpl):
    sel = svc["spec"].get("selector") or {}
    return sel and all(tpl["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())
for name, svc in services.items():
    chosen = [t for _, t in templates.values() if selects(svc, t)]
    if not chosen:
        err("Service %s selects no pod template" % name)
    for p in svc["spec"]["ports"]:
        tp = p.get("targetPort", p["port"])
        if isinstance(tp, str) and not any(tp == cp.get("name") for t in chosen
                                           for c in t["spec"]["containers"] for cp in c.get("ports", [])):
            err("Service %s: targetPort %s is no container port's name" % (name, tp))
def check_address(who, address):
    host, _, port = address.rpartition(":")
    svc = services.get(host.split(".")[0])
    if svc is None or not any(str(p["port"]) == port for p in svc["spec"]["ports"]):
        err("%s: %s is no Service port" % (who, address))
    return svc
for key, (_, tpl) in templates.items():
    for c in tpl["spec"]["containers"]:
        if c["name"] == "gateway":
            for a in (flag(c, "--workers") or "").split(","):
                svc = check_address("gateway --workers", a)
                if svc and svc["spec"].get("clusterIP") != "None":
                    err("gateway --workers %s: not a headless Service" % a)
        if c["name"] == "gpu-worker" and flag(c, "--profiler"):
            check_address("gpu-worker --profiler", flag(c, "--profiler"))

for e in errors:
    print("invariant: " + e, file=sys.stderr)
sys.exit(1 if errors else 0)
PY
}

# --- the checks must be able to fail
cat >"$work/broken-type.yaml" <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata: {name: broken}
spec:
  replicas: "two"
  selector: {matchLabels: {app: broken}}
  template:
    metadata: {labels: {app: broken}}
    spec:
      containers: [{name: c, image: tailorkv:cpu}]
EOF
sed -e 's/replicas: "two"/replicas: 2/' -e 's/image: tailorkv:cpu}/image: tailorkv:cpu, readinesProbe: {}}/' \
  "$work/broken-type.yaml" >"$work/broken-field.yaml"
if validate "$work/broken-type.yaml" || ! grep -q "'two' is not of type 'integer'" "$work/validate.out"; then
  cat "$work/validate.out" >&2
  die "kubernetes-validate accepted replicas: \"two\""
fi
if validate "$work/broken-field.yaml" || ! grep -q "'readinesProbe' was unexpected" "$work/validate.out"; then
  cat "$work/validate.out" >&2
  die "kubernetes-validate --strict accepted an unknown field (readinesProbe)"
fi

# --- the overlays
for o in "${overlays[@]}"; do
  out="$work/$o.yaml"
  if ! "$kubectl" kustomize "deploy/k8s/overlays/$o" >"$out" 2>"$work/$o.stderr"; then
    cat "$work/$o.stderr" >&2
    die "overlay $o: kubectl kustomize failed"
  fi
  n="$(count "$out")"
  [[ "$n" -gt 0 ]] || die "overlay $o: rendered no objects"
  if ! validate "$out"; then
    grep -v '^INFO ' "$work/validate.out" >&2 || true
    die "overlay $o: objects do not validate against Kubernetes $k8s_version"
  fi
  passed="$(grep -c ' passed for resource ' "$work/validate.out" || true)"
  [[ "$passed" == "$n" ]] || { cat "$work/validate.out" >&2; die "overlay $o: $passed of $n objects validated"; }
  invariants "$o" "$out" || die "overlay $o: invariants"
  echo "k8s overlay $o: $n objects rendered ($tool_version), valid against Kubernetes $k8s_version (--strict), invariants ok"
done
# Each overlay's GPU invariant, checked against the other overlay's objects.
if invariants gpu "$work/cpu.yaml" 2>"$work/invariants.out" ||
   ! grep -q "nvidia.com/gpu limit is None, want 1" "$work/invariants.out"; then
  cat "$work/invariants.out" >&2
  die "the GPU overlay's invariants did not catch a worker without a GPU"
fi
if invariants cpu "$work/gpu.yaml" 2>"$work/invariants.out" ||
   ! grep -q "the CPU overlay asks for nvidia.com/gpu" "$work/invariants.out"; then
  cat "$work/invariants.out" >&2
  die "the CPU overlay's invariants did not catch a GPU request"
fi
echo "k8s manifests: ok in $((SECONDS - start)) s (negative checks refused as expected)"
