// The small per-token kernels of a Llama layer on the GPU. Each has a CPU
// reference in runtime/cpu_reference.h (or is trivially checkable) and a GPU
// test in elementwise_kernels_test.cc.
//
// Conventions: the residual stream is float32 [n][hidden]; GEMM inputs are
// bf16, and so are the outputs of the GEMMs that feed RoPE and SwiGLU (the
// projections that add into the residual stream write float32); the KV cache
// is bf16 laid out [kv_head][capacity][head_dim] per layer.
// Launchers validate sizes (InvalidArgument), launch on `stream`, check the
// launch, and never allocate or synchronize.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"

namespace tailorkv::cuda {

// out[i][:] = float(table[ids[i]][:]). ids outside [0, vocab) write zeros
// (callers validate ids on the host; the kernel must not read out of bounds).
//   table: [vocab][hidden] bf16   ids: [n]   out: [n][hidden] f32
absl::Status LaunchEmbedding(const __nv_bfloat16* table, int vocab, const int32_t* ids, int n,
                             int hidden, float* out, cudaStream_t stream);

// out[r][:] = bf16(x[r][:] / sqrt(mean(x[r]^2) + eps) * w[:]), rows r < n.
//   x: [n][hidden] f32   w: [hidden] f32   out: [n][hidden] bf16
absl::Status LaunchRmsNorm(const float* x, const float* w, int n, int hidden, float eps,
                           __nv_bfloat16* out, cudaStream_t stream);

// Splits the fused QKV projection, applies RoPE to Q and K and appends K, V
// to the cache. Token i of the n has position *start_pos + i; start_pos is
// read on the device so a captured decode step replays at any position.
//   qkv:      [n][(n_heads + 2 * n_kv_heads) * head_dim] bf16 (Q | K | V per token)
//   inv_freq: [head_dim / 2] f32 (ref::RopeInvFreq)
//   adjacent_pairs: rotate (x[2i], x[2i+1]) when true, (x[i], x[i+d/2]) when false
//   q_out:    [n][n_heads][head_dim] bf16
//   k_cache, v_cache: [n_kv_heads][capacity][head_dim] bf16 (one layer)
absl::Status LaunchRopeAppendKv(const __nv_bfloat16* qkv, int n, const int32_t* start_pos,
                                int n_heads, int n_kv_heads, int head_dim, const float* inv_freq,
                                bool adjacent_pairs, __nv_bfloat16* q_out, __nv_bfloat16* k_cache,
                                __nv_bfloat16* v_cache, int capacity, cudaStream_t stream);

// out[r][j] = bf16(silu(gate_up[r][j]) * gate_up[r][ffn + j]), in float32
// arithmetic on the bf16 inputs.
//   gate_up: [n][2 * ffn] bf16   out: [n][ffn] bf16
absl::Status LaunchSwiGlu(const __nv_bfloat16* gate_up, int n, int ffn, __nv_bfloat16* out,
                          cudaStream_t stream);

// *out_id = argmax(logits[0..vocab)), lowest id on ties (as runtime::Sampler).
absl::Status LaunchArgmax(const float* logits, int vocab, int32_t* out_id, cudaStream_t stream);

// dst[i] = bf16(src[i]) (round to nearest even), i < n.
absl::Status LaunchF32ToBf16(const float* src, int64_t n, __nv_bfloat16* dst, cudaStream_t stream);

// *value += delta (a device counter, e.g. the position a graph replays at).
absl::Status LaunchAddScalar(int32_t* value, int32_t delta, cudaStream_t stream);

}  // namespace tailorkv::cuda
