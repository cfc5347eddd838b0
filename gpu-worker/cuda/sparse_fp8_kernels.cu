#include "cuda/sparse_fp8_kernels.cuh"

#include <cuda_fp8.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "cuda/cuda_check.h"
#include "cuda/sparse_fp8_device.cuh"
#include "cuda/sparse_index_device.cuh"
#include "cuda/sparse_launch_checks.h"
#include "cuda/sparse_index_kernels.cuh"  // kSparseMaxChannels

namespace tailorkv::cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kThreads = 256;
constexpr int kStoreUnroll = 4;  // device reads, posted host writes: little to hide
constexpr int kLoadUnroll = 8;   // reads over PCIe: keep many in flight
constexpr int kBuildTile = 64;   // host rows per block of the index build

// ---- Conversions (runtime/fp8_reference.cc's, on bit patterns) ----

// Round-to-nearest-even of v / 2^shift, 0 < shift < 32.
__device__ __forceinline__ uint32_t RoundShift(uint32_t v, int shift) {
  const uint32_t q = v >> shift;
  const uint32_t rem = v & ((1u << shift) - 1);
  const uint32_t half = 1u << (shift - 1);
  return q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
}

// bf16 bits (low 16) -> fp8 E4M3 code: FloatToFp8E4M3 on the exact float.
// Integer only, so no rounding mode or denormal flushing can change it.
__device__ __forceinline__ uint32_t Bf16ToFp8(uint32_t h) {
  const uint32_t sign = (h >> 8) & 0x80u;
  const uint32_t a = (h & 0x7FFFu) << 16;  // |x| as float bits
  if (a > 0x7F800000u) return sign | 0x7Fu;                       // NaN
  if (a >= 0x43E00000u) return sign | 0x7Eu;                      // >= 448, inf: saturate
  if (a >= 0x3C800000u) return sign | RoundShift(a - (120u << 23), 20);  // normal
  if (a <= 0x3A800000u) return sign;                              // <= 2^-10: 0 (tie even)
  const int e = static_cast<int>(a >> 23);                        // subnormal, e in [117, 120]
  return sign | RoundShift((a & 0x7FFFFFu) | 0x800000u, 141 - e);
}


// 4 fp8 codes (bytes of w, element 0 lowest) -> 4 bf16 as two words.
__device__ __forceinline__ uint2 Decode4(uint32_t w) {
  return make_uint2(Fp8ToBf16(w & 0xFFu) | (Fp8ToBf16((w >> 8) & 0xFFu) << 16),
                    Fp8ToBf16((w >> 16) & 0xFFu) | (Fp8ToBf16(w >> 24) << 16));
}

// 8 bf16 (one 16-byte chunk) <-> 8 fp8 codes.
__device__ __forceinline__ uint4 Decode8(uint32_t w0, uint32_t w1) {
  const uint2 a = Decode4(w0), b = Decode4(w1);
  return make_uint4(a.x, a.y, b.x, b.y);
}

__device__ __forceinline__ uint32_t Encode2(uint32_t w) {  // 2 bf16 -> 2 codes (16 bits)
  return Bf16ToFp8(w & 0xFFFFu) | (Bf16ToFp8(w >> 16) << 8);
}

__device__ __forceinline__ uint2 Encode8(const uint4& q) {
  return make_uint2(Encode2(q.x) | (Encode2(q.y) << 16), Encode2(q.z) | (Encode2(q.w) << 16));
}

// A host chunk: kBytes fp8 codes (8 or 16) = kBytes / 8 16-byte bf16 chunks
// on the device. 16 when head_dim % 16 == 0 (head_dim 64, 128: 16-byte host
// loads), else 8 (a half row of head_dim % 16 == 8 bytes is not a whole
// number of 16-byte chunks).
template <int kBytes>
struct HostChunk;
template <>
struct HostChunk<8> {
  using T = uint2;
  static constexpr int kDev = 1;
  __device__ static void Decode(const uint2& c, uint4* out) { out[0] = Decode8(c.x, c.y); }
  __device__ static uint2 Encode(const uint4* in) { return Encode8(in[0]); }
};
template <>
struct HostChunk<16> {
  using T = uint4;
  static constexpr int kDev = 2;
  __device__ static void Decode(const uint4& c, uint4* out) {
    out[0] = Decode8(c.x, c.y);
    out[1] = Decode8(c.z, c.w);
  }
  __device__ static uint4 Encode(const uint4* in) {
    const uint2 a = Encode8(in[0]), b = Encode8(in[1]);
    return make_uint4(a.x, a.y, b.x, b.y);
  }
};

