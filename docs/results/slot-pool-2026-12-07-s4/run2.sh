# Second call of the session (slot pool + fused FP8 scoring/Top-K): the whole
# CUDA suite with SmolLM2 (model staged in /root/m by the two calls before:
# .stage/a carries the bundle and part 00, .stage/b parts 01-02, .stage/c
# part 03), then decode speed with the fused Top-K on and off in one run.
set -u
M=/root/m/SmolLM2-135M-Instruct.Q4_1.gguf
cat /root/m/mpart.00 /root/m/mpart.01 /root/m/mpart.02 .stage/c/mpart.03 > $M
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $M" | sha256sum -c - || exit 1
export LD_LIBRARY_PATH=/root/mb/.bundle/lib:/usr/local/cuda/lib64 TAILORKV_MODEL_DIR=/root/m
B=/root/mb/.bundle/bin
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
timeout 400 $B/tkv_cuda_test --gtest_brief=1 --gtest_output=json:$OUT/gtest_cuda.json > $OUT/cuda_test.txt 2>&1
echo "tkv_cuda_test rc $?"; grep -E "PASSED|FAILED|tests ran|rows reused|late prefetch" $OUT/cuda_test.txt | tail -30
P=hybrid:2:896:64:64:32:gpu:late:i8
T=hybrid:2:896:64:64:32:gpu:i8
run() { local name=$1; shift; echo "== $name: $*"; $B/tkv_llama_bench --prefill "" --decode-tokens repeat --out $OUT/$name.json "$@" 2>&1 | grep -v "^\s*$" | tail -9; }
run decode_fused --plans dense,$P,$T --contexts 32768,131072
run decode_unfused --plans $P,$T --contexts 32768,131072 --fused-topk false
