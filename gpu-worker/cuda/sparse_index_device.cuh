// Device helpers shared by the selection-index kernels of every format
// (sparse_index_kernels.cu, sparse_fp8_kernels.cu, sparse_int4_index_kernels.cu).
#pragma once

#include <cstdint>

namespace tailorkv::cuda {

// An index build's staging: the K halves of host rows [p0, p0 + nrows) of
// head h (host rows are K | V, 2 * chunks 16-byte chunks each, host_rows
// per head) into tile[r * chunks + q], every thread of the block taking a
// stride of `threads`. Coalesced 16-byte loads: zero-copy reads of
// scattered channels would cost a PCIe request each. The caller syncs.
__device__ __forceinline__ void StageKHalves(const uint4* __restrict__ host, int64_t host_rows, int h, int p0,
                                             int nrows, int chunks, int threads, uint4* __restrict__ tile) {
  const int64_t row16 = 2 * chunks;
  const uint4* src = host + (static_cast<int64_t>(h) * host_rows + p0) * row16;
  for (int t = threadIdx.x; t < nrows * chunks; t += threads) {
    const int r = t / chunks, q = t - r * chunks;
    tile[t] = src[r * row16 + q];
  }
}

// Plan refine on the device: the index position of score i of head h: first
// + i without a pool, else first + pool[h * n + i]; -1 when that pool entry
// is outside [0, index_rows - first) (the score is then -infinity).
__device__ __forceinline__ int64_t ScoredPosition(const int32_t* __restrict__ pool, int h, int n, int i,
                                                  int64_t index_rows, int first) {
  if (pool == nullptr) return static_cast<int64_t>(first) + i;
  const int64_t rel = pool[static_cast<int64_t>(h) * n + i];
  return (rel < 0 || rel >= index_rows - first) ? -1 : first + rel;
}

}  // namespace tailorkv::cuda