// Grid sizing and argument checks: sparse_launch_checks.h.
using sparse_launch::Bad;
using sparse_launch::CheckGatherKvRows;
using sparse_launch::Aligned16;
using sparse_launch::CheckHostRowsCopy;
using sparse_launch::CheckIndexBuild;
using sparse_launch::CheckIndexScore;
using sparse_launch::CheckPtr;
int StrideBlocks(int64_t total, int unroll) {
  return sparse_launch::StrideBlocks(total, unroll, kThreads);
}

// ---- Kernels ----

// Host rows <-> K/V rows. Item = one host chunk (kBytes codes; cpr chunks of
// K then cpr of V per row); consecutive threads take consecutive items, so
// the host side is one contiguous run per head and the device side
// contiguous per half row. Device offsets are in 16-byte units.
template <bool kToHost, int kUnroll, int kBytes>
__global__ void __launch_bounds__(kThreads)
    HostRowsFp8Kernel(uint4* __restrict__ k, uint4* __restrict__ v, int64_t head_stride16,
                      typename HostChunk<kBytes>::T* __restrict__ host, int64_t host_rows,
                      int first, int n, int cpr, int64_t total) {
  using C = HostChunk<kBytes>;
  const int chunks = 2 * cpr;
  const int dev_row16 = cpr * C::kDev;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; base < total;
       base += nthreads * kUnroll) {
    uint4 dev_val[kUnroll][C::kDev];
    typename C::T host_val[kUnroll];
    int64_t host_at[kUnroll], dev_at[kUnroll];
    bool is_v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t item = base + u * nthreads;
      if (item < total) {
        const int64_t r = item / chunks;  // h * n + i
        const int c = static_cast<int>(item - r * chunks);
        const int64_t h = r / n;
        const int64_t row = first + (r - h * n);
        host_at[u] = (h * host_rows + row) * chunks + c;
        is_v[u] = c >= cpr;
        dev_at[u] = h * head_stride16 + row * dev_row16 + (is_v[u] ? c - cpr : c) * C::kDev;
        if constexpr (kToHost) {
          const uint4* src = (is_v[u] ? v : k) + dev_at[u];
#pragma unroll
          for (int q = 0; q < C::kDev; ++q) dev_val[u][q] = src[q];
        } else {
          host_val[u] = host[host_at[u]];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u * nthreads < total) {
        if constexpr (kToHost) {
          host[host_at[u]] = C::Encode(dev_val[u]);
        } else {
          C::Decode(host_val[u], dev_val[u]);
          uint4* dst = (is_v[u] ? v : k) + dev_at[u];
#pragma unroll
          for (int q = 0; q < C::kDev; ++q) dst[q] = dev_val[u][q];
        }
      }
    }
  }
}

