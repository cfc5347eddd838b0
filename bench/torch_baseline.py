#!/usr/bin/env python3
"""PyTorch baseline for bench/llama_bench.cc: the same Llama-3.1-8B shape with
random bf16 weights, full bf16 KV cache on the GPU, attention through
torch.nn.functional.scaled_dot_product_attention. Decode is one token against
a static cache of `context` tokens, captured in a CUDA graph and replayed;
prefill is a causal forward over `n` tokens (cache written as it goes).
Times with CUDA events, median of replays. Writes JSON (--out).

  python3 bench/torch_baseline.py --contexts 4096,32768,131072 --prefill 4096,32768 --out b.json
"""
import argparse
import json
import math

import torch
import torch.nn.functional as F

L, H, NH, NKV, HD, FFN, V = 32, 4096, 32, 8, 128, 14336, 128256
EPS = 1e-5


def rmsnorm(x, w):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS) * w).to(torch.bfloat16)


def rope(x, cos, sin):
    # x [..., T, HD]; cos/sin [T, HD/2]; rotate halves (Hugging Face convention).
    x1, x2 = x[..., : HD // 2], x[..., HD // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


class Model:
    def __init__(self, layers, max_pos):
        g = torch.Generator(device="cuda").manual_seed(0)
        def rnd(*shape, scale):
            return (torch.rand(*shape, device="cuda", generator=g, dtype=torch.bfloat16) * 2 - 1) * scale
        s = 1 / math.sqrt(H)
        self.layers = layers
        self.emb = rnd(V, H, scale=1.0)
        self.head = rnd(V, H, scale=s)
        self.final_norm = torch.ones(H, device="cuda")
        self.w = []
        for _ in range(layers):
            self.w.append(dict(
                an=torch.ones(H, device="cuda"), fn=torch.ones(H, device="cuda"),
                qkv=rnd((NH + 2 * NKV) * HD, H, scale=s), o=rnd(H, NH * HD, scale=s),
                gu=rnd(2 * FFN, H, scale=s), down=rnd(H, FFN, scale=1 / math.sqrt(FFN))))
        inv = 1.0 / (500000.0 ** (torch.arange(0, HD, 2, device="cuda").float() / HD))
        ang = torch.arange(max_pos, device="cuda").float()[:, None] * inv[None, :]
        self.cos, self.sin = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)

    def layer_qkv(self, w, x, pos):
        # x [T, H] -> q [1, NH, T, HD], k, v [1, NKV, T, HD] (RoPE applied)
        T = x.shape[0]
        qkv = F.linear(rmsnorm(x, w["an"]), w["qkv"])
        q, k, v = qkv.split([NH * HD, NKV * HD, NKV * HD], dim=-1)
        q = q.view(T, NH, HD).transpose(0, 1)[None]
        k = k.view(T, NKV, HD).transpose(0, 1)[None]
        v = v.view(T, NKV, HD).transpose(0, 1)[None]
        cos, sin = self.cos[pos], self.sin[pos]
        return rope(q, cos, sin), rope(k, cos, sin), v

    def mlp_out(self, w, x, attn):
        T = x.shape[0]
        x = x + F.linear(attn.transpose(1, 2).reshape(T, NH * HD), w["o"])
        gu = F.linear(rmsnorm(x, w["fn"]), w["gu"])
        g, u = gu.split([FFN, FFN], dim=-1)
        return x + F.linear(F.silu(g) * u, w["down"])

    def decode(self, tok, pos, kc, vc):
        x = self.emb[tok]
        for l, w in enumerate(self.w):
            q, k, v = self.layer_qkv(w, x, pos)
            kc[l].index_copy_(2, pos, k)
            vc[l].index_copy_(2, pos, v)
            x = self.mlp_out(w, x, sdpa(q, kc[l], vc[l], causal=False))
        return F.linear(rmsnorm(x, self.final_norm), self.head).float()

    def prefill(self, ids, kc, vc):
        pos = torch.arange(ids.shape[0], device="cuda")
        x = self.emb[ids]
        for l, w in enumerate(self.w):
            q, k, v = self.layer_qkv(w, x, pos)
            kc[l][:, :, : ids.shape[0]] = k
            vc[l][:, :, : ids.shape[0]] = v
            x = self.mlp_out(w, x, sdpa(q, k, v, causal=True))
        return F.linear(rmsnorm(x[-1:], self.final_norm), self.head).float()


def cache(layers, n):
    return ([torch.randn(1, NKV, n, HD, device="cuda", dtype=torch.bfloat16) for _ in range(layers)],
            [torch.randn(1, NKV, n, HD, device="cuda", dtype=torch.bfloat16) for _ in range(layers)])


def time_ms(fn, reps):
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--contexts", default="4096,32768,131072")
    p.add_argument("--prefill", default="4096,32768,131072")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--out", default="")
    a = p.parse_args()
    contexts = [int(c) for c in a.contexts.split(",") if c]
    prefills = [int(c) for c in a.prefill.split(",") if c]
    torch.backends.cuda.matmul.allow_tf32 = False
    model = Model(a.layers, max(contexts + prefills) + 8)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": a.layers,
           "decode": [], "prefill": []}
    print(f"{'context':<10} {'decode ms':>12} {'peak GPU GB':>12}")
    for ctx in contexts:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        kc, vc = cache(a.layers, ctx)
        tok = torch.randint(0, V, (1,), device="cuda")
        pos = torch.tensor([ctx - 1], device="cuda")
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                model.decode(tok, pos, kc, vc)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model.decode(tok, pos, kc, vc)
        for _ in range(5):
            graph.replay()
        ms = time_ms(graph.replay, a.steps)
        peak = torch.cuda.max_memory_allocated() / 1e9
        print(f"{ctx:<10} {ms:12.3f} {peak:12.2f}")
        out["decode"].append({"context": ctx, "ms_per_token_median": ms, "peak_gpu_gb": peak})
        del graph, kc, vc
    print(f"{'prefill':<10} {'seconds':>12} {'peak GPU GB':>12}")
    for n in prefills:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        kc, vc = cache(a.layers, n)
        ids = torch.randint(0, V, (n,), device="cuda")
        with torch.no_grad():
            model.prefill(ids[: min(n, 512)], kc, vc)  # warm-up
            ms = time_ms(lambda: model.prefill(ids, kc, vc), 3 if n <= 32768 else 1)
        peak = torch.cuda.max_memory_allocated() / 1e9
        print(f"{n:<10} {ms / 1e3:12.3f} {peak:12.2f}")
        out["prefill"].append({"tokens": n, "seconds": ms / 1e3, "peak_gpu_gb": peak})
        del kc, vc
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
