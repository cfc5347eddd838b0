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

}  // namespace tailorkv::runtime::ref
