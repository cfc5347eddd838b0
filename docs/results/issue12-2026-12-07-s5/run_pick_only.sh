set -u
mkdir -p /root/mb && xz -dc .stage/a/mb.tar.xz | tar -xf - -C /root/mb
export LD_LIBRARY_PATH=/root/mb/.bundle/lib:/usr/local/cuda/lib64
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
timeout 80 /root/mb/.bundle/bin/tkv_cuda_test --gtest_brief=1 --gtest_filter='Sampling*:*DecodeBatchPick*' --gtest_output=json:$OUT/gtest_pick.json > $OUT/cuda_test_pick.txt 2>&1
echo "rc $?"; grep -E "PASSED|FAILED|tests ran|Failure|error" $OUT/cuda_test_pick.txt | head -20
