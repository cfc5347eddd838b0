#include "cuda/sampling_kernels.cuh"

#include <algorithm>
#include <climits>
#include <string>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "cuda/cuda_check.h"

namespace tailorkv::cuda {
namespace {

constexpr int kPickThreads = 1024;

// (value, id) with ties to the lower id; `ok` false for "no candidate yet"
// (a NaN is never a candidate).
struct Best {
  float v;
  int id;
  bool ok;
};

__device__ __forceinline__ Best Better(const Best& a, const Best& b) {
  if (!a.ok) return b;
  if (!b.ok) return a;
  if (b.v > a.v || (b.v == a.v && b.id < a.id)) return b;
  return a;
}

__device__ __forceinline__ float Penalized(float l, const uint32_t* seen, float p, int i) {
  if (seen == nullptr || ((seen[i >> 5] >> (i & 31)) & 1u) == 0) return l;
  return l > 0.0f ? __fdiv_rn(l, p) : __fmul_rn(l, p);
}

__global__ void __launch_bounds__(kPickThreads)
    GreedyPickKernel(const float* __restrict__ logits, int64_t row_stride, int vocab,
                     GreedyPickRows rows, int32_t* __restrict__ out) {
  const int b = blockIdx.x;
  const float* row = logits + b * row_stride;
  const uint32_t* seen = rows.penalty[b] != 1.0f ? rows.seen[b] : nullptr;
  const float p = rows.penalty[b];
  Best best{0.0f, INT_MAX, false};
  for (int i = threadIdx.x; i < vocab; i += kPickThreads) {
    const float v = Penalized(row[i], seen, p, i);
    if (!isnan(v)) best = Better(best, Best{v, i, true});
  }
  // Warp, then block.
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Best o;
    o.v = __shfl_down_sync(0xFFFFFFFFu, best.v, off);
    o.id = __shfl_down_sync(0xFFFFFFFFu, best.id, off);
    o.ok = __shfl_down_sync(0xFFFFFFFFu, best.ok, off);
    best = Better(best, o);
  }
  __shared__ Best warp_best[kPickThreads / 32];
  if ((threadIdx.x & 31) == 0) warp_best[threadIdx.x >> 5] = best;
  __syncthreads();
  if (threadIdx.x != 0) return;
  best = warp_best[0];
  for (int w = 1; w < kPickThreads / 32; ++w) best = Better(best, warp_best[w]);
  // The reference scans from id 0: a NaN there is never beaten.
  const bool first_nan = isnan(Penalized(row[0], seen, p, 0));
  out[b] = (first_nan || !best.ok) ? 0 : best.id;
}

__global__ void MarkSeenKernel(const int32_t* __restrict__ tokens, int n, int vocab,
                               uint32_t* __restrict__ seen) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const int32_t t = tokens[i];
    if (t >= 0 && t < vocab) atomicOr(&seen[t >> 5], 1u << (t & 31));
  }
}

absl::Status Bad(const char* fn, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(fn, ": ", what));
}

}  // namespace

absl::Status LaunchGreedyPick(const float* logits, int64_t row_stride, int n_rows, int vocab,
                              const GreedyPickRows& rows, int32_t* out, cudaStream_t stream) {
  constexpr const char* kFn = "LaunchGreedyPick";
  if (n_rows < 1 || n_rows > kMaxPickRows) {
    return Bad(kFn, absl::StrCat("n_rows = ", n_rows, " outside [1, ", kMaxPickRows, "]"));
  }
  if (vocab < 1) return Bad(kFn, absl::StrCat("vocab = ", vocab, " < 1"));
  if (row_stride < vocab) return Bad(kFn, absl::StrCat("row_stride = ", row_stride, " < vocab = ", vocab));
  if (logits == nullptr) return Bad(kFn, "logits is null");
  if (out == nullptr) return Bad(kFn, "out is null");
  GreedyPickKernel<<<n_rows, kPickThreads, 0, stream>>>(logits, row_stride, vocab, rows, out);
  CUDA_RETURN_IF_LAUNCH_FAILED("GreedyPickKernel");
  return absl::OkStatus();
}

absl::Status LaunchMarkSeen(const int32_t* tokens, int n, int vocab, uint32_t* seen,
                            cudaStream_t stream) {
  constexpr const char* kFn = "LaunchMarkSeen";
  if (n < 0) return Bad(kFn, absl::StrCat("n = ", n, " < 0"));
  if (vocab < 1) return Bad(kFn, absl::StrCat("vocab = ", vocab, " < 1"));
  if (n == 0) return absl::OkStatus();
  if (tokens == nullptr) return Bad(kFn, "tokens is null");
  if (seen == nullptr) return Bad(kFn, "seen is null");
  const int threads = 256;
  const int blocks = std::min((n + threads - 1) / threads, 1024);
  MarkSeenKernel<<<blocks, threads, 0, stream>>>(tokens, n, vocab, seen);
  CUDA_RETURN_IF_LAUNCH_FAILED("MarkSeenKernel");
  return absl::OkStatus();
}

}  // namespace tailorkv::cuda
