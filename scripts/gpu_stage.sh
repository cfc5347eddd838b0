#!/usr/bin/env bash
# Packs what a GPU-machine session needs into .stage/ (git-ignored through
# .git/info/exclude), in parts small enough for the device tool's 64 MiB
# working-tree limit per call:
#   .stage/a: the xz-packed bundle (scripts/gpu_bundle.sh) + model part 00
#   .stage/b: model parts 01..02
#   .stage/c: model parts 03..04 + assemble.sh
# (each call carries the working tree too: 3 parts + the repo pass 64 MiB)
# On the GPU machine, three consecutive calls (the machine stays warm ~30 s):
#   1. carry .stage/a: mkdir -p /root/m && cp .stage/a/mpart.00 /root/m/ &&
#      xz -dc .stage/a/bundle.tar.xz | tar -xf - -C /root/
#   2. carry .stage/b: cp .stage/b/mpart.0* /root/m/
#   3. carry .stage/c: source .stage/c/assemble.sh && <the runs>, e.g.
#      scripts/gpu_plans_run.sh /root/m all
# assemble.sh joins the model into /root/m, checks its SHA-256, points
# .bundle at /root/.bundle and exports LD_LIBRARY_PATH / TAILORKV_MODEL_DIR.
# Usage: scripts/gpu_stage.sh [model.gguf]   (bundle .bundle/ first)
set -euo pipefail
cd "$(dirname "$0")/.."
model="${1:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
[ -d .bundle/bin ] || { echo "gpu_stage: no .bundle (run scripts/gpu_bundle.sh)" >&2; exit 2; }
[ -f "$model" ] || { echo "gpu_stage: $model missing (scripts/fetch_model.sh)" >&2; exit 2; }
grep -qx '/.stage/' .git/info/exclude 2>/dev/null || echo '/.stage/' >> .git/info/exclude
rm -rf .stage && mkdir -p .stage/a .stage/b .stage/c
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
split -b 20000000 -d -a 2 "$model" "$tmp/mpart."
mv "$tmp/mpart.00" .stage/a/
mv "$tmp"/mpart.0[12] .stage/b/
mv "$tmp"/mpart.0[3-9] .stage/c/ 2>/dev/null || true
sum=$(sha256sum "$model" | cut -d' ' -f1)
name=$(basename "$model")
tar -cf - .bundle | xz -T"$(nproc)" -6 > .stage/a/bundle.tar.xz
cat > .stage/c/assemble.sh <<EOF
# Sourced on the GPU machine from the repository root (see scripts/gpu_stage.sh).
cat /root/m/mpart.0[0-2] .stage/c/mpart.* > /root/m/$name
echo "$sum  /root/m/$name" | sha256sum -c - || return 1
rm -rf .bundle && ln -s /root/.bundle .bundle
export LD_LIBRARY_PATH=/root/.bundle/lib:/usr/local/cuda/lib64 TAILORKV_MODEL_DIR=/root/m OMP_WAIT_POLICY=passive
EOF
du -sh .stage/a .stage/b .stage/c
