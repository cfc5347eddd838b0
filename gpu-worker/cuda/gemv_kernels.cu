// Batch-1 GEMV (contract in gemv_kernels.cuh).
//
// Layout of the work: a row of W is in/8 16-byte chunks. A group of G warps
// owns R consecutive rows; warp g of the group reads chunks g*32 + lane +
// k*32*G (so a warp's 32 lanes read 512 contiguous bytes of a row per step),
// U steps unrolled and double-buffered so that U*R 16-byte loads per thread
// are in flight while the previous U*R are consumed. x is read through L1
// (at most a few tens of KB, and every warp reads all of it); W is read with
// ld.global.nc.L1::no_allocate so the stream does not evict x from L1, with a
// 256-byte L2 prefetch hint. Each
// lane accumulates in float32, a warp-shuffle tree sums the lanes, and with
// G > 1 the G warp sums are added in shared memory in warp order, so the sum
// order depends only on (out, in, config): deterministic.
//
// Rows past `out` in the last block: their group skips the loads and writes
// nothing (it still reaches the block barrier of the G > 1 reduction).
#include <algorithm>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "cuda/cuda_check.h"
#include "cuda/gemv_kernels.cuh"

namespace tailorkv::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxWarpsPerBlock = 16;

enum class OutMode { kBf16, kF32, kF32Accumulate };

// An L2 cache policy that marks lines evict-first (for LoadStream).
__device__ __forceinline__ uint64_t EvictFirstPolicy() {
  uint64_t policy;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}

// 16 bytes of a stream read once: not allocated in L1, prefetch 256 bytes
// into L2 (the next lanes' chunks), optionally with an evict-first policy.
template <bool kEvictFirst>
__device__ __forceinline__ uint4 LoadStream(const uint4* p, uint64_t policy) {
  uint4 v;
  if constexpr (kEvictFirst) {
    asm("ld.global.nc.L1::no_allocate.L2::cache_hint.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p), "l"(policy));
  } else {
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
  }
  return v;
}

// The 8 bf16 of a chunk as floats (bf16 is the top half of a float32).
__device__ __forceinline__ void Unpack8(const uint4& v, float (&f)[8]) {
  const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(u[i] << 16);
    f[2 * i + 1] = __uint_as_float(u[i] & 0xFFFF0000u);
  }
}

__device__ __forceinline__ float Dot8(const uint4& w, const float (&x)[8], float acc) {
  float wf[8];
  Unpack8(w, wf);
#pragma unroll
  for (int i = 0; i < 8; ++i) acc = fmaf(wf[i], x[i], acc);
  return acc;
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
  return v;
}

