#!/usr/bin/env python3
"""Writes a GGUF file of the "llama" architecture with random weights.

For load and speed measurements at a real model's shape without its weights
(issue 19: peak host memory while loading an 8B-class Q4 file). The linear
weights and the token embedding are written directly as random Q4_0 or Q8_0
blocks (random nibbles / int8 and a small fp16 scale per block: values of
about +-0.01, like a trained model's), never quantized from float32; the
norms are float32 near 1. Tensor by tensor, streaming: the script holds one
tensor in memory at a time (the largest, the 8B shape's token embedding, is
295 MB at Q4_0).

Shapes (--shape):
  llama3-8b  Llama-3.1-8B: 32 layers, hidden 4096, 32 heads / 8 KV heads of
             128, ffn 14336, vocab 128256, rope theta 500000, rms eps 1e-5,
             context 131072; ~4.5 GB at Q4_0. Like a real Llama 3.1 GGUF it
             carries its llama3 RoPE scaling (factor 8, low 1, high 4,
             original context 8192) as the tensor rope_freqs.weight: 64
             float32 factors that divide the frequencies.
  tiny       2 layers, hidden 256, 4 heads / 2 KV heads of 64, ffn 512, vocab
             512, context 2048 (~0.6 MB; for the ctest check).

No tokenizer is written (the vocabulary size is the embedding's row count and
llama.vocab_size): programs that take token ids (tkv_cpu_bench) can load it,
the worker (which tokenizes text) cannot.

Usage: scripts/make_random_gguf.py --out /tmp/llama8b-q4_0.gguf
           [--shape llama3-8b|tiny] [--type q4_0|q8_0|f16|bf16] [--head-type ...]
           [--seed N]
Needs the PyPI packages gguf and numpy. Progress goes to stderr.
"""
import argparse
import os
import sys
import time

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType
from gguf.constants import GGML_QUANT_VERSION

SHAPES = {
    "llama3-8b": dict(name="random Llama-3.1-8B shape", n_layers=32, hidden=4096, n_heads=32,
                      n_kv_heads=8, head_dim=128, ffn=14336, vocab=128256,
                      rope_theta=500000.0, rms_eps=1e-5, context=131072,
                      llama3_rope=dict(factor=8.0, low=1.0, high=4.0, original_context=8192)),
    "tiny": dict(name="random tiny llama", n_layers=2, hidden=256, n_heads=4, n_kv_heads=2,
                 head_dim=64, ffn=512, vocab=512, rope_theta=10000.0, rms_eps=1e-5,
                 context=2048),
}

# type -> (ggml type, file type, block bytes, fp16 scale of a block). Each
# block: fp16 d, then 32 values; Q4_0 dequantizes (q - 8) * d with q a nibble,
# Q8_0 q * d with q an int8. The scales give both about the same spread of
# values (std ~0.012: uniform nibbles -8..7 have std 4.6, int8 ones 73.9).
# f16 / bf16: no blocks; "block bytes" are those of 32 values, the scale is
# the values' std (the same spread).
TYPES = {
    "q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0, 18, 0.02 / 8),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0, 34, 0.02 / 8 * 4.6 / 73.9),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16, 64, 0.012),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16, 64, 0.012),
}
BLOCK = 32  # values per Q4_0 / Q8_0 block

# Rows generated at a time: bounds the temporaries beside the tensor itself.
CHUNK_BLOCKS = 1 << 20


