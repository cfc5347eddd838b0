#!/usr/bin/env bash
# A model-free bundle of a few GPU programs from an existing build tree, for
# short device calls: the programs (debug info stripped) plus the shared
# libraries they ldd to outside the C/C++ runtime and CUDA, packed with xz
# into .stage/a/mb.tar.xz (git-ignored; carry ".stage/a"). On the device:
#   mkdir -p /root/mb && xz -dc .stage/a/mb.tar.xz | tar -xf - -C /root/mb
#   export LD_LIBRARY_PATH=/root/mb/.bundle/lib:/usr/local/cuda/lib64
# Usage: scripts/gpu_mini_bundle.sh [PROGRAM...]
#   (default: tkv_cuda_test tkv_llama_bench tkv_batch_bench); env BUILD_DIR (build).
set -euo pipefail
cd "$(dirname "$0")/.."
build="${BUILD_DIR:-build}"
progs=("$@")
[ ${#progs[@]} -gt 0 ] || progs=(tkv_cuda_test tkv_llama_bench tkv_batch_bench)
ninja -C "$build" "${progs[@]}" >/dev/null
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/.bundle/bin" "$tmp/.bundle/lib" .stage/a
for p in "${progs[@]}"; do
  f=$(find "$build" -name "$p" -type f -perm -u+x | head -1)
  [ -n "$f" ] || { echo "gpu_mini_bundle: $p not built" >&2; exit 1; }
  cp "$f" "$tmp/.bundle/bin/"
done
strip --strip-debug "$tmp"/.bundle/bin/*
libs=$(for b in "$tmp"/.bundle/bin/*; do ldd "$b" | awk '/=> \//{print $3}'; done | sort -u)
grep -vE '/(libc|libm|libdl|libpthread|librt|libgcc_s|libstdc\+\+|ld-linux[^/]*|libcuda|libcublas[^/]*|libcudart)\.so' \
  <<<"$libs" | while read -r lib; do cp -L "$lib" "$tmp/.bundle/lib/"; done
tar -C "$tmp" -cf - .bundle | xz -6 -T2 > .stage/a/mb.tar.xz
du -h .stage/a/mb.tar.xz