// One block = blockDim.x / (32 G) groups of G warps; group i of block b owns
// rows [(b * groups + i) * R, +R).
//   w: [out][chunks] 16-byte chunks of bf16 (in = 8 * chunks)
//   x: [chunks] chunks of bf16
//   y: [out] bf16 (kBf16) or f32
template <int R, int G, int U, bool kEvictFirst, OutMode M>
__global__ void __launch_bounds__(kMaxWarpsPerBlock* kWarp)
    GemvKernel(const uint4* __restrict__ w, const uint4* __restrict__ x, int out, int chunks,
               void* __restrict__ y) {
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int group = warp / G;
  const int sub = warp % G;
  const int groups_per_block = blockDim.x / (kWarp * G);
  const int row0 = (blockIdx.x * groups_per_block + group) * R;
  // A group wholly past the end reads nothing; a partial one clamps its
  // extra rows onto row out-1 (valid memory, results discarded), keeping the
  // loop free of per-row branches.
  const int n_chunks = row0 < out ? chunks : 0;
  const uint4* rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) rows[r] = w + static_cast<int64_t>(min(row0 + r, out - 1)) * chunks;

  const uint64_t policy = kEvictFirst ? EvictFirstPolicy() : 0;
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.0f;

  // Software-pipelined: the loads of step s + 1 are issued before step s is
  // consumed, so they cross the loop back-edge. Without that, ptxas sinks
  // each load next to its first use to save registers and only ~2 of them
  // are in flight per thread (seen in the SASS).
  constexpr int kStride = kWarp * G;
  const int base = sub * kWarp + lane;
  const int count = base < n_chunks ? (n_chunks - base + kStride - 1) / kStride : 0;
  const int steps = count / U;
  uint4 cur[U][R];
  if (steps > 0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        cur[u][r] = LoadStream<kEvictFirst>(rows[r] + base + u * kStride, policy);
      }
    }
  }
  int c = base;
  for (int s = 0; s < steps; ++s, c += U * kStride) {
    uint4 next[U][R];
    if (s + 1 < steps) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          next[u][r] = LoadStream<kEvictFirst>(rows[r] + c + (U + u) * kStride, policy);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float xf[8];
      Unpack8(__ldg(x + c + u * kStride), xf);
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] = Dot8(cur[u][r], xf, acc[r]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int r = 0; r < R; ++r) cur[u][r] = next[u][r];
    }
  }
  for (; c < n_chunks; c += kStride) {  // the last count % U chunks
    float xf[8];
    Unpack8(__ldg(x + c), xf);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      acc[r] = Dot8(LoadStream<kEvictFirst>(rows[r] + c, policy), xf, acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = WarpSum(acc[r]);

  if constexpr (G > 1) {
    __shared__ float partial[kMaxWarpsPerBlock][R];
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < R; ++r) partial[warp][r] = acc[r];
    }
    __syncthreads();
    if (sub != 0) return;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float s = partial[warp][r];
#pragma unroll
      for (int g = 1; g < G; ++g) s += partial[warp + g][r];
      acc[r] = s;
    }
  }
  if (lane != 0) return;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = row0 + r;
    if (row >= out) break;
    if constexpr (M == OutMode::kBf16) {
      static_cast<__nv_bfloat16*>(y)[row] = __float2bfloat16_rn(acc[r]);
    } else if constexpr (M == OutMode::kF32) {
      static_cast<float*>(y)[row] = acc[r];
    } else {
      static_cast<float*>(y)[row] += acc[r];
    }
  }
}

struct Args {
  const uint4* w;
  const uint4* x;
  int out;
  int chunks;
  void* y;
  OutMode mode;
  int groups_per_block;
  cudaStream_t stream;
};

template <int R, int G, int U, bool E>
absl::Status Launch(const Args& a) {
  const int rows_per_block = R * a.groups_per_block;
  const int blocks = (a.out + rows_per_block - 1) / rows_per_block;
  const int threads = a.groups_per_block * G * kWarp;
  switch (a.mode) {
    case OutMode::kBf16:
      GemvKernel<R, G, U, E, OutMode::kBf16>
          <<<blocks, threads, 0, a.stream>>>(a.w, a.x, a.out, a.chunks, a.y);
      break;
    case OutMode::kF32:
      GemvKernel<R, G, U, E, OutMode::kF32>
          <<<blocks, threads, 0, a.stream>>>(a.w, a.x, a.out, a.chunks, a.y);
      break;
    case OutMode::kF32Accumulate:
      GemvKernel<R, G, U, E, OutMode::kF32Accumulate>
          <<<blocks, threads, 0, a.stream>>>(a.w, a.x, a.out, a.chunks, a.y);
      break;
  }
  CUDA_RETURN_IF_LAUNCH_FAILED("GemvKernel");
  return absl::OkStatus();
}

template <int R, int G, int U>
absl::Status DispatchHint(const GemvConfig& c, const Args& a) {
  return c.evict_first ? Launch<R, G, U, true>(a) : Launch<R, G, U, false>(a);
}

