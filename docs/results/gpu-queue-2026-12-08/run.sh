# The GPU runs waiting after 2026-12-08's session, in one call of <= 590 s,
# most needed first; every output goes into $OUT/all.tar.xz (the device
# returns at most 8 files). No model file.
# Bundle: scripts/gpu_mini_bundle.sh tkv_cuda_test tkv_llama_bench tkv_gemv_bench
# (carry .stage/a; .stage/a/cs.tar.xz = compute-sanitizer 13.0 from PyPI).
#  1. the greedy-pick test on the untied model, the quantized GEMV suites
#     with the pipelined kernel's bit-identity test                    ~20 s
#  2. tkv_gemv_bench: the simple and the pipelined quantized GEMV      ~100 s
#  3. decode, Q4_0 layers, simple vs pipelined GEMV, 32k and 128k,
#     dense and the default plan                                       ~100 s
#  4. compute-sanitizer memcheck (leak check) over the kernel suites,
#     then racecheck, in the time left, logs kept
set -u
T0=$(date +%s)
CAP=${CAP:-575}
R=$OUT/r; mkdir -p $R
pack() { (cd $OUT && tar -cf - r | xz -6 > all.tar.xz && rm -rf r); }
mkdir -p /root/mb && xz -dc .stage/a/mb.tar.xz | tar -xf - -C /root/mb
export LD_LIBRARY_PATH=/root/mb/.bundle/lib:/usr/local/cuda/lib64
B=/root/mb/.bundle/bin
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $R/gpu.txt
timeout 90 $B/tkv_cuda_test --gtest_brief=1 --gtest_filter='*DecodeBatchPick*:GemvQuant*:RepackForGemv*' \
  --gtest_output=json:$R/gtest_cuda.json > $R/cuda_test.txt 2>&1
echo "1. tests rc $? ($(( $(date +%s) - T0 )) s)"; grep -E "PASSED|FAILED|tests ran|Failure" $R/cuda_test.txt | tail -12
timeout 150 $B/tkv_gemv_bench --reps 10 --out $R/gemv.json > $R/gemv.txt 2>&1
echo "2. gemv rc $? ($(( $(date +%s) - T0 )) s)"; grep -E "q4_0|q8_0" $R/gemv.txt
P=hybrid:2:896:64:64:32:gpu:late:i8
for k in simple pipelined; do
  timeout 100 $B/tkv_llama_bench --prefill "" --contexts 32768,131072 --plans dense,$P --steps 48 \
    --decode-tokens repeat --layer-weights q4_0 --gemv-quant-kernel $k --out $R/decode_q4_0_$k.json > $R/decode_q4_0_$k.txt 2>&1
  echo "3. decode q4_0 $k rc $? ($(( $(date +%s) - T0 )) s)"; grep -E "^[0-9]" $R/decode_q4_0_$k.txt
done
left=$(( CAP - 15 - ($(date +%s) - T0) ))
if [ $left -gt 60 ]; then
  mkdir -p $R/cs
  M=$(( left * 70 / 100 )); RC=$(( left - 5 )); S=$(( left - 5 ))
  MEMCHECK_S=$M RACECHECK_S=$RC SYNCCHECK_S=$S OUT=$R/cs \
    bash docs/results/compute-sanitizer-2026-12-07/run.sh 2>&1 | grep -E "^(memcheck|racecheck|synccheck)" | tail -40
fi
pack
echo "done in $(( $(date +%s) - T0 )) s"
