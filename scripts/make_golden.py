#!/usr/bin/env python3
"""Writes tests/golden/smollm2_q4_1_golden.json: reference logits and greedy
continuations for SmolLM2-135M-Instruct (GGUF, Q4_1) computed by Hugging Face
transformers + PyTorch on the CPU, independently of this project's C++ code.

The C++ test tests/golden_logits_test.cc checks the runtime against this file;
CI has no torch, so the JSON is committed and this script is only rerun when
the prompts or the model change.

How the reference is made:
  * transformers dequantizes every GGUF tensor with gguf-py (Q4_1 and Q8_0 to
    float32) and un-permutes the Q/K rows that llama.cpp's converter permuted,
    so the model runs with Hugging Face's "rotate halves" RoPE;
  * the tokenizer is transformers' conversion of the GGUF vocabulary, with one
    repair: transformers has no pre-tokenizer for tokenizer.ggml.pre "smollm"
    and falls back to plain byte-level GPT-2 splitting, while llama.cpp (and
    SmolLM2's own tokenizer.json, Digits(individual_digits=True)) first
    isolate every \p{N} character. The script restores that split; the JSON
    lists the prompts whose ids the unrepaired tokenizer would change;
  * the LlamaForCausalLM forward runs in float32 with eager attention, on the
    CPU, deterministic algorithms, one forward over each whole prompt
    (teacher forcing: the logits at position t predict token t + 1);
  * the same forward in float64 is recorded as a noise floor: the largest
    float32-vs-float64 difference bounds how close two correct float32
    implementations can be expected to agree;
  * greedy continuations use model.generate(do_sample=False) and are checked
    to equal the argmax of a teacher-forced forward over prompt + output.

Usage: /path/to/venv/bin/python scripts/make_golden.py [--model PATH] [--out PATH]
Needs: torch, transformers (>= 4.45, with accelerate), gguf, numpy.
"""
import argparse
import hashlib
import json
import os
import sys

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOP_K = 16
N_FIXED = 16
FIXED_SEED = 20261122
GEN_TOKENS = 64
DECIMALS = 5

# Raw prompts are tokenized with the tokenizer's defaults (SmolLM2 adds no BOS).
RAW_PROMPTS = [
    ("english_paragraph",
     "The lighthouse stood at the edge of the northern cliffs for more than two "
     "hundred years. Generations of keepers climbed its narrow spiral stairs every "
     "evening to light the lamp, polish the great lens, and record the weather in "
     "a leather-bound logbook. When the storms of winter arrived, waves struck the "
     "rocks below with such force that the whole tower trembled, yet the light "
     "never failed. Sailors far out at sea would see its steady beam sweeping "
     "across the dark water and know that they were close to home. In the spring, "
     "the keeper's family planted a small garden behind the cottage"),
    ("python_code",
     "def merge_sorted(a, b):\n"
     "    \"\"\"Merges two sorted lists into one sorted list.\"\"\"\n"
     "    result = []\n"
     "    i, j = 0, 0\n"
     "    while i < len(a) and j < len(b):\n"
     "        if a[i] <= b[j]:\n"
     "            result.append(a[i])\n"
     "            i += 1\n"
     "        else:\n"
     "            result.append(b[j])\n"
     "            j += 1\n"
     "    result.extend(a[i:])\n"
     "    result.extend(b[j:])\n"
     "    return result\n"
     "\n"
     "\n"
     "def binary_search(items, target):\n"
     "    lo, hi = 0, len(items) - 1\n"
     "    while lo <= hi:\n"),
    ("numbers_unicode",
     "Pi is approximately 3.14159265358979, and e is 2.71828. In 2024 the city had "
     "1,234,567 residents; prices rose by 7.5% (from $19.99 to €21.49). "
     "Café, naïve, São Paulo, Zürich, Ελληνικά, русский, 日本語のテキスト, "
     "한국어, emoji: 🙂🚀✨ — done."),
    ("markdown_list",
     "# Packing list for a weekend hike\n\n"
     "1. Water: at least two liters per person.\n"
     "2. Food: sandwiches, nuts, dried fruit and chocolate.\n"
     "3. Clothing: a rain jacket, a warm hat and spare socks.\n"
     "4. Navigation: a paper map, a compass and a charged phone.\n"
     "5."),
    ("short_fact", "The capital of France is"),
]

CHAT_PROMPT = ("chat_story", [
    {"role": "user",
     "content": "Write a long, detailed story about a young girl who finds a "
                "mysterious map in her grandmother's attic. Describe every room "
                "of the old house."},
])