template <int R, int G>
absl::Status DispatchUnroll(const GemvConfig& c, const Args& a) {
  // Double-buffered, R * U * 2 16-byte vectors live per thread: R * U > 8
  // spills under the 128-register cap of a 512-thread block.
  if (c.rows_per_group * c.unroll <= 8) {
    switch (c.unroll) {
      case 2:
        return DispatchHint<R, G, 2>(c, a);
      case 4:
        if constexpr (R <= 2) return DispatchHint<R, G, 4>(c, a);
        break;
      case 8:
        if constexpr (R == 1) return DispatchHint<R, G, 8>(c, a);
        break;
      default:
        break;
    }
  }
  return absl::InvalidArgumentError(
      absl::StrCat("GemvConfig.unroll: ", c.unroll, " is not supported with rows_per_group ",
                   c.rows_per_group, " (2, 4 or 8, with rows_per_group * unroll <= 8)"));
}

template <int R>
absl::Status DispatchWarps(const GemvConfig& c, const Args& a) {
  switch (c.warps_per_row) {
    case 1:
      return DispatchUnroll<R, 1>(c, a);
    case 2:
      return DispatchUnroll<R, 2>(c, a);
    case 4:
      return DispatchUnroll<R, 4>(c, a);
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("GemvConfig.warps_per_row: ", c.warps_per_row, " (1, 2 or 4)"));
  }
}

absl::Status Dispatch(const GemvConfig& c, const Args& a) {
  switch (c.rows_per_group) {
    case 1:
      return DispatchWarps<1>(c, a);
    case 2:
      return DispatchWarps<2>(c, a);
    case 4:
      return DispatchWarps<4>(c, a);
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("GemvConfig.rows_per_group: ", c.rows_per_group, " (1, 2 or 4)"));
  }
}

bool Aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Batched kernel: a group of kBatchWarps warps owns one row of W and
// computes it against NB rows of x. Warp g, lane l sums chunks
// g*32 + l + k*32*kBatchWarps in ascending k for every x row, the lanes are
// summed by the shuffle tree, the warps in shared memory in warp order: the
// order is fixed by `chunks` alone, whatever NB is. W is loaded once per
// chunk (double-buffered, kBatchUnroll chunks ahead) and widened once, then
// used for the NB rows of x, which are read through L1.
constexpr int kBatchWarps = 2;
constexpr int kBatchGroups = 4;  // rows per block
constexpr int kBatchUnroll = 4;

template <int NB, OutMode M>
__global__ void __launch_bounds__(kBatchWarps* kBatchGroups* kWarp)
    GemvBatchKernel(const uint4* __restrict__ w, const uint4* __restrict__ x, int out, int chunks,
                    void* __restrict__ y) {
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int group = warp / kBatchWarps;
  const int sub = warp % kBatchWarps;
  const int row = blockIdx.x * kBatchGroups + group;
  const int n_chunks = row < out ? chunks : 0;
  const uint4* wrow = w + static_cast<int64_t>(min(row, out - 1)) * chunks;
  float acc[NB];
#pragma unroll
  for (int b = 0; b < NB; ++b) acc[b] = 0.0f;
  constexpr int kStride = kWarp * kBatchWarps;
  constexpr int U = kBatchUnroll;
  const int base = sub * kWarp + lane;
  const int count = base < n_chunks ? (n_chunks - base + kStride - 1) / kStride : 0;
  const int steps = count / U;
  auto consume = [&](const uint4& wv, int c) {
    float wf[8];
    Unpack8(wv, wf);
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      float xf[8];
      Unpack8(__ldg(x + static_cast<int64_t>(b) * chunks + c), xf);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[b] = fmaf(wf[i], xf[i], acc[b]);
    }
  };
  uint4 cur[U];
  if (steps > 0) {
#pragma unroll
    for (int u = 0; u < U; ++u) cur[u] = LoadStream<false>(wrow + base + u * kStride, 0);
  }
  int c = base;
  for (int s = 0; s < steps; ++s, c += U * kStride) {
    uint4 next[U];
    if (s + 1 < steps) {
#pragma unroll
      for (int u = 0; u < U; ++u) next[u] = LoadStream<false>(wrow + c + (U + u) * kStride, 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) consume(cur[u], c + u * kStride);
#pragma unroll
    for (int u = 0; u < U; ++u) cur[u] = next[u];
  }
  for (; c < n_chunks; c += kStride) consume(LoadStream<false>(wrow + c, 0), c);
#pragma unroll
  for (int b = 0; b < NB; ++b) acc[b] = WarpSum(acc[b]);
  __shared__ float partial[kBatchGroups * kBatchWarps][NB];
  if (lane == 0) {
#pragma unroll
    for (int b = 0; b < NB; ++b) partial[warp][b] = acc[b];
  }
  __syncthreads();
  if (sub != 0 || lane >= NB || row >= out) return;
  // Lane b writes x row b's output.
  float sum = 0.0f;
#pragma unroll
  for (int b = 0; b < NB; ++b) {
    if (b == lane) {
      sum = partial[warp][b];
#pragma unroll
      for (int g = 1; g < kBatchWarps; ++g) sum += partial[warp + g][b];
    }
  }
  const int64_t at = static_cast<int64_t>(lane) * out + row;
  if constexpr (M == OutMode::kBf16) {
    static_cast<__nv_bfloat16*>(y)[at] = __float2bfloat16_rn(sum);
  } else if constexpr (M == OutMode::kF32) {
    static_cast<float*>(y)[at] = sum;
  } else {
    static_cast<float*>(y)[at] += sum;
  }
}

