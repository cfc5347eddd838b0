# Third call: decode speed with the defaults (separate scoring and Top-K),
# then fused FP8 scoring + Top-K (chunks by size / of 512 threads), dense in
# the same run. Inputs are
# seeded by the context, so the invocations compare.
set -u
mkdir -p /root/mb && xz -dc .stage/a/mb.tar.xz | tar -xf - -C /root/mb
export LD_LIBRARY_PATH=/root/mb/.bundle/lib:/usr/local/cuda/lib64
B=/root/mb/.bundle/bin
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
P=hybrid:2:896:64:64:32:gpu:late:i8
T=hybrid:2:896:64:64:32:gpu:i8
run() { local name=$1; shift; echo "== $name: $*"; $B/tkv_llama_bench --prefill "" --decode-tokens repeat --out $OUT/$name.json "$@" 2>&1 | grep -v "^\s*$" | tail -9; }
run decode_base --plans dense,$P,$T --contexts 32768,131072
run decode_fused --plans $P,$T --contexts 32768,131072 --fused-topk true
run decode_fused512 --plans $P,$T --contexts 32768,131072 --fused-topk true --fused-chunk-threads 512
# The concurrent timeline of the default plan at 128k (CUPTI; scripts/trace_summary.py).
mkdir -p $OUT/trace
$B/tkv_llama_bench --prefill "" --decode-tokens repeat --plans $P --contexts 131072 --steps 16 \
  --trace-dir $OUT/trace --out $OUT/decode_traced.json 2>&1 | tail -3
python3 scripts/trace_summary.py $OUT/trace/trace_*.json > $OUT/trace_summary.txt 2>&1; head -40 $OUT/trace_summary.txt
tar -C $OUT -cf - trace | xz -6 > $OUT/traces.tar.xz && rm -rf $OUT/trace
