#include "cuda/sparse_index_kernels.cuh"

#include <cstdint>

#include "absl/strings/str_cat.h"
#include "cuda/cuda_check.h"
#include "cuda/sparse_index_device.cuh"
#include "cuda/sparse_launch_checks.h"

namespace tailorkv::cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kThreads = 256;
constexpr int kBuildTile = 64;  // host rows per block of the index build

// bf16 -> fp32 is exact: the bf16 bits are the high half of the float.
__device__ __forceinline__ float Lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float Hi(uint32_t w) { return __uint_as_float(w & 0xFFFF0000u); }
__device__ __forceinline__ float Bf(bf16 x) { return __bfloat162float(x); }

// TopKKey (runtime/sparse_reference.h).
__device__ __forceinline__ uint32_t Key(float x) {
  const uint32_t bits = __float_as_uint(x);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0;  // NaN ranks lowest
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

absl::Status CheckShape(const char* fn, int n_kv, int head_dim) {
  if (n_kv < 1 || n_kv > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(fn, ": n_kv = ", n_kv, " outside [1, 65535]"));
  }
  if (head_dim != 64 && head_dim != 128) {
    return absl::InvalidArgumentError(absl::StrCat(fn, ": head_dim = ", head_dim, " is not 64 or 128"));
  }
  return absl::OkStatus();
}

absl::Status CheckD(const char* fn, int d, int head_dim) {
  const int hi = head_dim < kSparseMaxChannels ? head_dim : kSparseMaxChannels;
  if (d < 1 || d > hi) {
    return absl::InvalidArgumentError(absl::StrCat(fn, ": d = ", d, " outside [1, ", hi, "]"));
  }
  return absl::OkStatus();
}

absl::Status Null(const char* fn, const char* field) {
  return absl::InvalidArgumentError(absl::StrCat(fn, ": ", field, " is null"));
}

// ---- Group mean: block per KV head, thread per channel ----
__global__ void GroupMeanKernel(const bf16* __restrict__ q, int group, int head_dim,
                                float* __restrict__ q_mean) {
  const int h = blockIdx.x;
  const int c = threadIdx.x;
  float sum = 0.0f;
  for (int g = 0; g < group; ++g) {
    sum = __fadd_rn(sum, Bf(q[(static_cast<int64_t>(h) * group + g) * head_dim + c]));
  }
  q_mean[static_cast<int64_t>(h) * head_dim + c] = __fdiv_rn(sum, static_cast<float>(group));
}

__global__ void GroupMeanOnChannelsKernel(const bf16* __restrict__ q, int group, int head_dim,
                                          const int32_t* __restrict__ chans, int d,
                                          float* __restrict__ q_chan) {
  const int h = blockIdx.x;
  const int j = threadIdx.x;
  if (j >= d) return;
  const int c = chans[static_cast<int64_t>(h) * d + j];
  if (c < 0 || c >= head_dim) {
    q_chan[static_cast<int64_t>(h) * d + j] = __uint_as_float(0x7FC00000u);  // caller bug: NaN
    return;
  }
  float sum = 0.0f;
  for (int g = 0; g < group; ++g) {
    sum = __fadd_rn(sum, Bf(q[(static_cast<int64_t>(h) * group + g) * head_dim + c]));
  }
  q_chan[static_cast<int64_t>(h) * d + j] = __fdiv_rn(sum, static_cast<float>(group));
}

// ---- Channel choice: block per KV head, thread per channel, rank count ----
__global__ void ChooseChannelsKernel(const float* __restrict__ q_mean,
                                     const float* __restrict__ max_abs, int head_dim, int d,
                                     int32_t* __restrict__ chans, float* __restrict__ q_chan) {
  __shared__ uint32_t key[128];
  __shared__ int sel[128];
  const int h = blockIdx.x;
  const int c = threadIdx.x;
  const int64_t base = static_cast<int64_t>(h) * head_dim;
  const float qm = q_mean[base + c];
  key[c] = Key(__fmul_rn(fabsf(qm), max_abs[base + c]));
  __syncthreads();
  // c's rank: channels with a larger key, or an equal key and a smaller index.
  const uint32_t kc = key[c];
  int rank = 0;
  for (int o = 0; o < head_dim; ++o) {
    const uint32_t ko = key[o];
    rank += (ko > kc) | ((ko == kc) & (o < c));
  }
  const int s = rank < d;
  sel[c] = s;
  __syncthreads();
  if (!s) return;
  int slot = 0;  // selected channels below c: the ascending output position
  for (int o = 0; o < c; ++o) slot += sel[o];
  chans[static_cast<int64_t>(h) * d + slot] = c;
  if (q_chan != nullptr) q_chan[static_cast<int64_t>(h) * d + slot] = qm;
}