template <int NB>
void LaunchBatchPass(const Args& a) {
  const int blocks = (a.out + kBatchGroups - 1) / kBatchGroups;
  constexpr int threads = kBatchWarps * kBatchGroups * kWarp;
  switch (a.mode) {
    case OutMode::kBf16:
      GemvBatchKernel<NB, OutMode::kBf16><<<blocks, threads, 0, a.stream>>>(a.w, a.x, a.out, a.chunks, a.y);
      break;
    case OutMode::kF32:
      GemvBatchKernel<NB, OutMode::kF32><<<blocks, threads, 0, a.stream>>>(a.w, a.x, a.out, a.chunks, a.y);
      break;
    case OutMode::kF32Accumulate:
      GemvBatchKernel<NB, OutMode::kF32Accumulate>
          <<<blocks, threads, 0, a.stream>>>(a.w, a.x, a.out, a.chunks, a.y);
      break;
  }
}

void LaunchBatchPass(int nb, const Args& a) {
  switch (nb) {
    case 1: return LaunchBatchPass<1>(a);
    case 2: return LaunchBatchPass<2>(a);
    case 3: return LaunchBatchPass<3>(a);
    case 4: return LaunchBatchPass<4>(a);
    case 5: return LaunchBatchPass<5>(a);
    case 6: return LaunchBatchPass<6>(a);
    case 7: return LaunchBatchPass<7>(a);
    default: return LaunchBatchPass<8>(a);
  }
}

}  // namespace

GemvConfig DefaultGemvConfig(int /*out*/, int /*in*/) {
  // From tkv_gemv_bench --sweep on the H100 (132 configs x the five
  // Llama-8B shapes): 2 rows per pair of warps, 4 pairs per block, unroll 4
  // is within 1.1% of the best config on every shape (the per-shape bests
  // differ from each other by no more than run-to-run noise), so one config
  // serves all. The evict-first hint made no measurable difference there.
  return GemvConfig{/*rows_per_group=*/2, /*warps_per_row=*/2, /*groups_per_block=*/4,
                    /*unroll=*/4, /*evict_first=*/false};
}

