#!/usr/bin/env python3
"""Writes gpu-worker/tokenizer/testdata/smollm2_tokenizer_golden.json.

The reference is Hugging Face `transformers`/`tokenizers` (an implementation
independent of ours) loading the tokenizer from the GGUF file itself, plus the
`regex` module for the pre-tokenizer splits of the other model families and
jinja2 (through transformers) for chat-template renderings.

One correction is applied to transformers' GGUF conversion, and recorded in
the output: transformers (checked with 5.23) builds every "gpt2"-model GGUF
tokenizer with a bare ByteLevel pre-tokenizer (the GPT-2 regex) and ignores
tokenizer.ggml.pre. SmolLM2's own tokenizer.json (tokenizer.ggml.pre ==
"smollm") runs Digits(individual_digits=True) before ByteLevel, as llama.cpp
does for "smollm". The two agree on most text (the vocabulary has no merges
involving digits) but not on whitespace runs before a digit: "a  1" is
[a, ĠĠ, 1] with the Digits step and [a, Ġ, Ġ, 1] without it. We restore the
model's real pre-tokenizer and store the ids of the unmodified conversion
too, under "ids_transformers_gguf", wherever they differ.

Usage: /tmp/venv/bin/python scripts/make_tokenizer_golden.py [models_dir]
"""

import json
import os
import sys

import regex
import tokenizers
import transformers
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "models")
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = os.path.join(ROOT, "gpu-worker", "tokenizer", "testdata",
                   "smollm2_tokenizer_golden.json")

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces",
    "trailing spaces   ",
    " ",
    "   ",
    "a  1",
    "x   123 456",
    "Numbers: 12345, 3.14, -0.5e10, 1,000,000 and 2024-06-01.",
    "I'm sure you'll see it's what we'd've done; they're, we've, I'd, I'll.",
    "DON'T SHOUT, it'S 'Quoted' text''s",
    "tabs\tand\t\tmore\t\t\ttabs",
    "line one\nline two\n\nline four\n\n\n",
    "windows\r\nline\r\n\r\nendings",
    "mixed \t \n  \t\n whitespace \n",
    "def add(a, b):\n    return a + b  # sum\n\n\nprint(add(1, 2))\n",
    "for (int i = 0; i < n; ++i) { x[i] = y[i] * 2; }",
    "{\"key\": [1, 2, 3], \"nested\": {\"ok\": true, \"v\": null}}",
    "https://example.com/path?q=a+b&x=%20#frag",
    "!!! ??? ... --- ***",
    "你好，世界！这是一个测试。",
    "日本語のテキストとカタカナ、ひらがな。",
    "한국어 텍스트입니다",
    "مرحبا بالعالم، هذا نص عربي.",
    "Привет, мир! Ёжик в тумане.",
    "Ελληνικά γράμματα αβγ",
    "Café naïve résumé façade coöperate Ångström Øre straße",
    "e\u0301 (combining acute) a\u0308\u0304 and n\u0303",
    "Emoji: 😀😃😄 👍🏽 ❤️ 🎉",
    "Family 👨‍👩‍👧‍👦 and 👩🏾‍💻 with ZWJ",
    "Flags 🇯🇵🇺🇸🇫🇷 and 🏴‍☠️",
    "नमस्ते दुनिया",
    "Math: ∑ᵢ xᵢ² ≤ ∞, π ≈ 3.14159, √2, ½ ¾ ⅔",
    "Fullwidth ＡＢＣ１２３ and ideographic\u3000space",
    "no\u00a0break\u00a0space and zero\u200bwidth",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "text<|endoftext|>more <|im_end|>",
    "<|im_start|><|im_start|>",
    "A <repo_name> b <filename>c",
    "<|im_start fake|> <|im_end",
    "\n",
    "a",
    "🤖",
    "~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
]

# Text with bytes SmolLM2's vocabulary has no token for (0x04, 0x06, 0x13,
# 0x14, 0x16, 0x1D; 0xF1 and 0xF2, lead bytes of planes 4-11): the
# reference drops them, so these do not round-trip.
LOSSY_TEXTS = [
    "eot\x04 ack\x06 here",
    "!\x04!",
    "unassigned planes \U00040000 and \U00080001 ok",
    "\x13\x14\x16\x1d",
]

