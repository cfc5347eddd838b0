// Plan refine on the device: the position a pooled score reads
// (LaunchScoreChannelIndex's `pool`, shared by every index format).
#pragma once

#include <cstdint>

namespace tailorkv::cuda {

// The index position of score i of head h: first + i without a pool, else
// first + pool[h * n + i]; -1 when that pool entry is outside
// [0, index_rows - first) (the score is then -infinity).
__device__ __forceinline__ int64_t ScoredPosition(const int32_t* __restrict__ pool, int h, int n, int i,
                                                  int64_t index_rows, int first) {
  if (pool == nullptr) return static_cast<int64_t>(first) + i;
  const int64_t rel = pool[static_cast<int64_t>(h) * n + i];
  return (rel < 0 || rel >= index_rows - first) ? -1 : first + rel;
}

}  // namespace tailorkv::cuda
