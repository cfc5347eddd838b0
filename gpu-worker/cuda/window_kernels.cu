// Row copies of the window policy (contract in window_kernels.cuh).
#include "cuda/window_kernels.cuh"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "cuda/cuda_check.h"

namespace tailorkv::cuda {
namespace {

using bf16 = __nv_bfloat16;

__device__ __forceinline__ int StoreRow(int p, int sink, int recent) {
  return p < sink ? p : sink + (p - sink) % recent;
}

// Copies `count` rows: row i goes from src row src_row(i) to dst row dst_row(i).
// One block per (row, head); threads over head_dim.
__global__ void WindowAppendKernel(const bf16* __restrict__ sk, const bf16* __restrict__ sv,
                                   const int32_t* __restrict__ pos_ptr, WindowShape s,
                                   bf16* __restrict__ dk, bf16* __restrict__ dv,
                                   int32_t* __restrict__ kept) {
  const int pos = *pos_ptr;
  const int h = blockIdx.x;
  if (h == 0 && threadIdx.x == 0) *kept = min(pos + 1, s.rows);
  const int64_t src = (static_cast<int64_t>(h) * s.capacity + pos) * s.head_dim;
  const int64_t dst =
      (static_cast<int64_t>(h) * s.rows + StoreRow(pos, s.sink, s.recent)) * s.head_dim;
  for (int d = threadIdx.x; d < s.head_dim; d += blockDim.x) {
    dk[dst + d] = sk[src + d];
    dv[dst + d] = sv[src + d];
  }
}

// Grid: (h rows, heads). Kept history row i (position i < S ? i : start - h + i)
// from the store into scratch row start - h + i.
__global__ void WindowGatherKernel(const bf16* __restrict__ sk, const bf16* __restrict__ sv, int start,
                                   int hist, WindowShape s, bf16* __restrict__ dk,
                                   bf16* __restrict__ dv) {
  const int i = blockIdx.x, h = blockIdx.y;
  const int p = i < s.sink ? i : start - hist + i;
  const int64_t src = (static_cast<int64_t>(h) * s.rows + StoreRow(p, s.sink, s.recent)) * s.head_dim;
  const int64_t dst = (static_cast<int64_t>(h) * s.capacity + start - hist + i) * s.head_dim;
  for (int d = threadIdx.x; d < s.head_dim; d += blockDim.x) {
    dk[dst + d] = sk[src + d];
    dv[dst + d] = sv[src + d];
  }
}

// Grid: (n rows, heads). Chunk position start + i, if kept, into the store.
__global__ void WindowStoreKernel(const bf16* __restrict__ sk, const bf16* __restrict__ sv, int start,
                                  int n, WindowShape s, bf16* __restrict__ dk,
                                  bf16* __restrict__ dv) {
  const int p = start + blockIdx.x, h = blockIdx.y;
  if (p >= s.sink && p < start + n - s.recent) return;  // evicted within this chunk
  const int64_t src = (static_cast<int64_t>(h) * s.capacity + p) * s.head_dim;
  const int64_t dst = (static_cast<int64_t>(h) * s.rows + StoreRow(p, s.sink, s.recent)) * s.head_dim;
  for (int d = threadIdx.x; d < s.head_dim; d += blockDim.x) {
    dk[dst + d] = sk[src + d];
    dv[dst + d] = sv[src + d];
  }
}

absl::Status Validate(const WindowShape& s, const char* what) {
  if (s.n_kv_heads < 1 || s.head_dim < 1 || s.sink < 0 || s.recent < 1 || s.capacity < 1 ||
      s.rows != std::min(s.sink + s.recent, s.capacity) || s.n_kv_heads > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": bad window shape (n_kv ", s.n_kv_heads, ", head_dim ", s.head_dim, ", sink ",
        s.sink, ", recent ", s.recent, ", rows ", s.rows, ", capacity ", s.capacity, ")"));
  }
  return absl::OkStatus();
}

int Threads(int head_dim) { return std::min(256, (head_dim + 31) / 32 * 32); }

}  // namespace

absl::Status LaunchWindowAppend(const bf16* scratch_k, const bf16* scratch_v, const int32_t* pos,
                                const WindowShape& shape, bf16* store_k, bf16* store_v,
                                int32_t* kept, cudaStream_t stream) {
  if (absl::Status st = Validate(shape, "window append"); !st.ok()) return st;
  if (!scratch_k || !scratch_v || !pos || !store_k || !store_v || !kept) {
    return absl::InvalidArgumentError("window append: null pointer");
  }
  WindowAppendKernel<<<shape.n_kv_heads, Threads(shape.head_dim), 0, stream>>>(
      scratch_k, scratch_v, pos, shape, store_k, store_v, kept);
  CUDA_RETURN_IF_LAUNCH_FAILED("WindowAppendKernel");
  return absl::OkStatus();
}

absl::Status LaunchWindowGatherHistory(const bf16* store_k, const bf16* store_v, int start,
                                       const WindowShape& shape, bf16* scratch_k, bf16* scratch_v,
                                       cudaStream_t stream) {
  if (absl::Status st = Validate(shape, "window gather"); !st.ok()) return st;
  if (start < 0 || start > shape.capacity) {
    return absl::InvalidArgumentError(absl::StrCat("window gather: start ", start));
  }
  const int hist = std::min(start, shape.sink + shape.recent);
  if (hist == 0) return absl::OkStatus();
  if (!store_k || !store_v || !scratch_k || !scratch_v) {
    return absl::InvalidArgumentError("window gather: null pointer");
  }
  WindowGatherKernel<<<dim3(hist, shape.n_kv_heads), Threads(shape.head_dim), 0, stream>>>(
      store_k, store_v, start, hist, shape, scratch_k, scratch_v);
  CUDA_RETURN_IF_LAUNCH_FAILED("WindowGatherKernel");
  return absl::OkStatus();
}

absl::Status LaunchWindowStoreChunk(const bf16* scratch_k, const bf16* scratch_v, int start, int n,
                                    const WindowShape& shape, bf16* store_k, bf16* store_v,
                                    cudaStream_t stream) {
  if (absl::Status st = Validate(shape, "window store"); !st.ok()) return st;
  if (start < 0 || n < 0 || static_cast<int64_t>(start) + n > shape.capacity) {
    return absl::InvalidArgumentError(absl::StrCat("window store: rows [", start, ", ", start + n, ")"));
  }
  if (n == 0) return absl::OkStatus();
  if (!store_k || !store_v || !scratch_k || !scratch_v) {
    return absl::InvalidArgumentError("window store: null pointer");
  }
  WindowStoreKernel<<<dim3(n, shape.n_kv_heads), Threads(shape.head_dim), 0, stream>>>(
      scratch_k, scratch_v, start, n, shape, store_k, store_v);
  CUDA_RETURN_IF_LAUNCH_FAILED("WindowStoreKernel");
  return absl::OkStatus();
}

}  // namespace tailorkv::cuda
