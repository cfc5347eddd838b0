#!/usr/bin/env python3
"""Baseline for tkv_cpu_bench: the same model, batch 1, run by Hugging Face
transformers + PyTorch on the CPU (float32, SDPA attention, DynamicCache),
measured the way tkv_cpu_bench measures the CPU backend:

  - prefill: one forward over N random token ids (fixed seed), fresh cache,
    last-token logits only; median of --runs runs;
  - decode: an untimed prefill of C tokens, then --decode-steps forwards of
    one token each; tokens/s over all steps and the median step.

Prints a table and writes JSON to --out. No llama.cpp build was available
for this machine (Debian bookworm has no package; PyPI's llama-cpp-python is
source-only), so PyTorch is the well-known CPU engine compared against.

Usage: /path/to/venv/bin/python bench/hf_cpu_baseline.py --threads 2 \
         --out results/hf_cpu_baseline.json
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(REPO, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--prefill", default="512,2048,8192")
    ap.add_argument("--decode-after", default="512,2048")
    ap.add_argument("--decode-steps", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--single-run-above", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", default=os.path.join(REPO, "results", "hf_cpu_baseline.json"))
    args = ap.parse_args()

    import transformers
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(args.threads)
    model_dir, model_file = os.path.split(os.path.abspath(args.model))
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, gguf_file=model_file, dtype=torch.float32, attn_implementation="sdpa").eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)

    def tokens(n):
        return torch.randint(0, vocab, (1, n), generator=gen)

    def prefill(ids, cache):
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits

    print(f"model {args.model}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}, seed {args.seed}")
    load_start = os.getloadavg()[0]
    with torch.inference_mode():
        prefill(tokens(64), DynamicCache())  # warm-up
        print(f"\n{'phase':<8} {'tokens':>8} {'runs':>5} {'median ms':>12} {'tokens/s':>12}")
        prefill_rows = []
        for n in [int(x) for x in args.prefill.split(",") if x]:
            runs = 1 if n > args.single_run_above else args.runs
            ms = []
            for _ in range(runs):
                ids = tokens(n)
                t0 = time.perf_counter()
                prefill(ids, DynamicCache())
                ms.append((time.perf_counter() - t0) * 1e3)
            med = statistics.median(ms)
            print(f"{'prefill':<8} {n:>8} {runs:>5} {med:>12.1f} {n / med * 1e3:>12.1f}", flush=True)
            prefill_rows.append({"tokens": n, "runs": runs, "ms": ms, "median_ms": med,
                                 "tokens_per_s": n / med * 1e3})

        print(f"\n{'phase':<8} {'context':>8} {'steps':>5} {'median ms':>12} {'tokens/s':>12}")
        decode_rows = []
        for ctx in [int(x) for x in args.decode_after.split(",") if x]:
            cache = DynamicCache()
            prefill(tokens(ctx), cache)
            nxt = tokens(args.decode_steps)
            ms = []
            t_all = time.perf_counter()
            for s in range(args.decode_steps):
                t0 = time.perf_counter()
                prefill(nxt[:, s:s + 1], cache)
                ms.append((time.perf_counter() - t0) * 1e3)
            total = (time.perf_counter() - t_all) * 1e3
            med = statistics.median(ms)
            tps = args.decode_steps / total * 1e3
            print(f"{'decode':<8} {ctx:>8} {args.decode_steps:>5} {med:>12.2f} {tps:>12.1f}", flush=True)
            decode_rows.append({"context": ctx, "steps": args.decode_steps, "total_ms": total,
                                "median_step_ms": med, "tokens_per_s": tps,
                                "step_ms": [round(x, 3) for x in ms]})

    result = {"engine": "transformers+torch (CPU, float32, sdpa, DynamicCache)",
              "model": args.model, "threads": torch.get_num_threads(), "seed": args.seed,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "prefill": prefill_rows, "decode": decode_rows,
              "load_average_start": load_start, "load_average_end": os.getloadavg()[0]}
    print(f"\n1-minute load average: {load_start:.2f} at start, {result['load_average_end']:.2f} "
          f"at end ({os.cpu_count()} hardware threads)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