GENERATE_FROM = ["chat_story", "english_paragraph", "python_code", "numbers_unicode"]


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rounded(values):
    return [round(float(v), DECIMALS) for v in values]


def repair_smollm_pre_tokenizer(tok, gguf_path):
    """Gives tok the pre-tokenizer llama.cpp uses for pre == "smollm".

    Returns the GGUF's tokenizer.ggml.pre and whether a repair was made."""
    import gguf
    from tokenizers import Regex, pre_tokenizers

    reader = gguf.GGUFReader(gguf_path)
    pre = reader.fields["tokenizer.ggml.pre"].contents()
    current = json.loads(tok.backend_tokenizer.to_str())["pre_tokenizer"]
    if pre != "smollm" or current.get("type") != "ByteLevel":
        return pre, False
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    return pre, True


def logits_for(model, ids):
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    return out.logits[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(REPO, "models", MODEL_NAME))
    ap.add_argument("--out", default=os.path.join(REPO, "tests", "golden",
                                                  "smollm2_q4_1_golden.json"))
    args = ap.parse_args()

    import gguf
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    model_dir, model_file = os.path.split(os.path.abspath(args.model))
    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=model_file)
    tok_unrepaired = AutoTokenizer.from_pretrained(model_dir, gguf_file=model_file)
    gguf_pre, repaired = repair_smollm_pre_tokenizer(tok, args.model)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, gguf_file=model_file, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    model64 = AutoModelForCausalLM.from_pretrained(
        model_dir, gguf_file=model_file, dtype=torch.float32, attn_implementation="eager")
    model64 = model64.double().eval()
    # The reference must be a plain float32 model: every projection an
    # nn.Linear holding a dequantized float32 weight (no packed GGUF kernels).
    for mod_name, module in model.named_modules():
        if hasattr(module, "weight") and isinstance(module.weight, torch.Tensor):
            assert module.weight.dtype == torch.float32, (mod_name, module.weight.dtype)
        if mod_name.endswith(("_proj", "lm_head")):
            assert type(module) is torch.nn.Linear, (mod_name, type(module))
    vocab = model.config.vocab_size

    rng = np.random.default_rng(FIXED_SEED)
    fixed_ids = sorted(int(i) for i in rng.choice(vocab, size=N_FIXED, replace=False))

    prompts = []
    for name, text in RAW_PROMPTS:
        ids = tok(text).input_ids  # the model's default add_special_tokens
        prompts.append({"name": name, "kind": "raw", "text": text, "ids": ids})
    chat_name, messages = CHAT_PROMPT
    chat_text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The rendered template already holds its special tokens as text; they are
    # parsed as specials and nothing else is added.
    chat_ids = tok(chat_text, add_special_tokens=False).input_ids
    prompts.append({"name": chat_name, "kind": "chat", "messages": messages,
                    "add_generation_prompt": True, "text": chat_text, "ids": chat_ids})

    ids_changed_by_repair = [
        p["name"] for p in prompts
        if tok_unrepaired(p["text"], add_special_tokens=(p["kind"] == "raw")).input_ids != p["ids"]]

    special_ids = set(tok.all_special_ids)
    noise_floor = 0.0
    total_positions = 0
    for p in prompts:
        ids = p["ids"]
        logits = logits_for(model, ids)            # [n, vocab] float32
        logits64 = logits_for(model64, ids)         # [n, vocab] float64
        noise_floor = max(noise_floor, float((logits.double() - logits64).abs().max()))
        lse = torch.logsumexp(logits.double(), dim=-1)
        top_vals, top_ids = torch.topk(logits, TOP_K, dim=-1)
        fixed = logits[:, fixed_ids]
        p["positions"] = {
            "top1": [int(i) for i in logits.argmax(dim=-1)],
            "topk_ids": [[int(i) for i in row] for row in top_ids],
            "topk_logits": [rounded(row) for row in top_vals],
            "fixed_logits": [rounded(row) for row in fixed],
            "logsumexp": rounded(lse),
        }
        total_positions += len(ids)
        print(f"[make_golden] {p['name']}: {len(ids)} tokens, "
              f"argmax[-1]={p['positions']['top1'][-1]!r} "
              f"({tok.decode([p['positions']['top1'][-1]])!r})", file=sys.stderr)

    generations = []
    by_name = {p["name"]: p for p in prompts}
    for name in GENERATE_FROM:
        ids = by_name[name]["ids"]
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids], dtype=torch.long),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False, num_beams=1, repetition_penalty=1.0,
                max_new_tokens=GEN_TOKENS, min_new_tokens=GEN_TOKENS,
                temperature=None, top_p=None, top_k=None, pad_token_id=tok.eos_token_id)
        new_ids = [int(i) for i in out[0, len(ids):]]
        assert len(new_ids) == GEN_TOKENS, (name, len(new_ids))
        # Plain argmax must reproduce the continuation (no logits processor acted,
        # in particular min_new_tokens never had to suppress an end token), so
        # the result does not depend on how a runtime implements ignore_eos.
        full = logits_for(model, ids + new_ids)[len(ids) - 1:-1]
        assert [int(i) for i in full.argmax(dim=-1)] == new_ids, name
        assert not special_ids.intersection(new_ids), (name, new_ids)
        top2 = torch.topk(full, 2, dim=-1).values
        margins = (top2[:, 0] - top2[:, 1]).tolist()
        generations.append({"prompt": name, "new_tokens": GEN_TOKENS, "ids": new_ids,
                            "text": tok.decode(new_ids),
                            "top1_margins": rounded(margins),
                            "min_top1_margin": round(min(margins), DECIMALS)})
        print(f"[make_golden] generate {name}: min margin {min(margins):.4f}: "
              f"{tok.decode(new_ids)!r}", file=sys.stderr)

    # Sanity: the logits are non-trivial and the argmax is plausible.
    assert total_positions >= 300, total_positions
    for p in prompts:
        lg = np.array(p["positions"]["topk_logits"])
        assert np.abs(lg).max() > 1.0 and np.std(lg[:, 0]) > 0.1, p["name"]
    fact = by_name["short_fact"]["positions"]["top1"][-1]
    assert tok.decode([fact]).strip() == "Paris", tok.decode([fact])

    golden = {
        "format_version": 1,
        "model": {"file": MODEL_NAME, "sha256": sha256_of(args.model),
                  "vocab_size": vocab},
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                     "gguf": _gguf_version(), "numpy": np.__version__,
                     "python": sys.version.split()[0]},
        "method": (
            "transformers AutoModelForCausalLM.from_pretrained(gguf_file=...) dequantizes the "
            "GGUF tensors with gguf-py to float32 and un-permutes Q/K (Hugging Face rotate-halves "
            "RoPE). LlamaForCausalLM forward in float32, attn_implementation='eager', CPU, "
            "torch.use_deterministic_algorithms(True), one forward over each whole prompt with "
            "use_cache=False (teacher forcing: row t predicts token t+1). logsumexp is computed in "
            "float64 from the float32 row. Values rounded to 5 decimals. Greedy continuations: "
            "model.generate(do_sample=False, num_beams=1, repetition_penalty=1.0, "
            "max_new_tokens=64, min_new_tokens=64), verified equal to the argmax of a "
            "teacher-forced forward over prompt+output, and containing no special token, so "
            "min_new_tokens never acted. top1_margins: top-1 minus top-2 logit at each step."),
        "tokenizer": {
            "source": "transformers AutoTokenizer.from_pretrained(gguf_file=...)",
            "gguf_pre": gguf_pre,
            "pre_tokenizer_repaired": repaired,
            "note": ("transformers has no pre-tokenizer for GGUF pre 'smollm' and uses plain "
                     "byte-level GPT-2 splitting; llama.cpp's 'smollm' (and SmolLM2's tokenizer.json, "
                     "Digits(individual_digits=True)) first isolates each \\p{N} character, which "
                     "changes e.g. '\\n\\n1.' from [198, 198, 33, ...] to [1116, 33, ...]. The "
                     "stored ids use the repaired tokenizer."),
            "prompts_whose_ids_differ_without_repair": ids_changed_by_repair,
        },
        "reference_noise": {
            "max_abs_logit_diff_float32_vs_float64": round(noise_floor, 7),
            "note": "the same transformers forward in float64; bounds the rounding error of a "
                    "correct float32 implementation",
        },
        "top_k": TOP_K,
        "fixed_ids_seed": FIXED_SEED,
        "fixed_ids": fixed_ids,
        "total_positions": total_positions,
        "prompts": prompts,
        "generations": generations,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(golden, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"[make_golden] wrote {args.out}: {total_positions} positions, "
          f"{os.path.getsize(args.out)} bytes, float32-vs-float64 noise {noise_floor:.2e}",
          file=sys.stderr)


def _gguf_version():
    from importlib.metadata import version
    return version("gguf")


if __name__ == "__main__":
    main()
