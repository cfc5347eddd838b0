#!/usr/bin/env bash
# scripts/make_random_gguf.py's tiny shape, Q4_0, Q8_0, F16 and BF16, loaded by
# tkv_cpu_bench with quantized and with float weights, prefill and decode.
# The PyPI gguf package (and numpy) come from python3 when it has them, else
# from a virtual environment under the build tree, installed on first use.
# Usage: random_gguf_test.sh VENV_DIR TKV_CPU_BENCH MAKE_RANDOM_GGUF_PY
set -euo pipefail
venv="$1" bench="$2" script="$3"
py=python3
if ! python3 -c "import gguf, numpy" 2>/dev/null; then
  if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import gguf, numpy" 2>/dev/null; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "gguf==0.19.0"
  fi
  py="$venv/bin/python"
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

check() {  # FILE PATTERN: fail unless FILE has a line matching PATTERN
  if ! grep -Eq "$2" "$1"; then
    echo "FAIL: no line matching '$2' in $1:" >&2
    cat "$1" >&2
    exit 1
  fi
}

for type in q4_0 q8_0 f16 bf16; do
  model="$tmp/tiny-$type.gguf"
  "$py" "$script" --shape tiny --type "$type" --seed 7 --out "$model" 2>"$tmp/make-$type.log"
  check "$tmp/make-$type.log" "^\[21/21\] output.weight $type "
  check "$tmp/make-$type.log" "^wrote .*: 21 tensors, [0-9]+ bytes \(tiny, $type, head $type\)"
  for weights in quantized float; do
    out="$tmp/bench-$type-$weights.txt"
    "$bench" --model "$model" --weights "$weights" --threads 2 --prefill 8 --decode-after 8 \
      --decode-steps 2 --runs 1 --out "$tmp/bench.json" >"$out"
    # token embedding, head and 7 linear weights in each of the 2 layers
    if [[ $weights == quantized ]]; then n=16; else n=0; fi
    check "$out" "^weights $weights: $n tensors quantized"
    check "$out" ": 2 layers, hidden 256, heads 4/2 x 64, ffn 512, vocab 512$"
    check "$out" "^prefill +8 +1 "
    check "$out" "^decode +8 +2 "
  done
  echo "ok: $type (quantized and float weights)"
done
