// The 4-bit selection index of sparse layers (plan index_bits 4,
// runtime/kv_plan.h): KIVI's key quantization of the chosen channels, per
// channel over blocks of kIndexBlock (64) prompt positions. The CPU backend
// holds the same values as floats (runtime/sparse_reference.h,
// RoundIndexBlock4); these kernels reproduce them bit for bit.
//
// Layout, per KV head h of n_kv, for index_rows positions and d channels:
//   codes  [n_kv][index_rows][(d + 1) / 2] bytes: channel j's code in byte
//          j / 2, the low nibble for even j;
//   params [n_kv][index_rows / 64 rounded up][d][2] bf16: the block's zero z
//          and step, so entry = z + code * step (fp32 product, then sum).
// Keys that are NaN are not supported (they quantize to code 0; the CPU
// keeps NaN).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"

namespace tailorkv::cuda {

// Bytes of the two arrays for (n_kv, index_rows, d).
int64_t Int4IndexCodeBytes(int n_kv, int64_t index_rows, int d);
int64_t Int4IndexParamBytes(int n_kv, int64_t index_rows, int d);

// From a bf16 host tier (sparse_tier_kernels.cuh layout, 16-byte aligned):
// the codes and params of positions [0, rows) for the channels chans[h * d
// ...] of each head; the last block may be partial (its min and max over the
// rows that exist). rows <= host_rows, rows <= index_rows. Errors name the
// field (InvalidArgument): n_kv outside [1, 65535], head_dim not 64 or 128,
// d outside [1, min(head_dim, 64)], row counts, null or misaligned pointers.
absl::Status LaunchBuildInt4ChannelIndex(const __nv_bfloat16* host, int64_t host_rows, int rows,
                                         const int32_t* chans, int d, int n_kv, int head_dim,
                                         uint8_t* codes, __nv_bfloat16* params, int64_t index_rows,
                                         cudaStream_t stream);

// scores[h * score_stride + i] = ScoreOnChannels(q_chan + h * d, d, the
// decoded entries of position first + i of head h), i < n: fp32 products and
// sums in channel order, bit-exact with the CPU. pool: as
// LaunchScoreChannelIndex's. Errors as LaunchScoreChannelIndex's.
absl::Status LaunchScoreInt4ChannelIndex(const float* q_chan, const uint8_t* codes,
                                         const __nv_bfloat16* params, int64_t index_rows, int d,
                                         int n_kv, int first, int n, float* scores,
                                         int64_t score_stride, cudaStream_t stream,
                                         const int32_t* pool = nullptr);

}  // namespace tailorkv::cuda
