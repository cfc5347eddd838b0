// Plain float32 reference implementations of the transformer's building
// blocks. The CPU backend is built from these, and every CUDA kernel is
// tested against them. All functions are pure and thread-compatible.
#pragma once

#include <cstdint>
#include <vector>

#include "model/llama_weights.h"

namespace tailorkv::runtime::ref {

// out[i] = x[i] / sqrt(mean(x^2) + eps) * w[i], for one row of `n`.
void RmsNorm(const float* x, const float* w, int n, float eps, float* out);

// Rotary inverse frequencies for `head_dim`, with the config's scaling
// (linear or Llama 3), computed in float32 as Hugging Face does.
std::vector<float> RopeInvFreq(const model::ModelConfig& config);

// Rotates one head vector `x` (head_dim) in place for position `pos`.
void ApplyRope(float* x, int head_dim, int pos, const std::vector<float>& inv_freq,
               model::RopeStyle style);

// silu(gate) * up, elementwise; writes into gate.
void SwiGlu(float* gate, const float* up, int64_t n);

// Causal attention of `n_q` query rows (positions start_pos.. start_pos+n_q-1)
// against keys/values 0..start_pos+n_q-1 of one KV head.
//   q:   [n_q][head_dim]      (one query head)
//   k,v: [>= start_pos+n_q][head_dim] (that head's cache, row stride head_dim)
//   out: [n_q][head_dim]
// Softmax in float32 with max subtraction; scale = 1/sqrt(head_dim).
void AttentionHead(const float* q, const float* k, const float* v, int n_q, int start_pos,
                   int head_dim, float* out);

// Fast softmax pieces for the CPU backend's attention; not references (the
// functions above stay exact, with std::exp). Vectorized with OpenMP SIMD and
// cloned for AVX-512 and AVX2, chosen at load time.

// max(x[0..n-1]); -inf for n == 0.
float RowMax(const float* x, int n);

// out[i] = exp(x[i] - shift) for i < n (out may equal x); returns the float
// sum of out. The exp is Cephes' range reduction and degree-7 polynomial:
// max relative error 8.1e-8 against exact exp for results in the normal range
// (x - shift in [-87.33, 88.72]; measured by FastExpMatchesStdExp, which
// requires <= 2e-7). Below that, denormals rounded once; exactly 0 below
// -103.97 and for -inf; +inf above 88.72; NaN in, NaN out. The AVX-512 clone
// contracts to FMA, so its last bit can differ from the AVX2 and SSE2 ones.
float ExpShiftedSum(const float* x, int n, float shift, float* out);

}  // namespace tailorkv::runtime::ref
