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

// The size checks of a selection-index score launch (every index format):
// n_kv heads, d channels of at most max_d, positions [first, first + n) of
// index_rows, n scores a row of score_stride.
// `pooled`: the n scores are of a refine pool's positions, which the kernel
// bounds-checks itself (outside the index: -infinity), so n may pass the
// index's end.
inline absl::Status CheckIndexScore(const char* fn, int n_kv, int d, int max_d, int first, int n,
                                    int64_t index_rows, int64_t score_stride, bool pooled) {
  if (n_kv < 1 || n_kv > 65535) return Bad(fn, "n_kv = ", n_kv, " outside [1, 65535]");
  if (d < 1 || d > max_d) return Bad(fn, "d = ", d, " outside [1, ", max_d, "]");
  if (first < 0) return Bad(fn, "first = ", first, " < 0");
  if (n < 0) return Bad(fn, "n = ", n, " < 0");
  if (first > index_rows) return Bad(fn, "first = ", first, " > index_rows = ", index_rows);
  if (!pooled && static_cast<int64_t>(first) + n > index_rows) {
    return Bad(fn, "first + n = ", static_cast<int64_t>(first) + n, " > index_rows = ", index_rows);
  }
  if (n > score_stride) return Bad(fn, "n = ", n, " > score_stride = ", score_stride);
  return absl::OkStatus();
}

// The checks of a selection-index build from a host tier (every index
// format): shapes, row counts, then (rows > 0) the pointers; host 16-byte
// aligned; `index_field` names the index in the messages.
inline absl::Status CheckIndexBuild(const char* fn, int max_d, const void* host, int64_t host_rows,
                                    int rows, const int32_t* chans, int d, int n_kv, int head_dim,
                                    const void* index, int64_t index_rows,
                                    const char* index_field = "index") {
  if (n_kv < 1 || n_kv > 65535) return Bad(fn, "n_kv = ", n_kv, " outside [1, 65535]");
  if (head_dim != 64 && head_dim != 128) return Bad(fn, "head_dim = ", head_dim, " is not 64 or 128");
  const int d_hi = std::min(head_dim, max_d);
  if (d < 1 || d > d_hi) return Bad(fn, "d = ", d, " outside [1, ", d_hi, "]");
  if (rows < 0) return Bad(fn, "rows = ", rows, " < 0");
  if (rows > host_rows) return Bad(fn, "rows = ", rows, " > host_rows = ", host_rows);
  if (rows > index_rows) return Bad(fn, "rows = ", rows, " > index_rows = ", index_rows);
  if (rows == 0) return absl::OkStatus();
  if (absl::Status s = CheckPtr(fn, "host", host); !s.ok()) return s;
  if (absl::Status s = CheckPtr(fn, "chans", chans, /*need_align16=*/false); !s.ok()) return s;
  return CheckPtr(fn, index_field, index, /*need_align16=*/false);
}

inline absl::Status CheckRange(const char* fn, int first, int n) {
  if (first < 0) return Bad(fn, "first = ", first, " < 0");
  if (n < 0) return Bad(fn, "n = ", n, " < 0");
  return absl::OkStatus();
}

// The whole check of a copy of rows [first, first + n) between a K/V pair
// (head_stride) and a host tier of host_rows rows (LaunchStoreHostRows,
// LaunchLoadHostRows and their FP8 twins). Pointers are checked only when
// there is something to copy, source first (`store`: k, v, then host).
inline absl::Status CheckHostRowsCopy(const char* fn, bool store, int first, int n, int n_kv,
                                      int head_dim, int64_t head_stride, int64_t host_rows,
                                      const void* host, const void* k, const void* v) {
  if (absl::Status s = CheckShape(fn, n_kv, head_dim); !s.ok()) return s;
  if (absl::Status s = CheckRange(fn, first, n); !s.ok()) return s;
  const int64_t end = static_cast<int64_t>(first) + n;
  if (host_rows < end) return Bad(fn, "host_rows = ", host_rows, " < first + n = ", end);
  if (absl::Status s = CheckStride(fn, "head_stride", head_stride, end, head_dim); !s.ok()) return s;
  if (n == 0) return absl::OkStatus();
  if (!store) {
    if (absl::Status s = CheckPtr(fn, "host", host); !s.ok()) return s;
  }
  if (absl::Status s = CheckPtr(fn, "k", k); !s.ok()) return s;
  if (absl::Status s = CheckPtr(fn, "v", v); !s.ok()) return s;
  if (store) return CheckPtr(fn, "host", host);
  return absl::OkStatus();
}

// The whole check of a gather of `count` host rows (LaunchGatherKvRows and
// its FP8 twin); pointers only when count > 0.
inline absl::Status CheckGatherKvRows(const char* fn, int64_t host_rows, int64_t src_first,
                                      int count, int n_kv, int head_dim, int64_t dst_head_stride,
                                      int dst_first, const void* host, const void* idx,
                                      const void* dst_k, const void* dst_v) {
  if (absl::Status s = CheckShape(fn, n_kv, head_dim); !s.ok()) return s;
  if (host_rows < 0) return Bad(fn, "host_rows = ", host_rows, " < 0");
  if (src_first < 0) return Bad(fn, "src_first = ", src_first, " < 0");
  if (count < 0) return Bad(fn, "count = ", count, " < 0");
  if (dst_first < 0) return Bad(fn, "dst_first = ", dst_first, " < 0");
  if (absl::Status s = CheckStride(fn, "dst_head_stride", dst_head_stride,
                                   static_cast<int64_t>(dst_first) + count, head_dim);
      !s.ok()) {
    return s;
  }
  if (count == 0) return absl::OkStatus();
  if (absl::Status s = CheckPtr(fn, "host", host); !s.ok()) return s;
  if (absl::Status s = CheckPtr(fn, "idx", idx, /*need_align16=*/false); !s.ok()) return s;
  if (absl::Status s = CheckPtr(fn, "dst_k", dst_k); !s.ok()) return s;
  return CheckPtr(fn, "dst_v", dst_v);
}

}  // namespace tailorkv::cuda::sparse_launch
