// FP8 host tier: the twins of sparse_tier_kernels.cuh's host-row kernels and
// of sparse_index_kernels.cuh's LaunchBuildChannelIndex for a host tier kept
// in FP8 E4M3 (half the bytes of bf16: a 1M-token prompt of an 8B model fits
// the host only this way).
//
// Host tier layout ("fp8 host rows"): as the bf16 one, per KV head,
// `host_rows` rows of 2 * head_dim bytes, K then V; each byte one value in
// OCP FP8 E4M3 (e4m3fn), per value, no scale (256 B a row at head_dim 128).
// The device side (K / V arrays, destinations, the index) stays bf16.
//
// Conversions are runtime/fp8_reference.h's, bit for bit:
//   bf16 -> fp8: FloatToFp8E4M3(float(x)) (round to nearest even, |x| >= 448
//     and +-inf saturate to +-448, NaN -> 0x7F / 0xFF keeping the sign);
//   fp8 -> bf16: exact (Fp8E4M3ToBf16Bits; NaN codes -> 0x7FC0 / 0xFFC0).
//
// Everything else is the bf16 kernels' contract: head strides in elements,
// host_rows in rows, the same index rule for the gather (-1 or out of range
// leaves the destination row untouched), graph-capturable, n == 0 (count ==
// 0, rows == 0) enqueues nothing, InvalidArgument naming the field for null
// pointers, shapes and ranges. Alignment: host, k, v, dst_* 16-byte aligned
// (every host row then is, as 2 * head_dim is a multiple of 16), head
// strides multiples of 8 elements; head_dim a positive multiple of 8 for the
// tier kernels, 64 or 128 for the index build.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"

namespace tailorkv::cuda {

// fp8 host row (first + i) of head h = [fp8(k) | fp8(v)] row (first + i) of
// head h, for i < n. Rows [first, first + n) must lie inside both layouts.
absl::Status LaunchStoreHostRowsFp8(const __nv_bfloat16* k, const __nv_bfloat16* v,
                                    int64_t head_stride, int first, int n, int n_kv, int head_dim,
                                    uint8_t* host, int64_t host_rows, cudaStream_t stream);

// The inverse: k / v row (first + i) of head h = bf16(host row (first + i)).
absl::Status LaunchLoadHostRowsFp8(const uint8_t* host, int64_t host_rows, int first, int n,
                                   int n_kv, int head_dim, __nv_bfloat16* k, __nv_bfloat16* v,
                                   int64_t head_stride, cudaStream_t stream);

// Zero-copy gather (the decode hot path): for h < n_kv, i < count, with
// p = idx[h * count + i] + src_first: when 0 <= idx and p < host_rows,
// dst_k / dst_v row (dst_first + i) of head h = bf16 of the K / V halves of
// fp8 host row p of head h; otherwise that destination row is untouched.
absl::Status LaunchGatherKvRowsFp8(const uint8_t* host, int64_t host_rows, int64_t src_first,
                                   const int32_t* idx, int count, int n_kv, int head_dim,
                                   __nv_bfloat16* dst_k, __nv_bfloat16* dst_v,
                                   int64_t dst_head_stride, int dst_first, cudaStream_t stream);

// LaunchBuildChannelIndex on an fp8 host tier: index[(h * index_rows + p) *
// d + j] = bf16 of K of fp8 host row p of head h, channel chans[h * d + j],
// for p < rows (rows <= index_rows, rows <= host_rows); a channel outside
// [0, head_dim) yields NaN (0x7FC0). Same argument checks.
absl::Status LaunchBuildChannelIndexFp8(const uint8_t* host, int64_t host_rows, int rows,
                                        const int32_t* chans, int d, int n_kv, int head_dim,
                                        __nv_bfloat16* index, int64_t index_rows,
                                        cudaStream_t stream);

// FP8 index entries (plan index_bits 8, runtime/kv_plan.h): as
// LaunchBuildChannelIndex, but each entry is the FP8 E4M3 code of the key
// (round to nearest even, saturating at 448: runtime/fp8_reference.h's
// FloatToFp8E4M3 of the bf16 value); a channel outside [0, head_dim) gives
// the NaN code 0x7F. From bf16 host rows, or from an fp8 host tier (the
// codes copied as they are). Same argument checks.
absl::Status LaunchBuildFp8ChannelIndex(const __nv_bfloat16* host, int64_t host_rows, int rows,
                                        const int32_t* chans, int d, int n_kv, int head_dim,
                                        uint8_t* index, int64_t index_rows, cudaStream_t stream);
absl::Status LaunchBuildFp8ChannelIndexFromFp8(const uint8_t* host, int64_t host_rows, int rows,
                                               const int32_t* chans, int d, int n_kv, int head_dim,
                                               uint8_t* index, int64_t index_rows,
                                               cudaStream_t stream);

// LaunchScoreChannelIndex over an FP8 index: scores[h * score_stride + i] =
// ScoreOnChannels of q_chan[h * d ...] and the decoded codes of index row
// (first + i) of head h (the same fp32 arithmetic, so bit-exact with the
// CPU on the decoded values). pool: as LaunchScoreChannelIndex's. Same
// argument checks.
absl::Status LaunchScoreFp8ChannelIndex(const float* q_chan, const uint8_t* index,
                                        int64_t index_rows, int d, int n_kv, int first, int n,
                                        float* scores, int64_t score_stride, cudaStream_t stream,
                                        const int32_t* pool = nullptr);

}  // namespace tailorkv::cuda
