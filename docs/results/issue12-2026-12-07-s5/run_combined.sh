# One call when device time is short: the greedy-pick GPU tests (issue 14),
# then compute-sanitizer (issue 18) within the rest of the call's budget,
# then the batch bench's host vs device pick if time is left.
set -u
mkdir -p /root/mb && xz -dc .stage/a/mb.tar.xz | tar -xf - -C /root/mb
export LD_LIBRARY_PATH=/root/mb/.bundle/lib:/usr/local/cuda/lib64
B=/root/mb/.bundle/bin
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
timeout 120 $B/tkv_cuda_test --gtest_brief=1 --gtest_filter='Sampling*:*DecodeBatchPick*' \
  --gtest_output=json:$OUT/gtest_pick.json > $OUT/cuda_test_pick.txt 2>&1
echo "tkv_cuda_test (pick) rc $?"; grep -E "PASSED|FAILED|tests ran" $OUT/cuda_test_pick.txt | tail -8
mkdir -p $OUT/cs
MEMCHECK_S=230 RACECHECK_S=330 SYNCCHECK_S=380 OUT=$OUT/cs bash docs/results/compute-sanitizer-2026-12-07/run.sh 2>&1 | tail -40
P=hybrid:2:896:64:64:32:gpu:late:i8
for pick in host device; do
  echo "== batch pick $pick"
  timeout 60 $B/tkv_batch_bench --contexts 32768 --plans $P --batches 1,8 --steps 16 --pick $pick --out $OUT/batch_$pick.json 2>&1 | tail -4
done
