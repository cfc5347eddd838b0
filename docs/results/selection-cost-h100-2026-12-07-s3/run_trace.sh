set -u
mkdir -p /root/mb2 && xz -dc .stage/a/mb.tar.xz | tar -xf - -C /root/mb2
export LD_LIBRARY_PATH=/root/mb2/.bundle/lib:/usr/local/cuda/lib64
B=/root/mb2/.bundle/bin
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
P=hybrid:2:896:64:64:32:gpu:late:i8
T=hybrid:2:896:64:64:32:gpu:i8
mkdir -p $OUT/trace
$B/tkv_llama_bench --plans dense,$P,$T --contexts 32768,131072 --prefill "" --decode-tokens repeat --steps 16 --trace-dir $OUT/trace --out $OUT/decode_traced.json 2>&1 | grep -v "^\s*$" | tail -80
python3 .stage/a/trace_summary.py $OUT/trace/trace_*.json > $OUT/trace_summary.txt 2>&1; tail -60 $OUT/trace_summary.txt
cd $OUT/trace && tar -cf - . | xz -9 > $OUT/traces.tar.xz && cd / && rm -rf $OUT/trace
