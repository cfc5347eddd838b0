// Sparse-layer kernels: batched Top-K token selection and the zero-copy row
// gather from host memory. CPU references (exact): runtime/sparse_reference.h
// (TopKIndices, GatherRows); tests: sparse_kernels_test.cc.
//
// Top-K: `rows` independent rows (one per KV head) of n fp32 scores; each
// row's output is exactly TopKIndices' set (ranking by TopKKey: NaN lowest,
// ties to the smaller index), ascending by index. Two paths, both with no
// allocation and no host synchronization (capturable in a CUDA graph, the
// length read from the device: the decode graph replays at growing n):
// - chunked (k <= 1024 and at most 32768 candidates per row, see
//   TopKUsesChunkedPath): two launches. Blocks of 256 / 512 / 1024 threads
//   each take a chunk of 16 scores per thread, select its exact top-k in
//   shared memory (radix select on the keys) and write them in index order;
//   one block per row then selects the top-k of the row's candidates the
//   same way and writes them already ascending.
// - radix (otherwise): radix select over the 32-bit ordered keys in three
//   passes (11 + 11 + 10 bits), each a histogram in shared memory merged
//   into global memory, the last block of a row picking the digit; then a
//   count and an ordered compaction that takes the threshold's ties by
//   smallest index. Several blocks per row, six launches.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"

namespace tailorkv::cuda {

// Largest n_max and k LaunchTopK accepts.
inline constexpr int kTopKMaxN = 1 << 24;
inline constexpr int kTopKMaxK = 1 << 24;

// Bytes of the workspace LaunchTopK needs for (rows, n_max), either path;
// 16-byte multiple, non-decreasing in n_max. The workspace needs no
// initialization (the launch clears or overwrites what it reads).
size_t TopKWorkspaceBytes(int rows, int n_max);

// Whether LaunchTopK takes the chunked path for (n_max, k).
bool TopKUsesChunkedPath(int n_max, int k);

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

// Knobs for tests and benchmarks that compare the paths; LaunchTopK without
// options uses the defaults.
struct TopKOptions {
  bool radix_only = false;  // take the radix path even where the chunked one applies
  // The chunked path's second launch may start while the first drains
  // (programmatic dependent launch, sm_90+; captured as a programmatic edge).
  bool programmatic_launch = true;
  // Chunked path's stage-1 block (chunk = 16 x threads): 0 chooses by
  // (n_max, k); 256, 512 or 1024 force it where the candidates still fit
  // (else the radix path).
  int chunk_threads = 0;
};
absl::Status LaunchTopK(const float* scores, int64_t row_stride, int rows, int n_max,
                        const int32_t* n_device, int k, int32_t* out, void* workspace,
                        size_t workspace_bytes, cudaStream_t stream, const TopKOptions& options);

// FP8-index scoring fused into the Top-K: the same result as
// LaunchScoreFp8ChannelIndex(q_chan, index, index_rows, d, rows, first, n_max,
// scores, ..., pool = null) followed by LaunchTopK over those scores with
// n_device = null (bit-identical scores, so the same selection), but stage 1
// of the chunked path computes each candidate's score from its index row
// as it reads it: the scores never go through memory and the scoring
// launch is gone. Applies where ScoreFp8TopKApplies(n_max, k, d): d of 16,
// 32 or 64 and the chunked path (TopKUsesChunkedPath). index: [rows][index_rows][d]
// FP8 codes, 16-byte aligned; candidates are index rows [first, first + n_max).
// Errors (InvalidArgument naming the field): LaunchTopK's, a case outside
// the fused path, index_rows < first + n_max, null or misaligned pointers.
bool ScoreFp8TopKApplies(int n_max, int k, int d);
// chunk_threads: 0 chooses stage 1's block by (n_max, k) as LaunchTopK
// does; 256 / 512 / 1024 force it where the candidates still fit (more,
// smaller chunks keep more loads of the index in flight, at the cost of a
// larger stage 2).
absl::Status LaunchScoreFp8TopK(const float* q_chan, const uint8_t* index, int64_t index_rows, int d,
                                int rows, int first, int n_max, int k, int32_t* out, void* workspace,
                                size_t workspace_bytes, cudaStream_t stream, int chunk_threads = 0);

// runtime::MapThroughPool on the device (plan refine: a Top-K over a pool
// of candidates back to their indices): out[r * k + i] = pool[r * n_pool +
// idx[r * k + i]], -1 where idx is outside [0, n_pool). out must not alias
// idx or pool. Errors: rows < 1, k < 0, n_pool < 0, null pointers (k > 0).
absl::Status LaunchMapThroughPool(const int32_t* idx, int k, const int32_t* pool, int n_pool,
                                  int rows, int32_t* out, cudaStream_t stream);

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