// GatherKvKernel's pattern (sparse_tier_kernels.cu) on fp8 rows: item = one
// host chunk of a selected row (K chunks then V chunks), so consecutive
// lanes read consecutive bytes of one row (a 256-byte row is 16 lanes of
// 16-byte loads at head_dim 128: two rows a warp per step) and each thread
// has kLoadUnroll loads in flight, a grid apart (16 rows a warp). Each
// chunk decodes to kBytes / 8 16-byte stores.
template <int kBytes>
__global__ void __launch_bounds__(kThreads)
    GatherKvFp8Kernel(const typename HostChunk<kBytes>::T* __restrict__ host, int64_t host_rows,
                      int64_t src_first, const int32_t* __restrict__ idx, int count, int cpr,
                      int64_t total, uint4* __restrict__ dst_k, uint4* __restrict__ dst_v,
                      int64_t dst_head_stride16, int dst_first) {
  using C = HostChunk<kBytes>;
  const int chunks = 2 * cpr;
  const int dev_row16 = cpr * C::kDev;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; base < total;
       base += nthreads * kLoadUnroll) {
    typename C::T val[kLoadUnroll];
    int64_t dst_at[kLoadUnroll];
    bool ok[kLoadUnroll], is_v[kLoadUnroll];
#pragma unroll
    for (int u = 0; u < kLoadUnroll; ++u) {
      const int64_t item = base + u * nthreads;
      ok[u] = false;
      if (item < total) {
        const int64_t r = item / chunks;  // h * count + i
        const int c = static_cast<int>(item - r * chunks);
        const int32_t j = idx[r];
        const int64_t p = static_cast<int64_t>(j) + src_first;
        if (j >= 0 && p < host_rows) {
          const int64_t h = r / count;
          const int64_t i = r - h * count;
          val[u] = host[(h * host_rows + p) * chunks + c];
          is_v[u] = c >= cpr;
          dst_at[u] = h * dst_head_stride16 + (dst_first + i) * dev_row16 +
                      (is_v[u] ? c - cpr : c) * C::kDev;
          ok[u] = true;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kLoadUnroll; ++u) {
      if (ok[u]) {
        uint4 out[C::kDev];
        C::Decode(val[u], out);
        uint4* dst = (is_v[u] ? dst_v : dst_k) + dst_at[u];
#pragma unroll
        for (int q = 0; q < C::kDev; ++q) dst[q] = out[q];
      }
    }
  }
}

// BuildIndexKernel (sparse_index_kernels.cu) on fp8 rows: block per (tile
// of kBuildTile host rows, KV head); the K halves of the tile's rows read
// whole (16-byte loads), staged in shared memory, the chosen channels
// decoded and written out.
// Out = bf16 (decoded) or uint8_t (the codes as they are: an FP8 index).
template <typename Out>
__global__ void __launch_bounds__(kThreads) BuildIndexFp8Kernel(
    const uint4* __restrict__ host, int64_t host_rows, int rows, const int32_t* __restrict__ chans,
    int d, int head_dim, Out* __restrict__ index, int64_t index_rows) {
  __shared__ uint4 tile[kBuildTile * 128 / 16];
  __shared__ int ch[kSparseMaxChannels];
  const int h = blockIdx.y;
  const int p0 = blockIdx.x * kBuildTile;
  const int nrows = min(kBuildTile, rows - p0);
  const int chunks = head_dim / 16;   // 16-byte chunks of a K half
  if (threadIdx.x < d) ch[threadIdx.x] = chans[static_cast<int64_t>(h) * d + threadIdx.x];
  StageKHalves(host, host_rows, h, p0, nrows, chunks, kThreads, tile);
  __syncthreads();
  const uint8_t* sh = reinterpret_cast<const uint8_t*>(tile);
  const int64_t base = (static_cast<int64_t>(h) * index_rows + p0) * d;
  for (int t = threadIdx.x; t < nrows * d; t += kThreads) {
    const int r = t / d, j = t - r * d;
    const int c = ch[j];
    // A channel outside [0, head_dim) (a caller bug the device cannot
    // report) yields NaN, which scores NaN and so ranks lowest.
    const bool ok = c >= 0 && c < head_dim;
    if constexpr (std::is_same_v<Out, uint8_t>) {
      index[base + t] = static_cast<uint8_t>(ok ? sh[r * head_dim + c] : 0x7Fu);
    } else {
      reinterpret_cast<uint16_t*>(index)[base + t] =
          static_cast<uint16_t>(ok ? Fp8ToBf16(sh[r * head_dim + c]) : 0x7FC0u);
    }
  }
}

// LaunchBuildChannelIndex's gather from bf16 host rows, writing FP8 codes:
// block per (tile of kBuildTile rows, KV head), the tile's K halves read
// whole (16-byte loads) into shared memory, the chosen channels encoded.
__global__ void __launch_bounds__(kThreads) BuildFp8IndexKernel(
    const uint4* __restrict__ host, int64_t host_rows, int rows, const int32_t* __restrict__ chans,
    int d, int head_dim, uint8_t* __restrict__ index, int64_t index_rows) {
  __shared__ uint4 tile[kBuildTile * 128 / 8];
  __shared__ int ch[kSparseMaxChannels];
  const int h = blockIdx.y;
  const int p0 = blockIdx.x * kBuildTile;
  const int nrows = min(kBuildTile, rows - p0);
  const int chunks = head_dim / 8;   // 16-byte chunks of a bf16 K half
  if (threadIdx.x < d) ch[threadIdx.x] = chans[static_cast<int64_t>(h) * d + threadIdx.x];
  StageKHalves(host, host_rows, h, p0, nrows, chunks, kThreads, tile);
  __syncthreads();
  const uint16_t* sh = reinterpret_cast<const uint16_t*>(tile);
  uint8_t* dst = index + (static_cast<int64_t>(h) * index_rows + p0) * d;
  for (int t = threadIdx.x; t < nrows * d; t += kThreads) {
    const int r = t / d, j = t - r * d;
    const int c = ch[j];
    dst[t] = static_cast<uint8_t>((c >= 0 && c < head_dim) ? Bf16ToFp8(sh[r * head_dim + c]) : 0x7Fu);
  }
}

// FP8 index scores: thread per (token, KV head), ScoreIndexKernel's
// arithmetic on the decoded codes. kChunks > 0: d == 16 * kChunks and
// 16-byte aligned rows; kChunks == 0: any d, byte loads.
template <int kChunks>
__global__ void __launch_bounds__(kThreads) ScoreFp8IndexKernel(
    const float* __restrict__ q_chan, const uint8_t* __restrict__ index, int64_t index_rows, int d,
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
  auto val = [](uint32_t code) { return __uint_as_float(Fp8ToBf16(code) << 16); };
  float dot = 0.0f;
  if constexpr (kChunks > 0) {
    dot = Fp8IndexDot<kChunks>(q, reinterpret_cast<const uint4*>(index + row * d));
  } else {
    const uint8_t* r = index + row * d;
    for (int j = 0; j < d; ++j) dot = __fadd_rn(dot, __fmul_rn(q[j], val(__ldg(&r[j]))));
  }
  scores[static_cast<int64_t>(h) * score_stride + i] = dot;
}

}  // namespace

