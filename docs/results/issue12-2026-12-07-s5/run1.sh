# First call (no model needed): the greedy-pick kernels' and the backend's
# GPU tests (written last session, never run), decode speed of the default
# plan beside dense, and batch throughput with the greedy pick on the host
# against on the device.
set -u
mkdir -p /root/mb && xz -dc .stage/a/mb.tar.xz | tar -xf - -C /root/mb
export LD_LIBRARY_PATH=/root/mb/.bundle/lib:/usr/local/cuda/lib64
B=/root/mb/.bundle/bin
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
timeout 240 $B/tkv_cuda_test --gtest_brief=1 --gtest_filter='Sampling*:*DecodeBatchPick*:SparseTier*:SparseFp8*:*RowReuse*' \
  --gtest_output=json:$OUT/gtest_cuda.json > $OUT/cuda_test.txt 2>&1
echo "tkv_cuda_test rc $?"; grep -E "PASSED|FAILED|tests ran" $OUT/cuda_test.txt | tail -12
P=hybrid:2:896:64:64:32:gpu:late:i8
run() { local name=$1; shift; echo "== $name: $*"; timeout 200 $B/tkv_llama_bench --prefill "" --decode-tokens repeat --out $OUT/$name.json "$@" 2>&1 | grep -v "^\s*$" | tail -6; }
run decode_base --plans dense,$P --contexts 32768,131072
for pick in host device; do
  echo "== batch pick $pick"
  timeout 90 $B/tkv_batch_bench --contexts 32768 --plans dense,$P --batches 1,8 --steps 16 --pick $pick --out $OUT/batch_$pick.json 2>&1 | tail -6
done
