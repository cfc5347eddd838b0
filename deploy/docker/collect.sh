#!/usr/bin/env bash
# Gathers what a runtime image holds into OUT, laid out as the image's root:
#   usr/local/bin/        gpu-worker kv-host profiler tkv-profile tailorkv-cli gateway (stripped)
#   usr/local/lib/tailorkv/  the shared libraries they load that the base image lacks
#   usr/local/share/tailorkv/ the profiler's calibration text
#   usr/local/lib/tailorkv/setup-runtime.sh (run once in the image: user, folders, ldconfig)
# Usage: deploy/docker/collect.sh BUILD_DIR OUT cpu|gpu
#   cpu: programs without the CUDA backend: the *-cpu twins when BUILD_DIR was
#        built with CUDA (cmake --build BUILD_DIR --target gpu-worker-cpu
#        profiler-cpu tkv-profile-cpu), else the plain ones; fails if any of them
#        would load a CUDA library
#   gpu: the CUDA programs; the CUDA runtime and cuBLAS come from the base image
#        (NVIDIA's CUDA runtime images), the driver from the container toolkit
set -euo pipefail
[[ $# -eq 3 && ( "$3" == cpu || "$3" == gpu ) ]] || { echo "usage: collect.sh BUILD_DIR OUT cpu|gpu" >&2; exit 2; }
build="$1"; out="$2"; variant="$3"
here="$(cd "$(dirname "$0")/../.." && pwd)"
declare -A src=(
  [gpu-worker]=gpu-worker/server/gpu-worker [kv-host]=kv-host/kv-host [profiler]=profiler/profiler
  [tkv-profile]=profiler/tkv-profile [tailorkv-cli]=services/cli/tailorkv-cli [gateway]=services/gateway/gateway
)
rm -rf "$out"
mkdir -p "$out/usr/local/bin" "$out/usr/local/lib/tailorkv" "$out/usr/local/share/tailorkv"
for name in "${!src[@]}"; do
  path="$build/${src[$name]}"
  if [[ "$variant" == cpu && -x "$path-cpu" ]]; then path="$path-cpu"; fi
  [[ -x "$path" ]] || { echo "collect.sh: $path not built" >&2; exit 1; }
  if [[ "$variant" == cpu ]] && grep -qE 'lib(cublas|cudart|cuda)\.' <<<"$(ldd "$path")"; then
    echo "collect.sh: $path loads CUDA libraries; build the *-cpu targets or a tree without CUDA" >&2
    exit 1
  fi
  cp "$path" "$out/usr/local/bin/$name"
done
strip --strip-unneeded "$out"/usr/local/bin/*
# Libraries every base image has (glibc, the GCC runtime), and for the GPU
# image what NVIDIA's runtime image and the container toolkit provide.
base='/(libc|libm|libdl|libpthread|librt|libresolv|libgcc_s|libstdc\+\+|ld-linux[^/]*)\.so'
[[ "$variant" == gpu ]] && base="$base|/(libcuda|libcudart|libcublas|libcublasLt|libnvidia[^/]*)\.so"
for bin in "$out"/usr/local/bin/*; do
  ldd "$bin" | awk '/=> \//{print $3}'
done | sort -u | { grep -vE "$base" || true; } | while read -r lib; do
  cp -L "$lib" "$out/usr/local/lib/tailorkv/"
done
cp "$here/profiler/data/calibration.txt" "$out/usr/local/share/tailorkv/calibration.txt"
install -m 0755 "$here/deploy/docker/setup-runtime.sh" "$out/usr/local/lib/tailorkv/setup-runtime.sh"
du -sh "$out/usr/local/bin" "$out/usr/local/lib/tailorkv" | sed 's/^/[collect] /' >&2
