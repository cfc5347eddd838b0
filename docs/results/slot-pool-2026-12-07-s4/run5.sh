# Short call (the device budget was nearly spent by failed starts): the new
# kernels' and backend's tests, then batch throughput with the greedy pick
# on the host against on the device (8B shape, 32k, default plan).
set -u
mkdir -p /root/mb && xz -dc .stage/a/mb.tar.xz | tar -xf - -C /root/mb
export LD_LIBRARY_PATH=/root/mb/.bundle/lib:/usr/local/cuda/lib64
B=/root/mb/.bundle/bin
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
timeout 150 $B/tkv_cuda_test --gtest_brief=1 --gtest_filter='Sampling*:*DecodeBatchPick*:SparseTier*:*RowReuse*' \
  --gtest_output=json:$OUT/gtest_cuda.json > $OUT/cuda_test.txt 2>&1
echo "tkv_cuda_test rc $?"; grep -E "PASSED|FAILED|tests ran" $OUT/cuda_test.txt | tail -12
P=hybrid:2:896:64:64:32:gpu:late:i8
for pick in host device; do
  echo "== batch pick $pick"
  timeout 100 $B/tkv_batch_bench --contexts 32768 --plans $P --batches 1,8 --steps 16 --pick $pick --out $OUT/batch_$pick.json 2>&1 | tail -4
done