// ---- Index build: block per (tile of kBuildTile host rows, KV head) ----
// The K halves of the tile's rows are read whole (coalesced 16-byte loads;
// zero-copy reads of scattered 2-byte channels would cost a PCIe request
// each), staged in shared memory, and the chosen channels written out
// (the tile's index rows are contiguous).
__global__ void __launch_bounds__(kThreads) BuildIndexKernel(
    const uint4* __restrict__ host, int64_t host_rows, int rows, const int32_t* __restrict__ chans,
    int d, int head_dim, bf16* __restrict__ index, int64_t index_rows) {
  __shared__ uint4 tile[kBuildTile * 128 / 8];
  __shared__ int ch[kSparseMaxChannels];
  const int h = blockIdx.y;
  const int p0 = blockIdx.x * kBuildTile;
  const int nrows = min(kBuildTile, rows - p0);
  const int chunks = head_dim / 8;          // 16-byte chunks of a K half
  if (threadIdx.x < d) ch[threadIdx.x] = chans[static_cast<int64_t>(h) * d + threadIdx.x];
  StageKHalves(host, host_rows, h, p0, nrows, chunks, kThreads, tile);
  __syncthreads();
  const bf16* sh = reinterpret_cast<const bf16*>(tile);
  bf16* dst = index + (static_cast<int64_t>(h) * index_rows + p0) * d;
  for (int t = threadIdx.x; t < nrows * d; t += kThreads) {
    const int r = t / d, j = t - r * d;
    const int c = ch[j];
    // A channel outside [0, head_dim) (a caller bug the device cannot
    // report) yields NaN, which scores NaN and so ranks lowest.
    dst[t] = (c >= 0 && c < head_dim) ? sh[r * head_dim + c] : __ushort_as_bfloat16(0x7FC0);
  }
}