# The pre-tokenizer regexes as published for each family; the C++ splitter is
# hand-written, so these give an independent reference for its splits.
REGEXES = {
    "gpt2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "llama-bpe": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    "qwen2": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
}

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Tell me a joke."},
     {"role": "assistant", "content": "Why did the GPU cross the road?"},
     {"role": "user", "content": "  Why?  \n"}],
    [{"role": "system", "content": ""},
     {"role": "user", "content": "日本語で答えて 🙂"}],
    [{"role": "assistant", "content": "I start."},
     {"role": "user", "content": "ok"}],
]

# Meta's Llama 3 Instruct template (tokenizer_config.json of
# Meta-Llama-3-8B-Instruct), rendered here with bos_token <|begin_of_text|>.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def main():
    tok = AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=MODEL_FILE)
    backend = tok.backend_tokenizer
    converted_pre = json.loads(backend.to_str())["pre_tokenizer"]
    gguf_ids = [tok.encode(t, add_special_tokens=False) for t in TEXTS]

    # Restore SmolLM2's tokenizer.json pre-tokenizer (see module docstring).
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])

    texts = []
    n_differ = 0
    for text, conv_ids in zip(TEXTS, gguf_ids):
        ids = tok.encode(text, add_special_tokens=False)
        entry = {"text": text, "ids": ids}
        if tok.decode(ids, skip_special_tokens=False) != text:
            raise SystemExit(f"reference does not round-trip {text!r}")
        # Special-token text as plain text (our parse_special=false).
        tok.split_special_tokens = True
        plain_ids = tok.encode(text, add_special_tokens=False)
        tok.split_special_tokens = False
        if plain_ids != ids:
            entry["ids_no_special"] = plain_ids
        if conv_ids != ids:
            entry["ids_transformers_gguf"] = conv_ids
            n_differ += 1
        entry["pieces"] = {name: regex.findall(rx, text) for name, rx in REGEXES.items()}
        # tokenizers reports pieces in the byte-level alphabet; the offsets
        # give them back as the original text.
        entry["pieces"]["smollm"] = [
            text[a:b] for _, (a, b) in backend.pre_tokenizer.pre_tokenize_str(text)]
        texts.append(entry)

    lossy = []
    for text in LOSSY_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        if tok.decode(ids) == text:
            raise SystemExit(f"{text!r} unexpectedly round-trips")
        lossy.append({"text": text, "ids": ids, "decoded": tok.decode(ids)})

    chat = []
    for conv in CONVERSATIONS:
        for gen in (True, False):
            rendered = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            chat.append({
                "messages": conv,
                "add_generation_prompt": gen,
                "rendered": rendered,
                "rendered_ids": tok.encode(rendered, add_special_tokens=False),
            })
    llama3 = []
    for conv in CONVERSATIONS:
        for gen in (True, False):
            llama3.append({
                "messages": conv,
                "add_generation_prompt": gen,
                "rendered": tok.apply_chat_template(
                    conv, chat_template=LLAMA3_TEMPLATE, tokenize=False,
                    add_generation_prompt=gen, bos_token="<|begin_of_text|>"),
            })

    out = {
        "generator": "scripts/make_tokenizer_golden.py",
        "model_file": MODEL_FILE,
        "reference": f"transformers {transformers.__version__}, tokenizers "
                     f"{tokenizers.__version__}, regex {regex.__version__}",
        "note": "ids: transformers' GGUF tokenizer with the pre-tokenizer restored to "
                "SmolLM2's Digits(individual_digits)+ByteLevel; ids_transformers_gguf: "
                "the unmodified conversion (pre-tokenizer "
                + json.dumps(converted_pre) + "), present only where it differs. "
                "ids_no_special: special-token text split as plain text, present "
                "only where it differs from ids.",
        "texts": texts,
        "lossy_texts": lossy,
        "chat_template": tok.chat_template,
        "chat": chat,
        "llama3_chat_template": LLAMA3_TEMPLATE,
        "llama3_chat": llama3,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {OUT}: {len(texts)} texts ({n_differ} differ from the unmodified "
          f"GGUF conversion), {len(chat)} ChatML and {len(llama3)} Llama 3 renderings")


if __name__ == "__main__":
    main()
