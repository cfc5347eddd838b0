#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, over a bundle made by
# scripts/gpu_bundle.sh: `ctest -L gpu` (kernel tests against the CPU
# references, and the SmolLM2 GPU-vs-CPU check when the model is present),
# then the benchmarks and the PyTorch baseline, writing JSON to $OUT (or
# ./results).
# Usage: scripts/gpu_run.sh [tests|bench|all] [model_dir]
set -uo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
model_dir="${2:-$PWD/models}"
out="${OUT:-$PWD/results}"
mkdir -p "$out"
export LD_LIBRARY_PATH="$PWD/.bundle/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export TAILORKV_MODEL_DIR="$model_dir" OMP_WAIT_POLICY=passive
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
rc=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  (cd .bundle && ctest -L gpu --output-on-failure) 2>&1 | tee "$out/ctest_gpu.log" || rc=1
  [ -f .bundle/gtest_gpu.json ] && cp .bundle/gtest_gpu.json "$out/"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  .bundle/bin/tkv_llama_bench --out "$out/llama_bench.json" 2>&1 | tee "$out/llama_bench.log" || rc=1
  python3 .bundle/torch_baseline.py --out "$out/torch_baseline.json" 2>&1 | tee "$out/torch_baseline.log" || rc=1
  if [ -x .bundle/bin/tkv_attention_bench ]; then
    .bundle/bin/tkv_attention_bench --out "$out/attention_bench.json" 2>&1 | tee "$out/attention_bench.log" || rc=1
  fi
  if [ -x .bundle/bin/tkv_quant_attention_bench ]; then
    .bundle/bin/tkv_quant_attention_bench --out "$out/quant_attention_bench.json" 2>&1 | tee "$out/quant_attention_bench.log" || rc=1
  fi
fi
exit $rc
