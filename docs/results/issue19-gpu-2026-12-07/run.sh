# Issue 19's GPU part, for the next GPU call (written 2026-12-07, when no
# GPU could be had): the quantized GEMV's tests, its bandwidth beside the
# bf16 GEMV at the 8B shapes, and decode ms/token with Q4_0 layers beside
# bf16 at 4k/32k/128k, dense and the default hybrid plan, in one run.
# Bundle: scripts/gpu_mini_bundle.sh tkv_cuda_test tkv_llama_bench tkv_batch_bench tkv_gemv_bench
# (carry .stage/a). No model file: the SmolLM2 tests are left for a call
# that stages it (CudaBackendTest.SmolLM2QuantizedLayersFollowTheBf16Layers).
set -u
mkdir -p /root/mb && xz -dc .stage/a/mb.tar.xz | tar -xf - -C /root/mb
export LD_LIBRARY_PATH=/root/mb/.bundle/lib:/usr/local/cuda/lib64
B=/root/mb/.bundle/bin
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
timeout 120 $B/tkv_cuda_test --gtest_brief=1 --gtest_filter='RepackForGemv*:GemvQuant*' \
  --gtest_output=json:$OUT/gtest_quant.json > $OUT/cuda_test_quant.txt 2>&1
echo "quant tests rc $?"; tail -4 $OUT/cuda_test_quant.txt
timeout 150 $B/tkv_gemv_bench --reps 20 --out $OUT/gemv.json > $OUT/gemv.txt 2>&1
echo "gemv bench rc $?"; grep -E "q4_0|q8_0" $OUT/gemv.txt
P=hybrid:2:896:64:64:32:gpu:late:i8
for lw in bf16 q4_0; do
  timeout 170 $B/tkv_llama_bench --contexts 4096,32768,131072 --plans dense,$P --steps 64 \
    --decode-tokens repeat --layer-weights $lw --out $OUT/decode_$lw.json > $OUT/decode_$lw.txt 2>&1
  echo "decode $lw rc $?"; tail -8 $OUT/decode_$lw.txt
done
