#!/usr/bin/env bash
# Our CPU backend beside llama.cpp on one machine and one model file, the two
# alternated round by round (issue 19's CPU comparison): prefill tokens/s at
# 512 and 2048, decode tokens/s after 512 and 2048 (64 steps). llama.cpp is
# built from its source release in a scratch folder, never in this repo
# (docs/results.md, "Quantized weights on the CPU", gives the build).
# Usage: scripts/cpu_vs_llamacpp.sh LLAMA_BENCH MODEL OUT_DIR [ROUNDS]
#   env THREADS (2), TKV_CPU_BENCH (build/bench/tkv_cpu_bench)
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 LLAMA_BENCH MODEL OUT_DIR [ROUNDS]" >&2; exit 2; }
lb=$1 model=$2 out=$3 rounds=${4:-2}
bench=${TKV_CPU_BENCH:-build/bench/tkv_cpu_bench}
threads=${THREADS:-2}
mkdir -p "$out"
{ uname -m; grep -m1 "model name" /proc/cpuinfo; nproc; } > "$out/machine.txt"
for r in $(seq 1 "$rounds"); do
  echo "round $r/$rounds (load $(cut -d' ' -f1 /proc/loadavg))" >&2
  for w in quantized float; do
    "$bench" --model "$model" --weights $w --threads "$threads" --prefill 512,2048 --decode-after 512,2048 \
      --decode-steps 64 --runs 1 --out "$out/ours_${w}_r$r.json" > "$out/ours_${w}_r$r.txt" 2>&1
  done
  "$lb" -m "$model" -t "$threads" -p 512,2048 -n 0 -r 1 -o json > "$out/llama_prefill_r$r.json"
  "$lb" -m "$model" -t "$threads" -p 0 -n 64 -d 512,2048 -r 1 -o json > "$out/llama_decode_r$r.json"
done
python3 - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
rows = {}  # (phase, tokens) -> {who: [tokens/s per round]}
def add(key, who, v): rows.setdefault(key, {}).setdefault(who, []).append(v)
for r in range(1, rounds + 1):
    for w in ("quantized", "float"):
        d = json.load(open(f"{out}/ours_{w}_r{r}.json"))
        for p in d["prefill"]: add(("prefill", p["tokens"]), f"ours_{w}", p["tokens_per_s"])
        for p in d["decode"]: add(("decode after", p["context"]), f"ours_{w}", p["tokens_per_s"])
    for p in json.load(open(f"{out}/llama_prefill_r{r}.json")): add(("prefill", p["n_prompt"]), "llama.cpp", p["avg_ts"])
    for p in json.load(open(f"{out}/llama_decode_r{r}.json")): add(("decode after", p["n_depth"]), "llama.cpp", p["avg_ts"])
summary = []
print("| tokens/s (median of %d rounds) | ours, quantized | ours, float32 | llama.cpp | quantized / llama.cpp |" % rounds)
print("|---|---|---|---|---|")
for (phase, n), who in sorted(rows.items()):
    med = {k: statistics.median(v) for k, v in who.items()}
    summary.append({"phase": phase, "tokens": n, **{k: {"median": med[k], "runs": who[k]} for k in who}})
    print(f"| {phase} {n} | {med['ours_quantized']:.1f} | {med['ours_float']:.1f} | {med['llama.cpp']:.1f} | "
          f"{med['ours_quantized'] / med['llama.cpp']:.2f} |")
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
PY
