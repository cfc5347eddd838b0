// Batch-1 GEMV for the decode step: y[out] = W[out][in] . x[in], bf16 inputs,
// float32 accumulation. It replaces cublasGemmEx(n = 1) on the projections of
// a decoded token, which are pure weight streams (each weight byte is read
// once per step), so the kernel is built to run at HBM bandwidth: 16-byte
// streaming loads of W that bypass L1, several in flight per thread, x read
// through L1, one warp-shuffle reduction per row.
//
// Launchers validate their arguments before any CUDA call (so validation
// needs no device), launch on `stream`, check the launch, and never allocate
// or synchronize: a decode step that calls them can be captured in a graph.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "absl/status/status.h"

namespace tailorkv::cuda {

// y[r] = sum_k W[r][k] * x[k] for r < out, summed in float32; then
//   y_bf16:                y is bf16 [out], y[r] = bf16_rn(sum)
//   !y_bf16, !accumulate:  y is f32 [out],  y[r] = sum (y is not read; NaN-safe)
//   !y_bf16, accumulate:   y is f32 [out],  y[r] += sum (the residual stream)
// As cublasGemmEx(OP_T, OP_N, out, 1, in, alpha 1, W, ld in, x, beta 0|1, y).
//   w: [out][in] bf16, row-major, 16-byte aligned
//   x: [in] bf16, 16-byte aligned
//   y: [out] bf16 or f32, aligned to its element size; must not overlap w or x
// InvalidArgument (naming the field) for: a null pointer, out < 1, in < 8 or
// not a multiple of 8 (rows are read in 16-byte vectors), w or x not 16-byte
// aligned, y misaligned for its type, accumulate with a bf16 output.
// The summation order is fixed for a given (out, in), so results are
// deterministic run to run.
absl::Status LaunchGemvBf16(const __nv_bfloat16* w, const __nv_bfloat16* x, int out, int in,
                            void* y, bool y_bf16, bool accumulate, cudaStream_t stream);

// The kernel's tuning knobs, exposed for the benchmark's sweep (the launcher
// above picks them from (out, in)). A warp group of `warps_per_row` warps
// shares `rows_per_group` rows, each warp taking an interleaved slice of the
// 16-byte chunks of the row(s); a block holds `groups_per_block` groups.
// Valid: rows_per_group in {1, 2, 4}, warps_per_row in {1, 2, 4},
// unroll in {2, 4, 8} with rows_per_group * unroll <= 8,
// groups_per_block * warps_per_row in [1, 16]. evict_first marks the
// weight loads evict-first in L2.
struct GemvConfig {
  int rows_per_group = 1;
  int warps_per_row = 1;
  int groups_per_block = 4;
  int unroll = 8;
  bool evict_first = false;
};

// The configuration LaunchGemvBf16 uses for (out, in).
GemvConfig DefaultGemvConfig(int out, int in);

// LaunchGemvBf16 with an explicit configuration (InvalidArgument for one
// outside the valid set above).
absl::Status LaunchGemvBf16With(const GemvConfig& config, const __nv_bfloat16* w,
                                const __nv_bfloat16* x, int out, int in, void* y, bool y_bf16,
                                bool accumulate, cudaStream_t stream);

// Batched GEMV for a decode step over several sequences: for b < batch,
//   y[b][r] = sum_k W[r][k] * x[b][k]   (bf16 / f32 / f32 += as above)
// with W read once per pass of up to kGemvMaxBatch rows of x (a batch of 20
// is three passes: 8, 8, 4). Row b's sum is computed exactly as it would be
// alone: each output's summation order depends only on `in`, never on the
// batch, its size or the other rows' values (the batch-invariance that keeps
// a generation's tokens the same alone and batched). It is not the order of
// LaunchGemvBf16, so results may differ from it in the last bits.
//   w: [out][in] bf16, 16-byte aligned
//   x: [batch][in] bf16 rows, 16-byte aligned (in % 8 == 0 keeps every row so)
//   y: [batch][out] bf16 or f32; must not overlap w or x
// InvalidArgument as LaunchGemvBf16, and for batch < 1.
inline constexpr int kGemvMaxBatch = 8;
absl::Status LaunchGemvBatchBf16(const __nv_bfloat16* w, const __nv_bfloat16* x, int batch,
                                 int out, int in, void* y, bool y_bf16, bool accumulate,
                                 cudaStream_t stream);

}  // namespace tailorkv::cuda