// ---- Speculative query: block per (KV head, chosen channel) ----
// The 2G rows (pair members a and b of each query head of the group) are
// spread over the block's warps, one warp per row with 16-byte loads; lane
// partial sums then a butterfly; thread 0 rotates and averages in g order.
template <bool kVec>
__global__ void __launch_bounds__(kThreads) SpecQueryKernel(
    const bf16* __restrict__ x, const bf16* __restrict__ wq, int hidden, int group, int head_dim,
    const int32_t* __restrict__ chans, int d, const int32_t* __restrict__ d_pos,
    const float* __restrict__ inv_freq, bool adjacent_pairs, float* __restrict__ out) {
  extern __shared__ float dots[];  // [2 * group]: (a, b) per g
  const int h = blockIdx.x / d;
  const int j = blockIdx.x - h * d;
  const int c = chans[blockIdx.x];
  if (c < 0 || c >= head_dim) {  // a caller bug the device cannot report: NaN out
    if (threadIdx.x == 0) out[blockIdx.x] = __uint_as_float(0x7FC00000u);
    return;
  }
  const int half = head_dim / 2;
  const int fi = adjacent_pairs ? c / 2 : c % half;
  const int a = adjacent_pairs ? 2 * fi : fi;
  const int b = adjacent_pairs ? 2 * fi + 1 : fi + half;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  constexpr int kWarps = kThreads / 32;
  for (int r = warp; r < 2 * group; r += kWarps) {
    const int g = r / 2;
    const int64_t row = (static_cast<int64_t>(h) * group + g) * head_dim + ((r & 1) ? b : a);
    const bf16* w = wq + row * hidden;
    float s = 0.0f;
    if constexpr (kVec) {
      const uint4* w16 = reinterpret_cast<const uint4*>(w);
      const uint4* x16 = reinterpret_cast<const uint4*>(x);
      const int n16 = hidden / 8;
      int i = lane;
      // 4 loads of the weight row in flight per lane (x is L1/L2-resident).
      for (; i + 96 < n16; i += 128) {
        uint4 wv[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) wv[u] = __ldg(&w16[i + 32 * u]);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const uint4 xv = __ldg(&x16[i + 32 * u]);
          s += Lo(wv[u].x) * Lo(xv.x) + Hi(wv[u].x) * Hi(xv.x);
          s += Lo(wv[u].y) * Lo(xv.y) + Hi(wv[u].y) * Hi(xv.y);
          s += Lo(wv[u].z) * Lo(xv.z) + Hi(wv[u].z) * Hi(xv.z);
          s += Lo(wv[u].w) * Lo(xv.w) + Hi(wv[u].w) * Hi(xv.w);
        }
      }
      for (; i < n16; i += 32) {
        const uint4 wv = __ldg(&w16[i]);
        const uint4 xv = __ldg(&x16[i]);
        s += Lo(wv.x) * Lo(xv.x) + Hi(wv.x) * Hi(xv.x);
        s += Lo(wv.y) * Lo(xv.y) + Hi(wv.y) * Hi(xv.y);
        s += Lo(wv.z) * Lo(xv.z) + Hi(wv.z) * Hi(xv.z);
        s += Lo(wv.w) * Lo(xv.w) + Hi(wv.w) * Hi(xv.w);
      }
    } else {
      for (int i = lane; i < hidden; i += 32) s += Bf(w[i]) * Bf(x[i]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xFFFFFFFFu, s, o);
    if (lane == 0) dots[r] = s;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  // ApplyRope's arithmetic, without contraction (as the CPU reference).
  const float angle = __fmul_rn(static_cast<float>(*d_pos), inv_freq[fi]);
  const float cs = cosf(angle), sn = sinf(angle);
  float sum = 0.0f;
  for (int g = 0; g < group; ++g) {
    const float x0 = dots[2 * g], x1 = dots[2 * g + 1];
    const float v = c == a ? __fsub_rn(__fmul_rn(x0, cs), __fmul_rn(x1, sn))
                           : __fadd_rn(__fmul_rn(x0, sn), __fmul_rn(x1, cs));
    sum = __fadd_rn(sum, v);
  }
  out[static_cast<int64_t>(h) * d + j] = __fdiv_rn(sum, static_cast<float>(group));
}

// ---- "gpu" index scores: thread per (token, KV head) ----
// kChunks > 0: d == 8 * kChunks and 16-byte aligned rows, read as kChunks
// 16-byte loads; kChunks == 0: any d, 2-byte loads.
template <int kChunks>
__global__ void __launch_bounds__(kThreads) ScoreIndexKernel(
    const float* __restrict__ q_chan, const bf16* __restrict__ index, int64_t index_rows, int d,
    int first, int n, const int32_t* __restrict__ pool, float* __restrict__ scores,
    int64_t score_stride) {
  __shared__ float q[kSparseMaxChannels];
  const int h = blockIdx.y;
  if (threadIdx.x < d) q[threadIdx.x] = q_chan[static_cast<int64_t>(h) * d + threadIdx.x];
  __syncthreads();
  const int i = blockIdx.x * kThreads + threadIdx.x;
  if (i >= n) return;
  const int64_t pos = ScoredPosition(pool, h, n, i, index_rows, first);
  if (pos < 0) {
    scores[static_cast<int64_t>(h) * score_stride + i] = -INFINITY;
    return;
  }
  const int64_t row = static_cast<int64_t>(h) * index_rows + pos;
  float dot = 0.0f;
  if constexpr (kChunks > 0) {
    const uint4* r16 = reinterpret_cast<const uint4*>(index) + row * kChunks;
    uint4 v[kChunks];
#pragma unroll
    for (int u = 0; u < kChunks; ++u) v[u] = __ldg(&r16[u]);
#pragma unroll
    for (int u = 0; u < kChunks; ++u) {
      const uint32_t w[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        dot = __fadd_rn(dot, __fmul_rn(q[8 * u + 2 * e], Lo(w[e])));
        dot = __fadd_rn(dot, __fmul_rn(q[8 * u + 2 * e + 1], Hi(w[e])));
      }
    }
  } else {
    const bf16* r = index + row * d;
    float v[kSparseMaxChannels];
#pragma unroll
    for (int j = 0; j < kSparseMaxChannels; ++j) v[j] = j < d ? Bf(r[j]) : 0.0f;
#pragma unroll
    for (int j = 0; j < kSparseMaxChannels; ++j) {
      if (j < d) dot = __fadd_rn(dot, __fmul_rn(q[j], v[j]));
    }
  }
  scores[static_cast<int64_t>(h) * score_stride + i] = dot;
}

// ---- Faithful scores: thread per (token, KV head), kt read zero-copy ----
// Consecutive threads read consecutive tokens of each channel row (coalesced);
// all d loads are issued before the sum so the PCIe latency overlaps.
__global__ void __launch_bounds__(kThreads) ScoreFaithfulKernel(
    const float* __restrict__ q_chan, const int32_t* __restrict__ chans, int d,
    const bf16* __restrict__ kt, int64_t kt_cols, int head_dim, int first, int n,
    float* __restrict__ scores, int64_t score_stride) {
  __shared__ float q[kSparseMaxChannels];
  __shared__ int ch[kSparseMaxChannels];
  const int h = blockIdx.y;
  if (threadIdx.x < d) {
    q[threadIdx.x] = q_chan[static_cast<int64_t>(h) * d + threadIdx.x];
    ch[threadIdx.x] = chans[static_cast<int64_t>(h) * d + threadIdx.x];
  }
  __syncthreads();
  const int i = blockIdx.x * kThreads + threadIdx.x;
  if (i >= n) return;
  const bf16* base = kt + static_cast<int64_t>(h) * head_dim * kt_cols + first + i;
  float v[kSparseMaxChannels];
  bool bad = false;
#pragma unroll
  for (int j = 0; j < kSparseMaxChannels; ++j) {
    v[j] = 0.0f;
    if (j < d) {
      const int c = ch[j];
      if (c >= 0 && c < head_dim) {
        v[j] = Bf(base[static_cast<int64_t>(c) * kt_cols]);
      } else {
        bad = true;  // a caller bug the device cannot report: NaN, ranked lowest
      }
    }
  }
  float dot = 0.0f;
#pragma unroll
  for (int j = 0; j < kSparseMaxChannels; ++j) {
    if (j < d) dot = __fadd_rn(dot, __fmul_rn(q[j], v[j]));
  }
  scores[static_cast<int64_t>(h) * score_stride + i] = bad ? __uint_as_float(0x7FC00000u) : dot;
}

}  // namespace