absl::Status LaunchStoreHostRowsFp8(const bf16* k, const bf16* v, int64_t head_stride, int first,
                                    int n, int n_kv, int head_dim, uint8_t* host,
                                    int64_t host_rows, cudaStream_t stream) {
  constexpr const char* kFn = "LaunchStoreHostRowsFp8";
  if (absl::Status s = CheckHostRowsCopy(kFn, /*store=*/true, first, n, n_kv, head_dim,
                                         head_stride, host_rows, host, k, v);
      !s.ok() || n == 0) {
    return s;
  }
  auto* dk = reinterpret_cast<uint4*>(const_cast<bf16*>(k));
  auto* dv = reinterpret_cast<uint4*>(const_cast<bf16*>(v));
  if (head_dim % 16 == 0) {
    const int cpr = head_dim / 16;
    const int64_t total = static_cast<int64_t>(n_kv) * n * 2 * cpr;
    HostRowsFp8Kernel<true, kStoreUnroll, 16><<<StrideBlocks(total, kStoreUnroll), kThreads, 0, stream>>>(
        dk, dv, head_stride / 8, reinterpret_cast<uint4*>(host), host_rows, first, n, cpr, total);
  } else {
    const int cpr = head_dim / 8;
    const int64_t total = static_cast<int64_t>(n_kv) * n * 2 * cpr;
    HostRowsFp8Kernel<true, kStoreUnroll, 8><<<StrideBlocks(total, kStoreUnroll), kThreads, 0, stream>>>(
        dk, dv, head_stride / 8, reinterpret_cast<uint2*>(host), host_rows, first, n, cpr, total);
  }
  CUDA_RETURN_IF_LAUNCH_FAILED("HostRowsFp8Kernel<store>");
  return absl::OkStatus();
}

