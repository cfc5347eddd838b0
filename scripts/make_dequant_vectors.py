#!/usr/bin/env python3
"""Writes the dequantization test vectors under gpu-worker/model/testdata/.

The expected values come from the PyPI `gguf` package (gguf.quants), an
implementation independent of ours, so the C++ tests compare against a second
opinion rather than against themselves.

Usage: scripts/make_dequant_vectors.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
(needs `pip install gguf numpy`; the model defaults to <repo>/models/...).

File formats (all little-endian):
  dq_<TYPE>.testvec "TKVD" u32 ggml_type u32 n_elems u32 n_src_bytes
                  src bytes, then n_elems float32 (the expected output)
  conv_f32.testvec  "TKVC" u32 n, float32[n] inputs, u16[n] f16 (round to
                  nearest even, numpy), u16[n] bf16 (round to nearest even, gguf)
  real_model_rows.json  for a few tensors of the real model: ggml type, rows,
                  cols, and the SHA-256, sum and nonzero count of the first rows
                  as gguf dequantizes them (float32 little-endian). Digests,
                  not values: no part of the model's weights is committed.
"""
import hashlib
import json
import os
import struct
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.quants import dequantize, quantize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "gpu-worker", "model", "testdata")

# type -> (block elems, block bytes, byte offsets of f16 scale fields)
LAYOUTS = {
    T.F32: (1, 4, []),
    T.F16: (1, 2, []),
    T.BF16: (1, 2, []),
    T.Q4_0: (32, 18, [0]),
    T.Q4_1: (32, 20, [0, 2]),
    T.Q8_0: (32, 34, [0]),
    T.Q4_K: (256, 144, [0, 2]),
    T.Q6_K: (256, 210, [208]),
}
N_BLOCKS = 7          # odd on purpose; the tests also check the 1-block prefix
N_FLOAT_ELEMS = 231   # odd element count for the plain float types


def random_scales(rng, n):
    """Finite f16 scales of both signs, including one subnormal and one zero."""
    mag = rng.uniform(1e-4, 0.25, size=n).astype(np.float32)
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0).astype(np.float32)
    h = (mag * sign).astype(np.float16).view(np.uint16)
    if n > 3:
        h[3] = 0x0005  # subnormal
    if n > 5:
        h[5] = 0x0000
    return h


def make_source(rng, qtype):
    elems, nbytes, scale_offsets = LAYOUTS[qtype]
    if qtype == T.F32:
        vals = (rng.standard_normal(N_FLOAT_ELEMS) * 10.0).astype(np.float32)
        vals[0], vals[1] = np.float32(1e-40), np.float32(-0.0)  # subnormal, -0
        return vals.view(np.uint8), N_FLOAT_ELEMS
    if qtype in (T.F16, T.BF16):
        bits = rng.integers(0, 1 << 16, size=N_FLOAT_ELEMS, dtype=np.uint16)
        exp_mask, exp_shift = (0x7C00, 10) if qtype == T.F16 else (0x7F80, 7)
        all_ones = exp_mask >> exp_shift
        exps = (bits & exp_mask) >> exp_shift
        bits = np.where(exps == all_ones, bits & ~np.uint16(exp_mask), bits).astype(np.uint16)
        bits[0], bits[1] = 0x0001, 0x8000  # smallest subnormal, -0
        return bits.view(np.uint8), N_FLOAT_ELEMS
    raw = rng.integers(0, 256, size=(N_BLOCKS, nbytes), dtype=np.uint8)
    for off in scale_offsets:
        raw[:, off:off + 2] = random_scales(rng, N_BLOCKS).view(np.uint8).reshape(N_BLOCKS, 2)
    return raw.reshape(-1), N_BLOCKS * elems


def write_dequant_vectors(rng):
    for qtype in LAYOUTS:
        src, n = make_source(rng, qtype)
        expected = dequantize(src, qtype).astype(np.float32).reshape(-1)
        assert expected.size == n and np.all(np.isfinite(expected)), qtype.name
        assert np.count_nonzero(expected) > n // 2, qtype.name
        path = os.path.join(OUT, f"dq_{qtype.name}.testvec")
        with open(path, "wb") as f:
            f.write(b"TKVD" + struct.pack("<III", int(qtype), n, src.size))
            f.write(src.tobytes())
            f.write(expected.astype("<f4").tobytes())


def write_conversion_vectors(rng):
    n = 4096
    vals = np.concatenate([
        (rng.standard_normal(n // 2) * 3.0),
        rng.uniform(-70000, 70000, n // 4),       # includes f16 overflow
        rng.uniform(-1e-6, 1e-6, n // 4),         # f16 subnormals / underflow
    ]).astype(np.float32)
    # Exact ties of both rounding directions for f16 (1 + 2^-11, 1 + 3*2^-11)
    # and values just past the f16 maximum.
    vals[:6] = np.array([1 + 2**-11, 1 + 3 * 2**-11, 65504.0, 65519.99, 65520.0, -0.0],
                        dtype=np.float32)
    with np.errstate(over="ignore"):  # overflow to +-inf is part of the test
        f16 = vals.astype(np.float16).view(np.uint16)
    bf16 = quantize(vals, T.BF16).view(np.uint16)
    with open(os.path.join(OUT, "conv_f32.testvec"), "wb") as f:
        f.write(b"TKVC" + struct.pack("<I", n))
        f.write(vals.astype("<f4").tobytes())
        f.write(f16.astype("<u2").tobytes())
        f.write(bf16.astype("<u2").tobytes())


def write_real_digests(model_path):
    reader = GGUFReader(model_path)
    wanted = {"token_embd.weight": 2, "blk.0.attn_q.weight": 2, "blk.0.attn_norm.weight": 1}
    out = {}
    for t in reader.tensors:
        if t.name not in wanted:
            continue
        n_cols = int(t.shape[0])  # ne[0], the contiguous dimension
        rows = wanted[t.name]
        values = dequantize(t.data, t.tensor_type).reshape(-1)[: rows * n_cols]
        values = values.astype("<f4")
        assert np.count_nonzero(values) > 0, t.name
        out[t.name] = {
            "ggml_type": int(t.tensor_type), "rows": rows, "cols": n_cols,
            "sha256": hashlib.sha256(values.tobytes()).hexdigest(),
            "sum": float(values.astype(np.float64).sum()),
            "nonzero": int(np.count_nonzero(values)),
        }
    missing = set(wanted) - set(out)
    assert not missing, missing
    with open(os.path.join(OUT, "real_model_rows.json"), "w") as f:
        json.dump(out, f, indent=2, sort_keys=True)
        f.write("\n")


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(20240611)
    write_dequant_vectors(rng)
    write_conversion_vectors(rng)
    model = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        REPO, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
    write_real_digests(model)
    total = sum(os.path.getsize(os.path.join(OUT, p)) for p in os.listdir(OUT))
    print(f"wrote {len(os.listdir(OUT))} files, {total} bytes, to {OUT}")


if __name__ == "__main__":
    main()