absl::Status LaunchGroupMeanQuery(const __nv_bfloat16* q, int n_heads, int n_kv, int head_dim,
                                  float* q_mean, cudaStream_t stream) {
  constexpr const char* fn = "LaunchGroupMeanQuery";
  if (absl::Status s = CheckShape(fn, n_kv, head_dim); !s.ok()) return s;
  if (n_heads < 1 || n_heads % n_kv != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(fn, ": n_heads = ", n_heads, " is not a positive multiple of n_kv = ", n_kv));
  }
  if (q == nullptr) return Null(fn, "q");
  if (q_mean == nullptr) return Null(fn, "q_mean");
  GroupMeanKernel<<<n_kv, head_dim, 0, stream>>>(q, n_heads / n_kv, head_dim, q_mean);
  CUDA_RETURN_IF_LAUNCH_FAILED("GroupMeanKernel");
  return absl::OkStatus();
}

absl::Status LaunchGroupMeanOnChannels(const __nv_bfloat16* q, int n_heads, int n_kv,
                                       int head_dim, const int32_t* chans, int d, float* q_chan,
                                       cudaStream_t stream) {
  constexpr const char* fn = "LaunchGroupMeanOnChannels";
  if (absl::Status s = CheckShape(fn, n_kv, head_dim); !s.ok()) return s;
  if (absl::Status s = CheckD(fn, d, head_dim); !s.ok()) return s;
  if (n_heads < 1 || n_heads % n_kv != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(fn, ": n_heads = ", n_heads, " is not a positive multiple of n_kv = ", n_kv));
  }
  if (q == nullptr) return Null(fn, "q");
  if (chans == nullptr) return Null(fn, "chans");
  if (q_chan == nullptr) return Null(fn, "q_chan");
  GroupMeanOnChannelsKernel<<<n_kv, kSparseMaxChannels, 0, stream>>>(q, n_heads / n_kv, head_dim,
                                                                     chans, d, q_chan);
  CUDA_RETURN_IF_LAUNCH_FAILED("GroupMeanOnChannelsKernel");
  return absl::OkStatus();
}