absl::Status LaunchLoadHostRowsFp8(const uint8_t* host, int64_t host_rows, int first, int n,
                                   int n_kv, int head_dim, bf16* k, bf16* v, int64_t head_stride,
                                   cudaStream_t stream) {
  constexpr const char* kFn = "LaunchLoadHostRowsFp8";
  if (absl::Status s = CheckHostRowsCopy(kFn, /*store=*/false, first, n, n_kv, head_dim,
                                         head_stride, host_rows, host, k, v);
      !s.ok() || n == 0) {
    return s;
  }
  auto* dk = reinterpret_cast<uint4*>(k);
  auto* dv = reinterpret_cast<uint4*>(v);
  if (head_dim % 16 == 0) {
    const int cpr = head_dim / 16;
    const int64_t total = static_cast<int64_t>(n_kv) * n * 2 * cpr;
    HostRowsFp8Kernel<false, kLoadUnroll, 16><<<StrideBlocks(total, kLoadUnroll), kThreads, 0, stream>>>(
        dk, dv, head_stride / 8, reinterpret_cast<uint4*>(const_cast<uint8_t*>(host)), host_rows,
        first, n, cpr, total);
  } else {
    const int cpr = head_dim / 8;
    const int64_t total = static_cast<int64_t>(n_kv) * n * 2 * cpr;
    HostRowsFp8Kernel<false, kLoadUnroll, 8><<<StrideBlocks(total, kLoadUnroll), kThreads, 0, stream>>>(
        dk, dv, head_stride / 8, reinterpret_cast<uint2*>(const_cast<uint8_t*>(host)), host_rows,
        first, n, cpr, total);
  }
  CUDA_RETURN_IF_LAUNCH_FAILED("HostRowsFp8Kernel<load>");
  return absl::OkStatus();
}

absl::Status LaunchGatherKvRowsFp8(const uint8_t* host, int64_t host_rows, int64_t src_first,
                                   const int32_t* idx, int count, int n_kv, int head_dim,
                                   bf16* dst_k, bf16* dst_v, int64_t dst_head_stride,
                                   int dst_first, cudaStream_t stream) {
  constexpr const char* kFn = "LaunchGatherKvRowsFp8";
  if (absl::Status s = CheckGatherKvRows(kFn, host_rows, src_first, count, n_kv, head_dim,
                                         dst_head_stride, dst_first, host, idx, dst_k, dst_v);
      !s.ok() || count == 0) {
    return s;
  }
  auto* dk = reinterpret_cast<uint4*>(dst_k);
  auto* dv = reinterpret_cast<uint4*>(dst_v);
  if (head_dim % 16 == 0) {
    const int cpr = head_dim / 16;
    const int64_t total = static_cast<int64_t>(n_kv) * count * 2 * cpr;
    GatherKvFp8Kernel<16><<<StrideBlocks(total, kLoadUnroll), kThreads, 0, stream>>>(
        reinterpret_cast<const uint4*>(host), host_rows, src_first, idx, count, cpr, total, dk, dv,
        dst_head_stride / 8, dst_first);
  } else {
    const int cpr = head_dim / 8;
    const int64_t total = static_cast<int64_t>(n_kv) * count * 2 * cpr;
    GatherKvFp8Kernel<8><<<StrideBlocks(total, kLoadUnroll), kThreads, 0, stream>>>(
        reinterpret_cast<const uint2*>(host), host_rows, src_first, idx, count, cpr, total, dk, dv,
        dst_head_stride / 8, dst_first);
  }
  CUDA_RETURN_IF_LAUNCH_FAILED("GatherKvFp8Kernel");
  return absl::OkStatus();
}

absl::Status LaunchBuildChannelIndexFp8(const uint8_t* host, int64_t host_rows, int rows,
                                        const int32_t* chans, int d, int n_kv, int head_dim,
                                        bf16* index, int64_t index_rows, cudaStream_t stream) {
  constexpr const char* kFn = "LaunchBuildChannelIndexFp8";
  if (absl::Status s = CheckIndexBuild(kFn, kSparseMaxChannels, host, host_rows, rows, chans, d,
                                       n_kv, head_dim, index, index_rows);
      !s.ok() || rows == 0) {
    return s;
  }
  const dim3 grid((rows + kBuildTile - 1) / kBuildTile, n_kv);
  BuildIndexFp8Kernel<bf16><<<grid, kThreads, 0, stream>>>(
      reinterpret_cast<const uint4*>(host), host_rows, rows, chans, d, head_dim, index, index_rows);
  CUDA_RETURN_IF_LAUNCH_FAILED("BuildIndexFp8Kernel");
  return absl::OkStatus();
}

