// Sparse-layer kernels: batched Top-K token selection and the zero-copy row
// gather from host memory. CPU references (exact): runtime/sparse_reference.h
// (TopKIndices, GatherRows); tests: sparse_kernels_test.cc.
//
// Top-K: `rows` independent rows (one per KV head) of n fp32 scores; each
// row's output is exactly TopKIndices' set (ranking by TopKKey: NaN lowest,
// ties to the smaller index), ascending by index. Radix select over the
// 32-bit ordered keys in three passes (11 + 11 + 10 bits), each a histogram
// in shared memory merged into global memory, the last block of a row
// picking the digit; then a count and an ordered compaction that takes the
// threshold's ties by smallest index. Several blocks per row, six launches,
// no allocation, no host synchronization: capturable in a CUDA graph, with
// the length read from the device (the decode graph replays at growing n).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"

namespace tailorkv::cuda {

// Largest n_max and k LaunchTopK accepts.
inline constexpr int kTopKMaxN = 1 << 24;
inline constexpr int kTopKMaxK = 1 << 24;

// Bytes of the workspace LaunchTopK needs for (rows, n_max); 16-byte
// multiple. The workspace needs no initialization (the launch clears it).
size_t TopKWorkspaceBytes(int rows, int n_max);

// scores: [rows][row_stride] fp32 (row_stride >= n_max), of which the first n
//   of each row count, n = *n_device clamped to [0, n_max] (n = n_max when
//   n_device is null).
// out: [rows][k] int32; row r gets its min(k, n) selected indices ascending,
//   then -1 in the remaining k - min(k, n) entries.
// Errors (field named): rows < 1, n_max outside [0, kTopKMaxN], row_stride <
//   n_max, k outside [0, kTopKMaxK], null pointers, a workspace smaller than
//   TopKWorkspaceBytes(rows, n_max).
absl::Status LaunchTopK(const float* scores, int64_t row_stride, int rows, int n_max,
                        const int32_t* n_device, int k, int32_t* out, void* workspace,
                        size_t workspace_bytes, cudaStream_t stream);

// Zero-copy gather: for head h < heads and i < count,
//   dst[(h * count + i) * row_bytes ...] = src row idx[h * count + i] of head h,
// src row j of head h being src + h * src_head_stride + j * row_bytes.
// src is a device pointer to host memory (cudaHostAlloc'd mapped or
// cudaHostRegister'd, through cudaHostGetDevicePointer or unified
// addressing) or plain device memory. An index outside [0, src_rows) (such
// as the -1 that LaunchTopK writes past min(k, n)) leaves its destination row
// untouched. 16-byte loads and stores, consecutive lanes on consecutive bytes
// of a row, several rows in flight per warp.
// Errors: row_bytes not a positive multiple of 16, src / dst /
// src_head_stride not 16-byte aligned, heads < 1, count < 0, src_rows < 0,
// null pointers.
absl::Status LaunchGatherRows(const void* src, int64_t src_head_stride, int64_t src_rows,
                              int64_t row_bytes, const int32_t* idx, int count, int heads,
                              void* dst, cudaStream_t stream);

}  // namespace tailorkv::cuda