absl::Status LaunchChooseChannels(const float* q_mean, const float* max_abs, int n_kv,
                                  int head_dim, int d, int32_t* chans, float* q_chan,
                                  cudaStream_t stream) {
  constexpr const char* fn = "LaunchChooseChannels";
  if (absl::Status s = CheckShape(fn, n_kv, head_dim); !s.ok()) return s;
  if (absl::Status s = CheckD(fn, d, head_dim); !s.ok()) return s;
  if (q_mean == nullptr) return Null(fn, "q_mean");
  if (max_abs == nullptr) return Null(fn, "max_abs");
  if (chans == nullptr) return Null(fn, "chans");
  ChooseChannelsKernel<<<n_kv, head_dim, 0, stream>>>(q_mean, max_abs, head_dim, d, chans, q_chan);
  CUDA_RETURN_IF_LAUNCH_FAILED("ChooseChannelsKernel");
  return absl::OkStatus();
}

absl::Status LaunchBuildChannelIndex(const __nv_bfloat16* host, int64_t host_rows, int rows,
                                     const int32_t* chans, int d, int n_kv, int head_dim,
                                     __nv_bfloat16* index, int64_t index_rows,
                                     cudaStream_t stream) {
  constexpr const char* fn = "LaunchBuildChannelIndex";
  if (absl::Status s = CheckShape(fn, n_kv, head_dim); !s.ok()) return s;
  if (absl::Status s = CheckD(fn, d, head_dim); !s.ok()) return s;
  if (rows < 0) return absl::InvalidArgumentError(absl::StrCat(fn, ": rows = ", rows, " < 0"));
  if (rows > host_rows) {
    return absl::InvalidArgumentError(absl::StrCat(fn, ": rows = ", rows, " > host_rows = ", host_rows));
  }
  if (rows > index_rows) {
    return absl::InvalidArgumentError(absl::StrCat(fn, ": rows = ", rows, " > index_rows = ", index_rows));
  }
  if (rows == 0) return absl::OkStatus();
  if (host == nullptr) return Null(fn, "host");
  if (chans == nullptr) return Null(fn, "chans");
  if (index == nullptr) return Null(fn, "index");
  if (!Aligned16(host)) return absl::InvalidArgumentError(absl::StrCat(fn, ": host is not 16-byte aligned"));
  const dim3 grid((rows + kBuildTile - 1) / kBuildTile, n_kv);
  BuildIndexKernel<<<grid, kThreads, 0, stream>>>(reinterpret_cast<const uint4*>(host), host_rows,
                                                  rows, chans, d, head_dim, index, index_rows);
  CUDA_RETURN_IF_LAUNCH_FAILED("BuildIndexKernel");
  return absl::OkStatus();
}

absl::Status LaunchSpeculativeQuery(const __nv_bfloat16* x, const __nv_bfloat16* wq, int hidden,
                                    int n_heads, int n_kv, int head_dim, const int32_t* chans,
                                    int d, const int32_t* d_pos, const float* inv_freq,
                                    bool adjacent_pairs, float* out, cudaStream_t stream) {
  constexpr const char* fn = "LaunchSpeculativeQuery";
  if (absl::Status s = CheckShape(fn, n_kv, head_dim); !s.ok()) return s;
  if (absl::Status s = CheckD(fn, d, head_dim); !s.ok()) return s;
  if (hidden < 1) return absl::InvalidArgumentError(absl::StrCat(fn, ": hidden = ", hidden, " < 1"));
  if (n_heads < 1 || n_heads % n_kv != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(fn, ": n_heads = ", n_heads, " is not a positive multiple of n_kv = ", n_kv));
  }
  const int group = n_heads / n_kv;
  // The per-block dot products live in shared memory (2 floats per g).
  if (group > 4096) {
    return absl::InvalidArgumentError(absl::StrCat(fn, ": n_heads / n_kv = ", group, " > 4096"));
  }
  if (x == nullptr) return Null(fn, "x");
  if (wq == nullptr) return Null(fn, "wq");
  if (chans == nullptr) return Null(fn, "chans");
  if (d_pos == nullptr) return Null(fn, "d_pos");
  if (inv_freq == nullptr) return Null(fn, "inv_freq");
  if (out == nullptr) return Null(fn, "out");
  const int blocks = n_kv * d;
  const size_t smem = sizeof(float) * 2 * group;
  if (hidden % 8 == 0 && Aligned16(x) && Aligned16(wq)) {
    SpecQueryKernel<true><<<blocks, kThreads, smem, stream>>>(x, wq, hidden, group, head_dim, chans,
                                                             d, d_pos, inv_freq, adjacent_pairs, out);
  } else {
    SpecQueryKernel<false><<<blocks, kThreads, smem, stream>>>(x, wq, hidden, group, head_dim, chans,
                                                              d, d_pos, inv_freq, adjacent_pairs, out);
  }
  CUDA_RETURN_IF_LAUNCH_FAILED("SpecQueryKernel");
  return absl::OkStatus();
}

