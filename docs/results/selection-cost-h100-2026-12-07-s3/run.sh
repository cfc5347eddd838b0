set -u
mkdir -p /root/mb && xz -dc .stage/a/mb.tar.xz | tar -xf - -C /root/mb
export LD_LIBRARY_PATH=/root/mb/.bundle/lib:/usr/local/cuda/lib64
B=/root/mb/.bundle/bin
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
P=hybrid:2:896:64:64:32:gpu:late:i8
T=hybrid:2:896:64:64:32:gpu:i8
run() { local name=$1; shift; echo "== $name: $*"; /usr/bin/time -f "%e s" $B/tkv_llama_bench --prefill "" --decode-tokens repeat --out $OUT/$name.json "$@" 2>&1 | grep -v "^\s*$" | tail -9; }
run decode_base --plans dense,$P,$T --contexts 32768,131072
run decode_lateprefetch --plans $P --contexts 32768,131072 --late-prefetch true
run decode_inline --plans $P,$T --contexts 32768,131072 --sparse-overlap false
run decode_noprio --plans $P,$T --contexts 32768,131072 --sparse-priority false
echo "== ncu"
timeout 200 /usr/local/cuda/bin/ncu --clock-control none --csv --metrics gpu__time_duration.sum --graph-profiling node \
  $B/tkv_batch_bench --contexts 32768 --plans $P --batches 1 --steps 4 > $OUT/ncu_32k_b1.csv 2> $OUT/ncu.err; echo "ncu rc $?"; wc -l $OUT/ncu_32k_b1.csv; xz -9 $OUT/ncu_32k_b1.csv
