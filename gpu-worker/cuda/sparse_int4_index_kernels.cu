#include "cuda/sparse_int4_index_kernels.cuh"

#include <algorithm>

#include "cuda/cuda_check.h"
#include "cuda/sparse_index_device.cuh"
#include "cuda/sparse_index_kernels.cuh"  // kSparseMaxChannels
#include "cuda/sparse_launch_checks.h"
#include "runtime/kv_plan.h"              // kIndexBlock

namespace tailorkv::cuda {
namespace {

using bf16 = __nv_bfloat16;
using sparse_launch::Bad;
using sparse_launch::CheckIndexBuild;
using sparse_launch::CheckIndexScore;
using sparse_launch::CheckPtr;

constexpr int kThreads = 256;
constexpr int kBlock = runtime::kIndexBlock;
// Index blocks a score block of kThreads positions can touch.
constexpr int kSpan = kThreads / kBlock + 1;

__device__ __forceinline__ float Bf(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float RoundBf16(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

// RoundIndexBlock4's code of v for (z, step); flat blocks take code 0.
__device__ __forceinline__ uint32_t Code(float v, float z, float step) {
  if (!(step > 0.0f) || !isfinite(step)) return 0;
  const int c = __float2int_rn(__fdiv_rn(__fsub_rn(v, z), step));
  return static_cast<uint32_t>(min(max(c, 0), 15));
}

// Block per (index block of kBlock positions, KV head): the block's K halves
// staged in shared memory (16-byte loads), then a thread per channel finds
// its zero and step, then the codes are packed two a byte.
__global__ void __launch_bounds__(kThreads) BuildInt4IndexKernel(
    const uint4* __restrict__ host, int64_t host_rows, int rows, const int32_t* __restrict__ chans,
    int d, int head_dim, uint8_t* __restrict__ codes, bf16* __restrict__ params, int64_t index_rows) {
  __shared__ uint4 tile[kBlock * 128 / 8];
  __shared__ int ch[kSparseMaxChannels];
  __shared__ float zs[kSparseMaxChannels], ss[kSparseMaxChannels];
  const int h = blockIdx.y;
  const int b = blockIdx.x;
  const int p0 = b * kBlock;
  const int nrows = min(kBlock, rows - p0);
  const int chunks = head_dim / 8;   // 16-byte chunks of a K half
  if (threadIdx.x < d) ch[threadIdx.x] = chans[static_cast<int64_t>(h) * d + threadIdx.x];
  StageKHalves(host, host_rows, h, p0, nrows, chunks, kThreads, tile);
  __syncthreads();
  const bf16* sh = reinterpret_cast<const bf16*>(tile);
  const int64_t n_blocks = (index_rows + kBlock - 1) / kBlock;
  if (threadIdx.x < d) {
    const int j = threadIdx.x;
    const int c = ch[j];
    float lo = INFINITY, hi = -INFINITY;
    if (c >= 0 && c < head_dim) {
      for (int r = 0; r < nrows; ++r) {
        const float v = Bf(sh[r * head_dim + c]);
        if (isnan(v)) continue;
        lo = fminf(lo, v);
        hi = fmaxf(hi, v);
      }
    }
    float z = 0.0f, step = 0.0f;
    if (lo <= hi) {
      z = RoundBf16(lo);
      step = RoundBf16(__fdiv_rn(__fsub_rn(hi, z), 15.0f));
    }
    zs[j] = z;
    ss[j] = step;
    bf16* pr = params + ((static_cast<int64_t>(h) * n_blocks + b) * d + j) * 2;
    pr[0] = __float2bfloat16_rn(z);
    pr[1] = __float2bfloat16_rn(step);
  }
  __syncthreads();
  const int cb = (d + 1) / 2;
  uint8_t* dst = codes + (static_cast<int64_t>(h) * index_rows + p0) * cb;
  for (int t = threadIdx.x; t < nrows * cb; t += kThreads) {
    const int r = t / cb, jb = t - r * cb;
    uint32_t byte = 0;
    for (int e = 0; e < 2; ++e) {
      const int j = 2 * jb + e;
      if (j >= d) break;
      const int c = ch[j];
      const float v = (c >= 0 && c < head_dim) ? Bf(sh[r * head_dim + c]) : 0.0f;
      byte |= Code(v, zs[j], ss[j]) << (4 * e);
    }
    dst[t] = static_cast<uint8_t>(byte);
  }
}

// Thread per (position, KV head). Contiguous positions (kPooled false): the
// zero and step of the index blocks the thread block spans are staged in
// shared memory. Pooled positions (scattered): each thread reads its block's
// from global memory (L2).
template <bool kPooled>
__global__ void __launch_bounds__(kThreads) ScoreInt4IndexKernel(
    const float* __restrict__ q_chan, const uint8_t* __restrict__ codes, const bf16* __restrict__ params,
    int64_t index_rows, int d, int first, int n, const int32_t* __restrict__ pool,
    float* __restrict__ scores, int64_t score_stride) {
  __shared__ float q[kSparseMaxChannels];
  __shared__ float zs[kPooled ? 1 : kSpan][kSparseMaxChannels], ss[kPooled ? 1 : kSpan][kSparseMaxChannels];
  const int h = blockIdx.y;
  const int i0 = blockIdx.x * kThreads;
  const int64_t n_blocks = (index_rows + kBlock - 1) / kBlock;
  const int64_t pos0 = static_cast<int64_t>(first) + i0;
  const int64_t b0 = pos0 / kBlock;
  if (threadIdx.x < d) q[threadIdx.x] = q_chan[static_cast<int64_t>(h) * d + threadIdx.x];
  if constexpr (!kPooled) {
    const int64_t last = static_cast<int64_t>(first) + min(n, i0 + kThreads) - 1;
    const int spans = static_cast<int>(last / kBlock - b0) + 1;
    for (int t = threadIdx.x; t < spans * d; t += kThreads) {
      const int s = t / d, j = t - s * d;
      const bf16* pr = params + ((static_cast<int64_t>(h) * n_blocks + b0 + s) * d + j) * 2;
      zs[s][j] = Bf(pr[0]);
      ss[s][j] = Bf(pr[1]);
    }
  }
  __syncthreads();
  const int i = i0 + threadIdx.x;
  if (i >= n) return;
  const int64_t pos = ScoredPosition(kPooled ? pool : nullptr, h, n, i, index_rows, first);
  if (pos < 0) {
    scores[static_cast<int64_t>(h) * score_stride + i] = -INFINITY;
    return;
  }
  const bf16* pr = params + (static_cast<int64_t>(h) * n_blocks + pos / kBlock) * d * 2;
  const int s = kPooled ? 0 : static_cast<int>(pos / kBlock - b0);
  const int cb = (d + 1) / 2;
  const uint8_t* row = codes + (static_cast<int64_t>(h) * index_rows + pos) * cb;
  float dot = 0.0f;
  for (int jb = 0; jb < cb; ++jb) {
    const uint32_t byte = __ldg(&row[jb]);
    for (int e = 0; e < 2; ++e) {
      const int j = 2 * jb + e;
      if (j >= d) break;
      const float code = static_cast<float>((byte >> (4 * e)) & 0xFu);
      const float z = kPooled ? Bf(pr[2 * j]) : zs[s][j];
      const float step = kPooled ? Bf(pr[2 * j + 1]) : ss[s][j];
      const float v = __fadd_rn(z, __fmul_rn(code, step));
      dot = __fadd_rn(dot, __fmul_rn(q[j], v));
    }
  }
  scores[static_cast<int64_t>(h) * score_stride + i] = dot;
}

}  // namespace

int64_t Int4IndexCodeBytes(int n_kv, int64_t index_rows, int d) {
  return static_cast<int64_t>(n_kv) * index_rows * ((d + 1) / 2);
}

int64_t Int4IndexParamBytes(int n_kv, int64_t index_rows, int d) {
  return static_cast<int64_t>(n_kv) * ((index_rows + kBlock - 1) / kBlock) * d * 2 * sizeof(bf16);
}

absl::Status LaunchBuildInt4ChannelIndex(const bf16* host, int64_t host_rows, int rows,
                                         const int32_t* chans, int d, int n_kv, int head_dim,
                                         uint8_t* codes, bf16* params, int64_t index_rows,
                                         cudaStream_t stream) {
  constexpr const char* kFn = "LaunchBuildInt4ChannelIndex";
  if (absl::Status s = CheckIndexBuild(kFn, kSparseMaxChannels, host, host_rows, rows, chans, d, n_kv,
                                       head_dim, codes, index_rows, "codes");
      !s.ok() || rows == 0) {
    return s;
  }
  if (absl::Status s = CheckPtr(kFn, "params", params, false); !s.ok()) return s;
  const dim3 grid((rows + kBlock - 1) / kBlock, n_kv);
  BuildInt4IndexKernel<<<grid, kThreads, 0, stream>>>(reinterpret_cast<const uint4*>(host), host_rows,
                                                      rows, chans, d, head_dim, codes, params,
                                                      index_rows);
  CUDA_RETURN_IF_LAUNCH_FAILED("BuildInt4IndexKernel");
  return absl::OkStatus();
}

absl::Status LaunchScoreInt4ChannelIndex(const float* q_chan, const uint8_t* codes,
                                         const bf16* params, int64_t index_rows, int d, int n_kv,
                                         int first, int n, float* scores, int64_t score_stride,
                                         cudaStream_t stream, const int32_t* pool) {
  constexpr const char* kFn = "LaunchScoreInt4ChannelIndex";
  if (absl::Status s = CheckIndexScore(kFn, n_kv, d, kSparseMaxChannels, first, n, index_rows, score_stride,
                                       pool != nullptr);
      !s.ok() || n == 0) {
    return s;
  }
  if (absl::Status s = CheckPtr(kFn, "q_chan", q_chan, false); !s.ok()) return s;
  if (absl::Status s = CheckPtr(kFn, "codes", codes, false); !s.ok()) return s;
  if (absl::Status s = CheckPtr(kFn, "params", params, false); !s.ok()) return s;
  if (absl::Status s = CheckPtr(kFn, "scores", scores, false); !s.ok()) return s;
  const dim3 grid((n + kThreads - 1) / kThreads, n_kv);
  if (pool != nullptr) {
    ScoreInt4IndexKernel<true><<<grid, kThreads, 0, stream>>>(q_chan, codes, params, index_rows, d,
                                                              first, n, pool, scores, score_stride);
  } else {
    ScoreInt4IndexKernel<false><<<grid, kThreads, 0, stream>>>(q_chan, codes, params, index_rows, d,
                                                               first, n, nullptr, scores, score_stride);
  }
  CUDA_RETURN_IF_LAUNCH_FAILED("ScoreInt4IndexKernel");
  return absl::OkStatus();
}

}  // namespace tailorkv::cuda