absl::Status LaunchScoreChannelIndex(const float* q_chan, const __nv_bfloat16* index,
                                     int64_t index_rows, int d, int n_kv, int first, int n,
                                     float* scores, int64_t score_stride, cudaStream_t stream,
                                     const int32_t* pool) {
  constexpr const char* fn = "LaunchScoreChannelIndex";
  if (absl::Status s = sparse_launch::CheckIndexScore(fn, n_kv, d, kSparseMaxChannels, first, n,
                                                      index_rows, score_stride, pool != nullptr);
      !s.ok() || n == 0) {
    return s;
  }
  if (q_chan == nullptr) return Null(fn, "q_chan");
  if (index == nullptr) return Null(fn, "index");
  if (scores == nullptr) return Null(fn, "scores");
  const dim3 grid((n + kThreads - 1) / kThreads, n_kv);
  const bool vec = d % 8 == 0 && Aligned16(index);
  switch (vec ? d / 8 : 0) {
    case 1:
      ScoreIndexKernel<1><<<grid, kThreads, 0, stream>>>(q_chan, index, index_rows, d, first, n, pool, scores, score_stride);
      break;
    case 2:
      ScoreIndexKernel<2><<<grid, kThreads, 0, stream>>>(q_chan, index, index_rows, d, first, n, pool, scores, score_stride);
      break;
    case 3:
      ScoreIndexKernel<3><<<grid, kThreads, 0, stream>>>(q_chan, index, index_rows, d, first, n, pool, scores, score_stride);
      break;
    case 4:
      ScoreIndexKernel<4><<<grid, kThreads, 0, stream>>>(q_chan, index, index_rows, d, first, n, pool, scores, score_stride);
      break;
    case 6:
      ScoreIndexKernel<6><<<grid, kThreads, 0, stream>>>(q_chan, index, index_rows, d, first, n, pool, scores, score_stride);
      break;
    case 8:
      ScoreIndexKernel<8><<<grid, kThreads, 0, stream>>>(q_chan, index, index_rows, d, first, n, pool, scores, score_stride);
      break;
    default:
      ScoreIndexKernel<0><<<grid, kThreads, 0, stream>>>(q_chan, index, index_rows, d, first, n, pool, scores, score_stride);
      break;
  }
  CUDA_RETURN_IF_LAUNCH_FAILED("ScoreIndexKernel");
  return absl::OkStatus();
}

absl::Status LaunchScoreFaithful(const float* q_chan, const int32_t* chans, int d,
                                 const __nv_bfloat16* kt, int64_t kt_cols, int n_kv, int head_dim,
                                 int first, int n, float* scores, int64_t score_stride,
                                 cudaStream_t stream) {
  constexpr const char* fn = "LaunchScoreFaithful";
  if (absl::Status s = CheckShape(fn, n_kv, head_dim); !s.ok()) return s;
  if (absl::Status s = CheckD(fn, d, head_dim); !s.ok()) return s;
  if (first < 0) return absl::InvalidArgumentError(absl::StrCat(fn, ": first = ", first, " < 0"));
  if (n < 0) return absl::InvalidArgumentError(absl::StrCat(fn, ": n = ", n, " < 0"));
  if (static_cast<int64_t>(first) + n > kt_cols) {
    return absl::InvalidArgumentError(
        absl::StrCat(fn, ": first + n = ", static_cast<int64_t>(first) + n, " > kt_cols = ", kt_cols));
  }
  if (n > score_stride) {
    return absl::InvalidArgumentError(absl::StrCat(fn, ": n = ", n, " > score_stride = ", score_stride));
  }
  if (n == 0) return absl::OkStatus();
  if (q_chan == nullptr) return Null(fn, "q_chan");
  if (chans == nullptr) return Null(fn, "chans");
  if (kt == nullptr) return Null(fn, "kt");
  if (scores == nullptr) return Null(fn, "scores");
  const dim3 grid((n + kThreads - 1) / kThreads, n_kv);
  ScoreFaithfulKernel<<<grid, kThreads, 0, stream>>>(q_chan, chans, d, kt, kt_cols, head_dim, first,
                                                     n, scores, score_stride);
  CUDA_RETURN_IF_LAUNCH_FAILED("ScoreFaithfulKernel");
  return absl::OkStatus();
}

}  // namespace tailorkv::cuda
