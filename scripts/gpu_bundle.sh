#!/usr/bin/env bash
# Builds the GPU tests and benchmarks for Hopper (sm_90a) on a machine with
# nvcc but no GPU, and bundles them with the non-system shared libraries they
# need (gRPC, protobuf, abseil, ...; not libc/libstdc++/CUDA, which the GPU
# machine has) into .bundle/, ready to be carried to the GPU machine and run
# there by scripts/gpu_run.sh.
# Usage: scripts/gpu_bundle.sh
# Env: BUILD_DIR (default build-gpu), BUILD_TYPE (default Release; pass the
# type an existing tree has, e.g. BUILD_DIR=build BUILD_TYPE=RelWithDebInfo,
# to reuse the test build instead of compiling a second tree)
set -euo pipefail
cd "$(dirname "$0")/.."
build="${BUILD_DIR:-build-gpu}"
bundle=.bundle
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE="${BUILD_TYPE:-Release}" -DTAILORKV_CUDA=ON \
  -DTAILORKV_CUDA_ARCHS=90a >/dev/null
targets=(tkv_cuda_test tkv_llama_bench gpu-worker tailorkv-cli kv-host)
# Optional programs, bundled when this tree has them.
# (The list is read whole first: `ninja | grep -q` under pipefail fails
# whenever grep exits before ninja has written everything.)
all_targets=$(ninja -C "$build" -t targets all)
for t in tkv_attention_bench tkv_quant_attention_bench tkv_accuracy tkv-profile tkv_cuda_tap_test \
  tkv_kv_host_processes_test tkv_kv_host_bench tkv_load_test tkv_batch_bench gateway; do
  grep -q "^$t:" <<<"$all_targets" && targets+=("$t")
done
cmake --build "$build" -j "$(nproc)" --target "${targets[@]}"
rm -rf "$bundle" && mkdir -p "$bundle/bin" "$bundle/lib"
for t in "${targets[@]}"; do find "$build" -name "$t" -type f -perm -u+x -exec cp {} "$bundle/bin/" \; ; done
# Debug info (RelWithDebInfo trees) only makes the bundle larger to carry.
strip --strip-debug "$bundle"/bin/*
# Shared libraries the GPU machine lacks: everything ldd resolves outside the
# C/C++ runtime and CUDA (the GPU machine provides those).
for bin in "$bundle"/bin/*; do
  ldd "$bin" | awk '/=> \//{print $3}'
done | sort -u | grep -vE '/(libc|libm|libdl|libpthread|librt|libgcc_s|libstdc\+\+|ld-linux[^/]*|libcuda|libcublas[^/]*|libcudart)\.so' \
  | while read -r lib; do cp -L "$lib" "$bundle/lib/"; done
# A CTest file with relative paths, so `ctest -L gpu` runs in the bundle.
cat > "$bundle/CTestTestfile.cmake" <<'CT'
add_test(cuda_kernels_and_backend "bin/tkv_cuda_test" "--gtest_output=json:gtest_gpu.json")
set_tests_properties(cuda_kernels_and_backend PROPERTIES LABELS gpu TIMEOUT 900)
CT
if [ -x "$bundle/bin/tkv_cuda_tap_test" ]; then
  cat >> "$bundle/CTestTestfile.cmake" <<'CT'
add_test(cuda_taps "bin/tkv_cuda_tap_test" "--gtest_output=json:gtest_gpu_taps.json")
set_tests_properties(cuda_taps PROPERTIES LABELS gpu TIMEOUT 300)
CT
fi
cp scripts/gpu_run.sh bench/torch_baseline.py "$bundle/"
du -sh "$bundle" "$bundle"/bin/* "$bundle/lib" | sed 's/^/[gpu_bundle] /'
