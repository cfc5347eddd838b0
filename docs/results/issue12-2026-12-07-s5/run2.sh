# Second call (no model needed): the concurrent timeline of the default plan
# at 128k after the slot pool (CUPTI; scripts/trace_summary.py), then the
# fused Top-K with 512-thread chunks beside the default, dense in the run.
set -u
mkdir -p /root/mb && xz -dc .stage/a/mb.tar.xz | tar -xf - -C /root/mb
export LD_LIBRARY_PATH=/root/mb/.bundle/lib:/usr/local/cuda/lib64
B=/root/mb/.bundle/bin
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
P=hybrid:2:896:64:64:32:gpu:late:i8
T=hybrid:2:896:64:64:32:gpu:i8
mkdir -p $OUT/trace
timeout 200 $B/tkv_llama_bench --prefill "" --decode-tokens repeat --plans dense,$P --contexts 131072 --steps 16 \
  --trace-dir $OUT/trace --out $OUT/decode_traced.json 2>&1 | tail -4
python3 scripts/trace_summary.py $OUT/trace/trace_*.json > $OUT/trace_summary.txt 2>&1; head -60 $OUT/trace_summary.txt
tar -C $OUT -cf - trace | xz -6 > $OUT/traces.tar.xz && rm -rf $OUT/trace
run() { local name=$1; shift; echo "== $name: $*"; timeout 150 $B/tkv_llama_bench --prefill "" --decode-tokens repeat --out $OUT/$name.json "$@" 2>&1 | grep -v "^\s*$" | tail -6; }
run decode_fused512 --plans dense,$P,$T --contexts 131072 --fused-topk true --fused-chunk-threads 512