static absl::Status CheckGemvArgs(const __nv_bfloat16* w, const __nv_bfloat16* x, int out, int in,
                           const void* y, bool y_bf16, bool accumulate) {
  if (w == nullptr) return absl::InvalidArgumentError("w: null");
  if (x == nullptr) return absl::InvalidArgumentError("x: null");
  if (y == nullptr) return absl::InvalidArgumentError("y: null");
  if (out < 1) return absl::InvalidArgumentError(absl::StrCat("out: ", out, " (must be >= 1)"));
  if (in < 8 || in % 8 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("in: ", in, " (must be a positive multiple of 8)"));
  }
  if (!Aligned(w, 16)) return absl::InvalidArgumentError("w: not 16-byte aligned");
  if (!Aligned(x, 16)) return absl::InvalidArgumentError("x: not 16-byte aligned");
  if (!Aligned(y, y_bf16 ? sizeof(__nv_bfloat16) : sizeof(float))) {
    return absl::InvalidArgumentError(
        absl::StrCat("y: not aligned to its element size (", y_bf16 ? "bf16" : "f32", ")"));
  }
  if (accumulate && y_bf16) {
    return absl::InvalidArgumentError("accumulate: not supported with a bf16 output (y_bf16)");
  }
  return absl::OkStatus();
}

absl::Status LaunchGemvBatchBf16(const __nv_bfloat16* w, const __nv_bfloat16* x, int batch,
                                 int out, int in, void* y, bool y_bf16, bool accumulate,
                                 cudaStream_t stream) {
  if (batch < 1) return absl::InvalidArgumentError(absl::StrCat("batch: ", batch, " (must be >= 1)"));
  if (absl::Status s = CheckGemvArgs(w, x, out, in, y, y_bf16, accumulate); !s.ok()) return s;
  const OutMode mode = y_bf16 ? OutMode::kBf16 : accumulate ? OutMode::kF32Accumulate : OutMode::kF32;
  const size_t y_elem = y_bf16 ? sizeof(__nv_bfloat16) : sizeof(float);
  for (int b0 = 0; b0 < batch; b0 += kGemvMaxBatch) {
    const int nb = std::min(kGemvMaxBatch, batch - b0);
    const Args a{reinterpret_cast<const uint4*>(w),
                 reinterpret_cast<const uint4*>(x + static_cast<int64_t>(b0) * in),
                 out,
                 in / 8,
                 static_cast<char*>(y) + static_cast<int64_t>(b0) * out * y_elem,
                 mode,
                 kBatchGroups,
                 stream};
    LaunchBatchPass(nb, a);
    CUDA_RETURN_IF_LAUNCH_FAILED("GemvBatchKernel");
  }
  return absl::OkStatus();
}

absl::Status LaunchGemvBf16With(const GemvConfig& config, const __nv_bfloat16* w,
                                const __nv_bfloat16* x, int out, int in, void* y, bool y_bf16,
                                bool accumulate, cudaStream_t stream) {
  if (absl::Status s = CheckGemvArgs(w, x, out, in, y, y_bf16, accumulate); !s.ok()) return s;
  const int warps = config.groups_per_block * config.warps_per_row;
  if (config.groups_per_block < 1 || warps > kMaxWarpsPerBlock) {
    return absl::InvalidArgumentError(
        absl::StrCat("GemvConfig.groups_per_block: ", config.groups_per_block,
                     " (groups_per_block * warps_per_row must be in [1, ", kMaxWarpsPerBlock,
                     "])"));
  }
  const Args a{reinterpret_cast<const uint4*>(w),
               reinterpret_cast<const uint4*>(x),
               out,
               in / 8,
               y,
               y_bf16       ? OutMode::kBf16
               : accumulate ? OutMode::kF32Accumulate
                            : OutMode::kF32,
               config.groups_per_block,
               stream};
  return Dispatch(config, a);
}

absl::Status LaunchGemvBf16(const __nv_bfloat16* w, const __nv_bfloat16* x, int out, int in,
                            void* y, bool y_bf16, bool accumulate, cudaStream_t stream) {
  return LaunchGemvBf16With(DefaultGemvConfig(out, in), w, x, out, in, y, y_bf16, accumulate,
                            stream);
}

}  // namespace tailorkv::cuda
