// Attention over the dense bf16 KV cache on the GPU: a tiled, causal, GQA
// flash-attention kernel for prefill and a split-K flash-decoding kernel for
// decode. CPU reference: runtime::ref::AttentionHead. Tests:
// attention_kernels_test.cc. Softmax scale 1/sqrt(head_dim), fp32 softmax
// and accumulation, bf16 inputs and outputs. Supported head_dim: 64, 128.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"

namespace tailorkv::cuda {

struct AttentionShape {
  int n_heads = 0;     // query heads
  int n_kv_heads = 0;  // n_heads % n_kv_heads == 0; query head h uses KV head h / (n_heads / n_kv_heads)
  int head_dim = 0;    // 64 or 128
  int capacity = 0;    // rows per KV head in the cache
};

// Prefill: query i (0 <= i < n) sits at position start_pos + i and attends to
// cache rows 0 .. start_pos + i (those rows must already hold K/V).
//   q:   [n][n_heads][head_dim] bf16
//   k_cache, v_cache: [n_kv_heads][capacity][head_dim] bf16
//   out: [n][n_heads][head_dim] bf16
absl::Status LaunchPrefillAttention(const __nv_bfloat16* q, const __nv_bfloat16* k_cache,
                                    const __nv_bfloat16* v_cache, int n, int start_pos,
                                    const AttentionShape& shape, __nv_bfloat16* out,
                                    cudaStream_t stream);

// Prefill kernels. kAuto: the fastest one that supports the shape and device
// (wgmma where it runs, else mma.sync).
// kMmaSync: mma.sync (any supported shape, sm_80+). kWgmma: wgmma, Hopper only
// (compute capability 9.0, sm_90a build), head_dim 128; kWgmmaTwoStage: the
// same with two K/V stages instead of three (kept for benchmarks).
enum class PrefillKernel { kAuto, kMmaSync, kWgmma, kWgmmaTwoStage };

// Whether `kernel` runs `shape` on the current device.
bool PrefillKernelSupported(PrefillKernel kernel, const AttentionShape& shape);

// LaunchPrefillAttention with a chosen kernel; FailedPrecondition where
// PrefillKernelSupported is false.
absl::Status LaunchPrefillAttentionWith(PrefillKernel kernel, const __nv_bfloat16* q,
                                        const __nv_bfloat16* k_cache,
                                        const __nv_bfloat16* v_cache, int n, int start_pos,
                                        const AttentionShape& shape, __nv_bfloat16* out,
                                        cudaStream_t stream);

// Bytes of float workspace LaunchDecodeAttention needs for this shape.
size_t DecodeAttentionWorkspaceBytes(const AttentionShape& shape);

// Decode, one query token: attends to cache rows 0 .. *length - 1, where
// `length` is read on the device (so a captured graph replays at any length;
// 1 <= *length <= capacity). The cache is split along tokens into chunks
// processed by separate blocks (split-K), then combined.
//   q:   [n_heads][head_dim] bf16     out: [n_heads][head_dim] bf16
//   workspace: DecodeAttentionWorkspaceBytes(shape) bytes of device memory
absl::Status LaunchDecodeAttention(const __nv_bfloat16* q, const __nv_bfloat16* k_cache,
                                   const __nv_bfloat16* v_cache, const int32_t* length,
                                   const AttentionShape& shape, void* workspace,
                                   __nv_bfloat16* out, cudaStream_t stream);

}  // namespace tailorkv::cuda
