// Host-side launch helpers shared by the sparse host-tier kernels
// (sparse_tier_kernels.cu and its FP8 twin sparse_fp8_kernels.cu): grid
// sizing for grid-stride loops and the argument checks whose messages the
// headers promise (InvalidArgument "<Launcher>: <field> ...").
#pragma once

#include <algorithm>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cuda/cuda_check.h"

namespace tailorkv::cuda::sparse_launch {

// Grid for a grid-stride loop over `total` items, `unroll` per thread per
// step: one block per threads * unroll items, at least 64 blocks when there
// are that many threads' worth of items (small gathers spread over SMs; the
// reasoning and measurements are LaunchGatherRows'), at most 8 per SM.
inline int StrideBlocks(int64_t total, int unroll, int threads) {
  const int64_t per_block = static_cast<int64_t>(threads) * unroll;
  const int64_t want = std::max<int64_t>((total + per_block - 1) / per_block,
                                         std::min<int64_t>((total + threads - 1) / threads, 64));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, DeviceSmCount() * 8)));
}

inline bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline absl::Status Bad(const char* fn, auto&&... parts) {
  return absl::InvalidArgumentError(absl::StrCat(fn, ": ", parts...));
}

inline absl::Status CheckShape(const char* fn, int n_kv, int head_dim) {
  if (n_kv < 1 || n_kv > 65535) return Bad(fn, "n_kv = ", n_kv, " outside [1, 65535]");
  if (head_dim < 1 || head_dim % 8 != 0) {
    return Bad(fn, "head_dim = ", head_dim, " is not a positive multiple of 8");
  }
  return absl::OkStatus();
}

// A K/V array [n_kv][head_stride / head_dim][head_dim] that must hold rows
// [0, rows_end).
inline absl::Status CheckStride(const char* fn, const char* field, int64_t head_stride,
                                int64_t rows_end, int head_dim) {
  if (head_stride % 8 != 0 || head_stride < rows_end * head_dim) {
    return Bad(fn, field, " = ", head_stride, " is not a multiple of 8 that is >= ", rows_end,
               " rows * head_dim ", head_dim);
  }
  return absl::OkStatus();
}

inline absl::Status CheckPtr(const char* fn, const char* field, const void* p,
                             bool need_align16 = true) {
  if (p == nullptr) return Bad(fn, field, " is null");
  if (need_align16 && !Aligned16(p)) return Bad(fn, field, " is not 16-byte aligned");
  return absl::OkStatus();
}

inline absl::Status CheckRange(const char* fn, int first, int n) {
  if (first < 0) return Bad(fn, "first = ", first, " < 0");
  if (n < 0) return Bad(fn, "n = ", n, " < 0");
  return absl::OkStatus();
}

}  // namespace tailorkv::cuda::sparse_launch
