#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, over a bundle made by
# scripts/gpu_bundle.sh: the plan comparison behind docs/results.md
# ("Retrieval and speed per plan"):
#   1. accuracy of each plan on SmolLM2 (tkv_accuracy, CUDA backend): 100
#      passkey + 100 needle prompts up to 8k, 512-step agreement after 7,168
#      tokens, and the facts-in-prose prompt file (eval/data/retrieval_facts.jsonl);
#   2. decode speed of the same plans' 8B-shape analogues at 32k and 128k
#      (tkv_llama_bench, random weights), dense in the same run;
#   3. prefill (time to first token, peak GPU memory) at 32k and 128k, dense
#      and the default plan, with the history prefetch on and off.
# Usage: scripts/gpu_plans_run.sh [model_dir] [what: all|accuracy|decode|prefill]
# Env: PLANS (comma-separated specs for accuracy and decode, dense implied;
# default: the lists behind docs/results/plans-h100-2026-12-06), DEFAULT_PLAN
# (prefill), OUT (results folder), ACC_FLAGS / BENCH_FLAGS (extra flags for
# tkv_accuracy / tkv_llama_bench, e.g. "--cuda-sparse-query after-attention",
# "--row-reuse true --decode-tokens repeat").
set -uo pipefail
cd "$(dirname "$0")/.."
model_dir="${1:-$PWD/models}"
what="${2:-all}"
out="${OUT:-$PWD/results}"
mkdir -p "$out"
export LD_LIBRARY_PATH="$PWD/.bundle/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
bin=.bundle/bin
# Budget 192 (LongBench) and 1,024 / 2,048 (InfiniteBench-like) with 8 to 32
# critical channels, GPU-resident and faithful indexes, bf16 and FP8 host tiers.
plans_dir=docs/results/plans-h100-2026-12-06/plans
accuracy_plans="${PLANS:-hybrid:2:128:8:56:32:gpu,hybrid:1:128:8:56:8:gpu,hybrid:2:128:8:56:8:gpu,hybrid:2:128:8:56:16:gpu,hybrid:2:896:64:64:32:gpu,hybrid:2:1920:64:64:32:gpu,hybrid:4:1920:64:64:32:gpu,hybrid:2:1920:64:64:32:gpu:fp8,hybrid:2:896:64:64:32:faithful,@$plans_dir/l0dense_k128_d32.json,@$plans_dir/l0dense_k1920_d32.json}"
decode_plans="${PLANS:-hybrid:2:128:8:56:32:gpu,hybrid:1:128:8:56:8:gpu,hybrid:2:896:64:64:32:gpu,hybrid:2:1920:64:64:32:gpu,hybrid:2:1920:64:64:16:gpu,hybrid:2:1920:64:64:32:gpu:fp8,hybrid:2:896:64:64:32:faithful}"
# The profiler's default plan for SmolLM2 (profiler/identify.h).
default_plan="${DEFAULT_PLAN:-hybrid:2:896:64:64:32:gpu}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
rc=0
if [ "$what" = all ] || [ "$what" = accuracy ]; then
  "$bin/tkv_accuracy" --backend cuda --model "$model_dir/SmolLM2-135M-Instruct.Q4_1.gguf" \
    --filler eval/data/prose.txt --plan "dense,$accuracy_plans" \
    --lengths 1024,2048,4096,8000 --depths 0,0.25,0.5,0.75,1 --trials 5 --seed 20251122 \
    --agreement-prefix 7168 --agreement-tokens 512 --kv-capacity 8192 \
    --prompt-file eval/data/retrieval_facts.jsonl ${ACC_FLAGS:-} \
    --out "$out/accuracy_plans.json" > "$out/accuracy_plans.md" 2> "$out/accuracy_plans.log" || rc=1
  tail -n 40 "$out/accuracy_plans.md"
fi
if [ "$what" = all ] || [ "$what" = decode ]; then
  "$bin/tkv_llama_bench" --plans "dense,$decode_plans" --contexts 32768,131072 --prefill "" ${BENCH_FLAGS:-} \
    --out "$out/decode_plans.json" 2>&1 | tee "$out/decode_plans.log" || rc=1
fi
if [ "$what" = all ] || [ "$what" = prefill ]; then
  for prefetch in true false; do
    "$bin/tkv_llama_bench" --plans "dense,$default_plan" --contexts "" --prefill 32768,131072 \
      --prefill-prefetch "$prefetch" --out "$out/prefill_prefetch_$prefetch.json" 2>&1 \
      | tee "$out/prefill_prefetch_$prefetch.log" || rc=1
  done
fi
exit $rc