absl::Status LaunchBuildFp8ChannelIndex(const bf16* host, int64_t host_rows, int rows,
                                        const int32_t* chans, int d, int n_kv, int head_dim,
                                        uint8_t* index, int64_t index_rows, cudaStream_t stream) {
  constexpr const char* kFn = "LaunchBuildFp8ChannelIndex";
  if (absl::Status s = CheckIndexBuild(kFn, kSparseMaxChannels, host, host_rows, rows, chans, d,
                                       n_kv, head_dim, index, index_rows);
      !s.ok() || rows == 0) {
    return s;
  }
  const dim3 grid((rows + kBuildTile - 1) / kBuildTile, n_kv);
  BuildFp8IndexKernel<<<grid, kThreads, 0, stream>>>(reinterpret_cast<const uint4*>(host), host_rows,
                                                     rows, chans, d, head_dim, index, index_rows);
  CUDA_RETURN_IF_LAUNCH_FAILED("BuildFp8IndexKernel");
  return absl::OkStatus();
}

absl::Status LaunchBuildFp8ChannelIndexFromFp8(const uint8_t* host, int64_t host_rows, int rows,
                                               const int32_t* chans, int d, int n_kv, int head_dim,
                                               uint8_t* index, int64_t index_rows,
                                               cudaStream_t stream) {
  constexpr const char* kFn = "LaunchBuildFp8ChannelIndexFromFp8";
  if (absl::Status s = CheckIndexBuild(kFn, kSparseMaxChannels, host, host_rows, rows, chans, d,
                                       n_kv, head_dim, index, index_rows);
      !s.ok() || rows == 0) {
    return s;
  }
  const dim3 grid((rows + kBuildTile - 1) / kBuildTile, n_kv);
  BuildIndexFp8Kernel<uint8_t><<<grid, kThreads, 0, stream>>>(
      reinterpret_cast<const uint4*>(host), host_rows, rows, chans, d, head_dim, index, index_rows);
  CUDA_RETURN_IF_LAUNCH_FAILED("BuildIndexFp8Kernel");
  return absl::OkStatus();
}

absl::Status LaunchScoreFp8ChannelIndex(const float* q_chan, const uint8_t* index,
                                        int64_t index_rows, int d, int n_kv, int first, int n,
                                        float* scores, int64_t score_stride, cudaStream_t stream,
                                        const int32_t* pool) {
  constexpr const char* kFn = "LaunchScoreFp8ChannelIndex";
  if (absl::Status s = CheckIndexScore(kFn, n_kv, d, kSparseMaxChannels, first, n, index_rows, score_stride,
                                       pool != nullptr);
      !s.ok() || n == 0) {
    return s;
  }
  if (absl::Status s = CheckPtr(kFn, "q_chan", q_chan, false); !s.ok()) return s;
  if (absl::Status s = CheckPtr(kFn, "index", index, false); !s.ok()) return s;
  if (absl::Status s = CheckPtr(kFn, "scores", scores, false); !s.ok()) return s;
  const dim3 grid((n + kThreads - 1) / kThreads, n_kv);
  const bool vec = d % 16 == 0 && Aligned16(index);
  switch (vec ? d / 16 : 0) {
    case 1:
      ScoreFp8IndexKernel<1><<<grid, kThreads, 0, stream>>>(q_chan, index, index_rows, d, first, n, pool, scores, score_stride);
      break;
    case 2:
      ScoreFp8IndexKernel<2><<<grid, kThreads, 0, stream>>>(q_chan, index, index_rows, d, first, n, pool, scores, score_stride);
      break;
    case 4:
      ScoreFp8IndexKernel<4><<<grid, kThreads, 0, stream>>>(q_chan, index, index_rows, d, first, n, pool, scores, score_stride);
      break;
    default:
      ScoreFp8IndexKernel<0><<<grid, kThreads, 0, stream>>>(q_chan, index, index_rows, d, first, n, pool, scores, score_stride);
      break;
  }
  CUDA_RETURN_IF_LAUNCH_FAILED("ScoreFp8IndexKernel");
  return absl::OkStatus();
}

}  // namespace tailorkv::cuda
