// Sparse-layer selection indexes on the GPU: the CUDA side of the scoring
// that runtime/sparse_reference.h defines (ChooseChannels, ScoreOnChannels,
// SpeculativeQueryMean) and the CPU backend runs.
//
// Two index families (runtime/cpu_backend.h, "sparse" policy):
//   "gpu"      static critical channels: per KV head, `d` channels chosen
//              once when the prompt ends; those channels of every prompt key
//              kept in device memory ([n_kv][index_rows][d] bf16, 2d bytes a
//              token; FP8 codes in sparse_fp8_kernels.cuh, 4-bit codes in
//              sparse_int4_index_kernels.cuh), scored each step with the
//              speculative (or, by the plan's query, the real) query
//              (LaunchSpeculativeQuery), so nothing but the selected rows
//              crosses PCIe;
//   "faithful" TailorKV's: channels chosen per step from the real query,
//              those channels of the prompt keys read from the host tier's
//              transposed copy ([n_kv][head_dim][kt_cols] bf16).
//
// Scores are fp32 sums in channel order (j = 0..d-1) of round-to-nearest
// products, exactly ScoreOnChannels' arithmetic on bf16 inputs converted to
// fp32, so GPU and CPU pick the same tokens from the same keys.
//
// Every launch: InvalidArgument naming the field for null pointers, n_kv <
// 1, head_dim not in {64, 128}, d outside [1, min(head_dim,
// kSparseMaxChannels)], n_heads not a multiple of n_kv, negative counts;
// n == 0 enqueues nothing. All are graph-capturable (no allocation, no host
// synchronization); positions come from the device where they change per
// step. chans lives on the device, so the host cannot check it: a channel
// outside [0, head_dim) yields NaN (index entry, speculative value, score),
// which ranks lowest, instead of an out-of-bounds read.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"

namespace tailorkv::cuda {

inline constexpr int kSparseMaxChannels = 64;

// q_mean[h * head_dim + c] = mean over the G = n_heads / n_kv query heads of
// KV head h of q[(h G + g) * head_dim + c] (q after RoPE, bf16; fp32 sum in
// g order, then one division by G).
absl::Status LaunchGroupMeanQuery(const __nv_bfloat16* q, int n_heads, int n_kv, int head_dim,
                                  float* q_mean, cudaStream_t stream);

// q_chan[h * d + j] = q_mean[h * head_dim + chans[h * d + j]] with q_mean as
// LaunchGroupMeanQuery computes it (same arithmetic): the real query on the
// fixed channels of index "gpu" (query "real", runtime/kv_plan.h).
absl::Status LaunchGroupMeanOnChannels(const __nv_bfloat16* q, int n_heads, int n_kv,
                                       int head_dim, const int32_t* chans, int d, float* q_chan,
                                       cudaStream_t stream);

// Per KV head, ChooseChannels(q_mean + h * head_dim, max_abs + h * head_dim,
// head_dim, d) into chans[h * d ...] (ascending). Also writes, when q_chan
// is not null, q_chan[h * d + j] = q_mean[h * head_dim + chans[h * d + j]].
absl::Status LaunchChooseChannels(const float* q_mean, const float* max_abs, int n_kv,
                                  int head_dim, int d, int32_t* chans, float* q_chan,
                                  cudaStream_t stream);

// The "gpu" index: index[(h * index_rows + p) * d + j] = K of host row p of
// head h, channel chans[h * d + j], for p < rows (rows <= index_rows,
// rows <= host_rows). Host layout: sparse_tier_kernels.cuh; host must be
// 16-byte aligned (the K halves are read in 16-byte chunks).
absl::Status LaunchBuildChannelIndex(const __nv_bfloat16* host, int64_t host_rows, int rows,
                                     const int32_t* chans, int d, int n_kv, int head_dim,
                                     __nv_bfloat16* index, int64_t index_rows,
                                     cudaStream_t stream);

// SpeculativeQueryMean on the GPU: x [hidden] bf16 (the previous layer's
// normalized input), wq the first n_heads * head_dim rows of the layer's
// QKV weight ([rows][hidden] bf16), position *d_pos, out [n_kv][d] fp32.
// Dot products accumulate in fp32 (in a different order than the CPU: the
// tests bound the difference).
absl::Status LaunchSpeculativeQuery(const __nv_bfloat16* x, const __nv_bfloat16* wq, int hidden,
                                    int n_heads, int n_kv, int head_dim, const int32_t* chans,
                                    int d, const int32_t* d_pos, const float* inv_freq,
                                    bool adjacent_pairs, float* out, cudaStream_t stream);

// The "gpu" index's scores: scores[h * score_stride + i] =
// ScoreOnChannels(q_chan + h * d, index row (first + i) of head h), i < n
// (first + n <= index_rows, n <= score_stride).
// pool (plan refine): null, or [n_kv][n] int32 positions relative to first;
// then score i is of index row first + pool[h * n + i] instead, and an entry
// outside [0, index_rows - first) scores -infinity (so n may pass the end:
// only first <= index_rows is required).
absl::Status LaunchScoreChannelIndex(const float* q_chan, const __nv_bfloat16* index,
                                     int64_t index_rows, int d, int n_kv, int first, int n,
                                     float* scores, int64_t score_stride, cudaStream_t stream,
                                     const int32_t* pool = nullptr);

// The faithful index's scores: scores[h * score_stride + i] = sum over j of
// q_chan[h * d + j] * kt[(h * head_dim + chans[h * d + j]) * kt_cols + first
// + i], in ScoreOnChannels' order and arithmetic; kt read zero-copy from the
// host (coalesced along tokens).
absl::Status LaunchScoreFaithful(const float* q_chan, const int32_t* chans, int d,
                                 const __nv_bfloat16* kt, int64_t kt_cols, int n_kv, int head_dim,
                                 int first, int n, float* scores, int64_t score_stride,
                                 cudaStream_t stream);

}  // namespace tailorkv::cuda