def random_blocks(rng, rows, cols, qtype):
    """A [rows][cols] tensor of random blocks of `qtype`, as uint8 [rows][row bytes]."""
    _, _, block_bytes, scale = TYPES[qtype]
    if cols % BLOCK != 0:
        raise ValueError(f"row length {cols} is not a multiple of {BLOCK}")
    if qtype in ("f16", "bf16"):
        out = np.empty((rows, cols * 2), dtype=np.uint8)
        step = max(1, (CHUNK_BLOCKS * BLOCK) // cols)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            v = rng.normal(0.0, scale, size=(r1 - r0, cols)).astype(np.float32)
            if qtype == "f16":
                h = v.astype("<f2").view(np.uint16)
            else:  # bf16: the top half of the float32, rounded to nearest even
                u = v.view(np.uint32)
                h = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
            out[r0:r1] = h.astype("<u2").view(np.uint8).reshape(r1 - r0, cols * 2)
        return out
    n_blocks = rows * (cols // BLOCK)
    out = np.empty((n_blocks, block_bytes), dtype=np.uint8)
    for b0 in range(0, n_blocks, CHUNK_BLOCKS):
        b1 = min(n_blocks, b0 + CHUNK_BLOCKS)
        part = out[b0:b1]
        # Random bytes: every nibble / int8 value uniform.
        part[:, 2:] = rng.integers(0, 256, size=(b1 - b0, block_bytes - 2), dtype=np.uint8)
        d = (scale * rng.uniform(0.75, 1.25, size=b1 - b0).astype(np.float32)).astype("<f2")
        part[:, :2] = d.view(np.uint8).reshape(-1, 2)
    return out.reshape(rows, (cols // BLOCK) * block_bytes)


def llama3_rope_factors(s):
    """Llama 3.1's RoPE scaling as per-frequency divisors (how Llama 3.x
    GGUFs carry it): 1 for wavelengths shorter than original_context / high,
    `factor` for those longer than original_context / low, and in between the
    inverse of the smooth blend of 1/factor and 1."""
    r = s["llama3_rope"]
    dim = s["head_dim"]
    freqs = 1.0 / (s["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    wavelen = 2 * np.pi / freqs
    out = np.empty(dim // 2, dtype=np.float32)
    for i, wl in enumerate(wavelen):
        if wl < r["original_context"] / r["high"]:
            out[i] = 1.0
        elif wl > r["original_context"] / r["low"]:
            out[i] = r["factor"]
        else:
            smooth = (r["original_context"] / wl - r["low"]) / (r["high"] - r["low"])
            out[i] = 1.0 / ((1 - smooth) / r["factor"] + smooth)
    return out


def random_norm(rng, n):
    return rng.uniform(0.9, 1.1, size=n).astype(np.float32)


def tensor_plan(s, wtype, head_type):
    """(name, kind, shape as {out, in} / {n}, type): the file's tensors in order."""
    q_dim, kv_dim = s["n_heads"] * s["head_dim"], s["n_kv_heads"] * s["head_dim"]
    h, f = s["hidden"], s["ffn"]
    plan = []
    if "llama3_rope" in s:
        plan.append(("rope_freqs.weight", "rope", (s["head_dim"] // 2,), None))
    plan.append(("token_embd.weight", "quant", (s["vocab"], h), wtype))
    for i in range(s["n_layers"]):
        p = f"blk.{i}."
        plan += [
            (p + "attn_norm.weight", "norm", (h,), None),
            (p + "attn_q.weight", "quant", (q_dim, h), wtype),
            (p + "attn_k.weight", "quant", (kv_dim, h), wtype),
            (p + "attn_v.weight", "quant", (kv_dim, h), wtype),
            (p + "attn_output.weight", "quant", (h, q_dim), wtype),
            (p + "ffn_norm.weight", "norm", (h,), None),
            (p + "ffn_gate.weight", "quant", (f, h), wtype),
            (p + "ffn_up.weight", "quant", (f, h), wtype),
            (p + "ffn_down.weight", "quant", (h, f), wtype),
        ]
    plan += [("output_norm.weight", "norm", (h,), None),
             ("output.weight", "quant", (s["vocab"], h), head_type)]
    return plan


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--type", choices=sorted(TYPES), default="q4_0",
                    help="linear weights and token embedding (default q4_0)")
    ap.add_argument("--head-type", choices=sorted(TYPES), default=None,
                    help="output head (default: as --type)")
    ap.add_argument("--out", required=True, help="GGUF file to write")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    head_type = args.head_type or args.type
    s = SHAPES[args.shape]
    rng = np.random.default_rng(args.seed)

    arch = "llama"
    w = GGUFWriter(args.out, arch)
    w.add_string("general.name", s["name"])
    w.add_uint32("general.file_type", int(TYPES[args.type][1]))
    w.add_uint32("general.quantization_version", GGML_QUANT_VERSION)
    # The keys ConfigFromGguf reads (gpu-worker/model/llama_weights.cc).
    w.add_uint32(f"{arch}.block_count", s["n_layers"])
    w.add_uint32(f"{arch}.context_length", s["context"])
    w.add_uint32(f"{arch}.embedding_length", s["hidden"])
    w.add_uint32(f"{arch}.feed_forward_length", s["ffn"])
    w.add_uint32(f"{arch}.attention.head_count", s["n_heads"])
    w.add_uint32(f"{arch}.attention.head_count_kv", s["n_kv_heads"])
    w.add_uint32(f"{arch}.attention.key_length", s["head_dim"])
    w.add_uint32(f"{arch}.attention.value_length", s["head_dim"])
    w.add_uint32(f"{arch}.rope.dimension_count", s["head_dim"])
    w.add_float32(f"{arch}.rope.freq_base", s["rope_theta"])
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", s["rms_eps"])
    w.add_uint32(f"{arch}.vocab_size", s["vocab"])

    plan = tensor_plan(s, args.type, head_type)
    total = 0
    for name, kind, shape, qtype in plan:
        if kind in ("norm", "rope"):
            w.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)
        else:
            rows, cols = shape
            nbytes = rows * (cols // BLOCK) * TYPES[qtype][2]
            # A byte shape [rows][row bytes] of uint8, which the writer turns
            # into the element shape [rows][cols] of `qtype`.
            w.add_tensor_info(name, (rows, nbytes // rows), np.dtype(np.uint8), nbytes,
                              raw_dtype=TYPES[qtype][0])
        total += w.tensors[-1][name].nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    t0 = time.monotonic()
    written = 0
    for i, (name, kind, shape, qtype) in enumerate(plan):
        if kind == "norm":
            data = random_norm(rng, shape[0])
        elif kind == "rope":
            data = llama3_rope_factors(s)
        else:
            data = random_blocks(rng, shape[0], shape[1], qtype)
        w.write_tensor_data(data)
        written += data.nbytes
        del data
        print(f"[{i + 1}/{len(plan)}] {name} {qtype or 'f32'} {list(shape)}: "
              f"{written / 1e6:.1f} / {total / 1e6:.1f} MB, {time.monotonic() - t0:.1f} s",
              file=sys.stderr, flush=True)
    w.close()
    print(f"wrote {args.out}: {len(plan)} tensors, {os.path.getsize(args.out)} bytes "
          f"({args.shape}, {args.type}, head {head_type})", file=sys.stderr)


if __name__ == "__main__":
    main()
