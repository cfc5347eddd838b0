# The slot-pool tier on the GPU machine: the CUDA tests, then decode speed of
# the default plan (P), the speculative-query plan (T) and dense in one run.
# Bundle: scripts/gpu_mini_bundle.sh (carry .stage/a).
set -u
mkdir -p /root/mb && xz -dc .stage/a/mb.tar.xz | tar -xf - -C /root/mb
export LD_LIBRARY_PATH=/root/mb/.bundle/lib:/usr/local/cuda/lib64
B=/root/mb/.bundle/bin
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
timeout 300 $B/tkv_cuda_test --gtest_brief=1 --gtest_output=json:$OUT/gtest_cuda.json > $OUT/cuda_test.txt 2>&1
echo "tkv_cuda_test rc $?"; grep -E "PASSED|FAILED|tests ran" $OUT/cuda_test.txt | tail -20
P=hybrid:2:896:64:64:32:gpu:late:i8
T=hybrid:2:896:64:64:32:gpu:i8
run() { local name=$1; shift; echo "== $name: $*"; $B/tkv_llama_bench --prefill "" --decode-tokens repeat --out $OUT/$name.json "$@" 2>&1 | grep -v "^\s*$" | tail -9; }
run decode_base --plans dense,$P,$T --contexts 32768,131072
run decode_noreuse --plans $P --contexts 131072 --row-reuse false
