# Last call of the session (little device time left): the greedy-pick GPU
# tests (issue 14), then compute-sanitizer memcheck/racecheck (issue 18) for
# what time remains.
set -u
mkdir -p /root/mb && xz -dc .stage/a/mb.tar.xz | tar -xf - -C /root/mb
export LD_LIBRARY_PATH=/root/mb/.bundle/lib:/usr/local/cuda/lib64
B=/root/mb/.bundle/bin
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
timeout 90 $B/tkv_cuda_test --gtest_brief=1 --gtest_filter='Sampling*:*DecodeBatchPick*' \
  --gtest_output=json:$OUT/gtest_pick.json > $OUT/cuda_test_pick.txt 2>&1
echo "tkv_cuda_test (pick) rc $?"; grep -E "PASSED|FAILED|tests ran" $OUT/cuda_test_pick.txt | tail -8
mkdir -p $OUT/cs
MEMCHECK_S=120 RACECHECK_S=170 SYNCCHECK_S=190 OUT=$OUT/cs bash docs/results/compute-sanitizer-2026-12-07/run.sh 2>&1 | tail -40
