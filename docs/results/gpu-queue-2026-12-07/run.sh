# Every GPU run waiting since 2026-12-07 (no GPU could be had in two
# sessions), in one call of <= 590 s, most needed first. No model file.
# Bundle: scripts/gpu_mini_bundle.sh tkv_cuda_test tkv_llama_bench tkv_batch_bench tkv_gemv_bench
# (carry .stage/a; .stage/a/cs.tar.xz = compute-sanitizer 13.0 from PyPI).
#  1. never-run GPU tests: greedy pick (issue 14), quantized GEMV (issue 19),
#     the sparse tier / FP8 / row reuse suites (issue 12)             ~60 s
#  2. decode: bf16 vs Q4_0 layers, dense vs the default plan, 4k/32k/128k
#     (issues 12 and 19, one run)                                      ~150 s
#  3. the quantized GEMV's bandwidth beside the bf16 one (issue 19)    ~60 s
#  4. batch pick host vs device (issue 14)                             ~60 s
#  5. compute-sanitizer memcheck/racecheck/synccheck (issue 18), the rest
set -u
T0=$(date +%s)
CAP=${CAP:-580}  # seconds for the whole script (the call's limit less 10 s)
mkdir -p /root/mb && xz -dc .stage/a/mb.tar.xz | tar -xf - -C /root/mb
export LD_LIBRARY_PATH=/root/mb/.bundle/lib:/usr/local/cuda/lib64
B=/root/mb/.bundle/bin
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
timeout 120 $B/tkv_cuda_test --gtest_brief=1 \
  --gtest_filter='Sampling*:*DecodeBatchPick*:RepackForGemv*:GemvQuant*:SparseTier*:SparseFp8*:*RowReuse*:-*SmolLM2*' \
  --gtest_output=json:$OUT/gtest_cuda.json > $OUT/cuda_test.txt 2>&1
echo "1. tests rc $? ($(( $(date +%s) - T0 )) s)"; grep -E "PASSED|FAILED|tests ran" $OUT/cuda_test.txt | tail -12
P=hybrid:2:896:64:64:32:gpu:late:i8
for lw in bf16 q4_0; do
  timeout 130 $B/tkv_llama_bench --prefill "" --contexts 4096,32768,131072 --plans dense,$P --steps 48 \
    --decode-tokens repeat --layer-weights $lw --out $OUT/decode_$lw.json > $OUT/decode_$lw.txt 2>&1
  echo "2. decode $lw rc $? ($(( $(date +%s) - T0 )) s)"; grep -v "^\s*$" $OUT/decode_$lw.txt | tail -8
done
timeout 90 $B/tkv_gemv_bench --reps 15 --out $OUT/gemv.json > $OUT/gemv.txt 2>&1
echo "3. gemv rc $? ($(( $(date +%s) - T0 )) s)"; grep -E "q4_0|q8_0" $OUT/gemv.txt
for pick in host device; do
  timeout 45 $B/tkv_batch_bench --contexts 32768 --plans $P --batches 1,8 --steps 16 --pick $pick \
    --out $OUT/batch_$pick.json > $OUT/batch_$pick.txt 2>&1
  echo "4. batch pick $pick rc $?"; tail -3 $OUT/batch_$pick.txt
done
left=$(( CAP - ($(date +%s) - T0) ))
if [ $left -gt 60 ]; then
  mkdir -p $OUT/cs
  M=$(( left * 45 / 100 )); R=$(( left * 75 / 100 )); S=$(( left - 10 ))
  MEMCHECK_S=$M RACECHECK_S=$R SYNCCHECK_S=$S OUT=$OUT/cs \
    bash docs/results/compute-sanitizer-2026-12-07/run.sh 2>&1 | tail -30
fi
# The device returns at most 8 files: everything in one archive.
(cd $OUT && tar -cf - --exclude=all.tar.xz . | xz -6 > all.tar.xz && find . -mindepth 1 ! -name all.tar.xz -delete)
echo "done in $(( $(date +%s) - T0 )) s"
