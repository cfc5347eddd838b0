// CPU references for the sparse (Top-K) layers: token selection and row
// gather. The CUDA kernels in cuda/sparse_kernels.cuh reproduce these exactly
// (same set, same order, same bytes) and their tests compare against them.
//
// Ranking rule (the contract, shared with the GPU): each score maps to a
// 32-bit ordered key, TopKKey(x):
//   NaN (any sign or payload) -> 0, the lowest key of all;
//   otherwise the IEEE bits with the sign bit flipped for x >= +0 and all
//   bits flipped for negative x, so keys order like the floats, with
//   -inf < finite < +inf and -0.0 ranking just below +0.0.
// An element a outranks b when key(a) > key(b), or the keys are equal and
// a's index is smaller. The k best elements by this rule are selected and
// written sorted by ascending index (the order the gather reads host memory
// best in). k >= n selects all n.
#pragma once

#include <cstdint>
#include <cstring>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace tailorkv::runtime {

inline uint32_t TopKKey(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0;  // NaN ranks lowest
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Writes the min(k, n) selected indices of scores[0, n) to out, ascending,
// and returns that count. out must hold min(k, n) entries. Errors: n < 0,
// k < 0, null scores (n > 0) or null out (k > 0 and n > 0).
absl::StatusOr<int> TopKIndices(const float* scores, int n, int k, int32_t* out);

// dst row i = src row idx[i] (row_bytes bytes each, byte copies), for i in
// [0, count). Every index must lie in [0, src_rows); duplicates are fine.
// Errors name the field: negative sizes, null pointers, an index out of
// range (nothing is copied then).
absl::Status GatherRows(const void* src, int64_t src_rows, int64_t row_bytes, const int32_t* idx,
                        int count, void* dst);

}  // namespace tailorkv::runtime
