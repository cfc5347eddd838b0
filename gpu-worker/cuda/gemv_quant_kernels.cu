// Quantized GEMV and row dequantization (contract in gemv_quant_kernels.cuh).
//
// GEMV layout of the work: a warp owns kRows consecutive rows; lane l takes
// blocks l, l + 32, l + 64, ... of them, so a warp's loads of one row's
// nibbles are 32 consecutive 16-byte chunks (512 contiguous bytes). Per
// block a lane loads the 32 activations once (64 bytes of bf16 through L1:
// every warp reads all of x) and uses them for its kRows rows. Weight loads
// bypass L1 (read once). Each lane sums its blocks in order, a warp-shuffle
// tree sums the lanes: the order depends on cols only (deterministic).
#include "cuda/gemv_quant_kernels.cuh"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cuda/cuda_check.h"

namespace tailorkv::cuda {
namespace {

using model::GgmlType;

constexpr int kWarp = 32;
constexpr int kBlock = 32;          // values per quant block
constexpr int kRows = 2;            // rows per warp
constexpr int kWarpsPerBlock = 8;   // warps per thread block

enum class OutMode { kBf16, kF32, kF32Accumulate };

int64_t QsBytesPerBlock(GgmlType t) { return t == GgmlType::kQ8_0 ? 32 : 16; }
int64_t GgufBlockBytes(GgmlType t) {
  switch (t) {
    case GgmlType::kQ4_0: return 18;
    case GgmlType::kQ4_1: return 20;
    case GgmlType::kQ8_0: return 34;
    default: return 0;
  }
}

__device__ __forceinline__ uint4 LoadStream(const uint4* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// The 32 activations of block b as floats, and their sum.
__device__ __forceinline__ float LoadX(const uint4* x, int b, float (&xf)[kBlock]) {
  float sum = 0.0f;
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const uint4 v = __ldg(x + b * 4 + c);
    const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      xf[c * 8 + 2 * i] = __uint_as_float(u[i] << 16);
      xf[c * 8 + 2 * i + 1] = __uint_as_float(u[i] & 0xFFFF0000u);
    }
  }
#pragma unroll
  for (int i = 0; i < kBlock; ++i) sum += xf[i];
  return sum;
}

// A small unsigned integer (< 2^23) as float. kFast: through the bits of
// 2^23 + v (an OR and a subtraction, both exact) instead of an int-to-float
// conversion, which issues at a quarter of the FMA rate: the same value.
template <bool kFast>
__device__ __forceinline__ float SmallToFloat(uint32_t v) {
  if constexpr (kFast) {
    return __uint_as_float(0x4B000000u | v) - 8388608.0f;
  } else {
    return static_cast<float>(v);
  }
}

// sum_j q_j x_j over one Q4 block's 16 bytes (byte j: value j low, j + 16 high).
template <bool kFast>
__device__ __forceinline__ float DotNibbles(const uint4& v, const float (&xf)[kBlock]) {
  const uint32_t u[4] = {v.x, v.y, v.z, v.w};
  float acc = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t byte = (u[i] >> (8 * k)) & 0xFFu;
      const int j = i * 4 + k;
      acc = fmaf(SmallToFloat<kFast>(byte & 0xFu), xf[j], acc);
      acc = fmaf(SmallToFloat<kFast>(byte >> 4), xf[j + 16], acc);
    }
  }
  return acc;
}

// sum_j q_j x_j over one Q8_0 block's 32 int8 (two 16-byte chunks).
template <bool kFast>
__device__ __forceinline__ float DotInt8(const uint4& lo, const uint4& hi, const float (&xf)[kBlock]) {
  const uint32_t u[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
  float acc = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t byte = (u[i] >> (8 * k)) & 0xFFu;
      float q;
      if constexpr (kFast) {
        // 2^23 + (q + 128) less 2^23 + 128: exact.
        q = __uint_as_float(0x4B000000u | (byte ^ 0x80u)) - 8388736.0f;
      } else {
        q = static_cast<float>(static_cast<int8_t>(byte));
      }
      acc = fmaf(q, xf[i * 4 + k], acc);
    }
  }
  return acc;
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
  return v;
}

// NB activation rows (a decode batch) against the same weights: each block
// of weights is loaded once and used for all NB rows. Every (row, b) sum
// runs the same operations in the same order as with NB = 1 (its own
// accumulator, the same blocks per lane, the same shuffle tree), so a
// batch's outputs are bit-identical to each row's alone. x: [batch][cols];
// rows b >= batch (padding up to NB) read row batch - 1 and write nothing.
template <GgmlType T>
inline constexpr int kChunksOf = T == GgmlType::kQ8_0 ? 2 : 1;  // 16-byte chunks a block

// Block blk_i of each of a warp's rows: quants, scale (and min).
template <GgmlType T>
struct WeightBlocks {
  uint4 q[kRows][kChunksOf<T>];
  float scale[kRows], mn[kRows];
};

template <GgmlType T>
__device__ __forceinline__ void LoadWeightBlocks(const uint8_t* __restrict__ qs, const __half* __restrict__ d,
                                                 const __half* __restrict__ m, int rows, int row0, int nb,
                                                 int blk_i, WeightBlocks<T>& w) {
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    // A last warp's row past the end reads row rows - 1 (valid memory) and
    // discards the result: no per-row branch around the loads.
    const int64_t row = min(row0 + r, rows - 1);
    const int64_t blk = row * nb + blk_i;
    const uint4* qp = reinterpret_cast<const uint4*>(qs) + blk * kChunksOf<T>;
#pragma unroll
    for (int c = 0; c < kChunksOf<T>; ++c) w.q[r][c] = LoadStream(qp + c);
    w.scale[r] = __half2float(d[blk]);
    w.mn[r] = T == GgmlType::kQ4_1 ? __half2float(m[blk]) : 0.0f;
  }
}

// acc[r][b] += block blk_i's partial sum of row r against x's row b.
template <GgmlType T, int NB, bool kFast>
__device__ __forceinline__ void AccumulateBlocks(const uint4* __restrict__ x, int64_t x_stride, int batch,
                                                 int blk_i, const WeightBlocks<T>& w, float (&acc)[kRows][NB]) {
#pragma unroll
  for (int b = 0; b < NB; ++b) {
    float xf[kBlock];
    const float xsum = LoadX(x + min(b, batch - 1) * x_stride, blk_i, xf);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if constexpr (T == GgmlType::kQ8_0) {
        acc[r][b] = fmaf(w.scale[r], DotInt8<kFast>(w.q[r][0], w.q[r][1], xf), acc[r][b]);
      } else if constexpr (T == GgmlType::kQ4_0) {
        // d * sum (q - 8) x = d * (sum q x - 8 sum x)
        acc[r][b] = fmaf(w.scale[r], DotNibbles<kFast>(w.q[r][0], xf) - 8.0f * xsum, acc[r][b]);
      } else {
        // sum (d q + m) x = d * sum q x + m * sum x
        acc[r][b] = fmaf(w.scale[r], DotNibbles<kFast>(w.q[r][0], xf), fmaf(w.mn[r], xsum, acc[r][b]));
      }
    }
  }
}

// kPipelined: a lane issues the loads of its next kPipelineBlocks blocks
// before their arithmetic (more bytes in flight per warp: the small
// matrices were latency-bound at 37-55% of the bandwidth on an H100) and
// converts quants with SmallToFloat<true>. Each accumulator still takes the
// lane's blocks in increasing order through the same operations, so the
// result is bit-identical to kSimple's.
constexpr int kPipelineBlocks = 4;

template <GgmlType T, OutMode M, int NB, bool kPipelined>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarp)
    GemvQuantKernel(const uint8_t* __restrict__ qs, const __half* __restrict__ d, const __half* __restrict__ m,
                    const uint4* __restrict__ x, int batch, int rows, int nb, void* __restrict__ y) {
  const int warp = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int row0 = warp * kRows;
  if (row0 >= rows) return;  // whole warps only: the shuffles below stay full
  const int64_t x_stride = static_cast<int64_t>(nb) * 4;  // uint4 a row of x
  float acc[kRows][NB];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int b = 0; b < NB; ++b) acc[r][b] = 0.0f;
  }
  int blk_i = lane;
  if constexpr (kPipelined) {
    for (; blk_i + (kPipelineBlocks - 1) * kWarp < nb; blk_i += kPipelineBlocks * kWarp) {
      WeightBlocks<T> w[kPipelineBlocks];
#pragma unroll
      for (int u = 0; u < kPipelineBlocks; ++u) {
        LoadWeightBlocks<T>(qs, d, m, rows, row0, nb, blk_i + u * kWarp, w[u]);
      }
#pragma unroll
      for (int u = 0; u < kPipelineBlocks; ++u) {
        AccumulateBlocks<T, NB, true>(x, x_stride, batch, blk_i + u * kWarp, w[u], acc);
      }
    }
  }
  for (; blk_i < nb; blk_i += kWarp) {
    WeightBlocks<T> w;
    LoadWeightBlocks<T>(qs, d, m, rows, row0, nb, blk_i, w);
    AccumulateBlocks<T, NB, kPipelined>(x, x_stride, batch, blk_i, w, acc);
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int b = 0; b < NB; ++b) acc[r][b] = WarpSum(acc[r][b]);
  }
  if (lane != 0) return;
#pragma unroll
  for (int b = 0; b < NB; ++b) {
    if (b >= batch) break;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row = row0 + r;
      if (row >= rows) break;
      const int64_t at = static_cast<int64_t>(b) * rows + row;
      if constexpr (M == OutMode::kBf16) {
        static_cast<__nv_bfloat16*>(y)[at] = __float2bfloat16_rn(acc[r][b]);
      } else if constexpr (M == OutMode::kF32) {
        static_cast<float*>(y)[at] = acc[r][b];
      } else {
        static_cast<float*>(y)[at] += acc[r][b];
      }
    }
  }
}

// One thread per value of the tile: value k of row first + i.
template <GgmlType T>
__global__ void DequantizeRowsKernel(const uint8_t* __restrict__ qs, const __half* __restrict__ d,
                                     const __half* __restrict__ m, int first, int count, int cols,
                                     __nv_bfloat16* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<int64_t>(count) * cols) return;
  const int64_t row = first + i / cols;
  const int k = static_cast<int>(i % cols);
  const int nb = cols / kBlock;
  const int64_t blk = row * nb + k / kBlock;
  const int j = k % kBlock;
  const float scale = __half2float(d[blk]);
  float v;
  if constexpr (T == GgmlType::kQ8_0) {
    v = __fmul_rn(scale, static_cast<float>(static_cast<int8_t>(qs[blk * 32 + j])));
  } else {
    const uint8_t byte = qs[blk * 16 + (j % 16)];
    const int q = j < 16 ? (byte & 0xF) : (byte >> 4);
    // GGUF's float32 expressions, unfused (ggml_types.cc is built so).
    v = T == GgmlType::kQ4_0 ? __fmul_rn(scale, static_cast<float>(q - 8))
                             : __fadd_rn(__fmul_rn(scale, static_cast<float>(q)), __half2float(m[blk]));
  }
  out[i] = __float2bfloat16_rn(v);
}

__device__ __forceinline__ uint64_t Mix(uint64_t seed, int64_t i) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ull * static_cast<uint64_t>(i + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Thread i: 8 bytes of quants, then (i < blocks) block i's scale and min.
__global__ void FillRandomPlanesKernel(uint8_t* qs, int64_t qs_words, __half* d, __half* m, int64_t blocks,
                                       uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < qs_words || i < blocks;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (i < qs_words) reinterpret_cast<uint64_t*>(qs)[i] = Mix(seed, i);
    if (i < blocks) {
      const float u = static_cast<float>(Mix(seed ^ 0x5DEECE66Dull, i) >> 40) * (1.0f / 16777216.0f);
      const float dv = scale * (0.75f + 0.5f * u);
      d[i] = __float2half_rn(dv);
      if (m != nullptr) m[i] = __float2half_rn(-8.0f * dv);
    }
  }
}

bool Aligned(const void* p, size_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

absl::Status CheckView(const char* fn, const QuantMatrixView& w) {
  if (!GemvQuantSupports(w.type)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: w.type %u has no quantized GEMV", fn, static_cast<uint32_t>(w.type)));
  }
  if (w.rows < 1) return absl::InvalidArgumentError(absl::StrFormat("%s: w.rows = %d < 1", fn, w.rows));
  if (w.cols < kBlock || w.cols % kBlock != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: w.cols = %d is not a positive multiple of 32", fn, w.cols));
  }
  if (w.qs == nullptr || w.d == nullptr) return absl::InvalidArgumentError(absl::StrFormat("%s: w.qs or w.d is null", fn));
  if (w.type == GgmlType::kQ4_1 && w.m == nullptr) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: w.m is null (Q4_1 needs its mins)", fn));
  }
  if (!Aligned(w.qs, 16) || !Aligned(w.d, 16) || (w.m != nullptr && !Aligned(w.m, 16))) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: w.qs, w.d and w.m must be 16-byte aligned", fn));
  }
  return absl::OkStatus();
}

template <GgmlType T, int NB, bool kPipelined>
void LaunchGemvBatchOf(const QuantMatrixView& w, const uint4* x, int batch, void* y, OutMode mode,
                       cudaStream_t stream) {
  const int warps = (w.rows + kRows - 1) / kRows;
  const int blocks = (warps + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int threads = kWarpsPerBlock * kWarp;
  const int nb = w.cols / kBlock;
  switch (mode) {
    case OutMode::kBf16:
      GemvQuantKernel<T, OutMode::kBf16, NB, kPipelined>
          <<<blocks, threads, 0, stream>>>(w.qs, w.d, w.m, x, batch, w.rows, nb, y);
      break;
    case OutMode::kF32:
      GemvQuantKernel<T, OutMode::kF32, NB, kPipelined>
          <<<blocks, threads, 0, stream>>>(w.qs, w.d, w.m, x, batch, w.rows, nb, y);
      break;
    case OutMode::kF32Accumulate:
      GemvQuantKernel<T, OutMode::kF32Accumulate, NB, kPipelined>
          <<<blocks, threads, 0, stream>>>(w.qs, w.d, w.m, x, batch, w.rows, nb, y);
      break;
  }
}

template <GgmlType T, int NB>
void LaunchGemvBatchOf(const QuantMatrixView& w, const uint4* x, int batch, void* y, OutMode mode,
                       GemvQuantKernelKind kind, cudaStream_t stream) {
  if (kind == GemvQuantKernelKind::kPipelined) {
    LaunchGemvBatchOf<T, NB, true>(w, x, batch, y, mode, stream);
  } else {
    LaunchGemvBatchOf<T, NB, false>(w, x, batch, y, mode, stream);
  }
}

// Passes of up to kGemvQuantMaxBatch rows, each padded to a power of two.
template <GgmlType T>
void LaunchGemvTyped(const QuantMatrixView& w, const uint4* x, int batch, void* y, size_t y_elem, OutMode mode,
                     GemvQuantKernelKind kind, cudaStream_t stream) {
  const int64_t x_stride = static_cast<int64_t>(w.cols) / 8;  // uint4 a row
  for (int b0 = 0; b0 < batch; b0 += kGemvQuantMaxBatch) {
    const int n = std::min(kGemvQuantMaxBatch, batch - b0);
    const uint4* xb = x + b0 * x_stride;
    void* yb = static_cast<char*>(y) + static_cast<int64_t>(b0) * w.rows * y_elem;
    if (n == 1) {
      LaunchGemvBatchOf<T, 1>(w, xb, n, yb, mode, kind, stream);
    } else if (n == 2) {
      LaunchGemvBatchOf<T, 2>(w, xb, n, yb, mode, kind, stream);
    } else if (n <= 4) {
      LaunchGemvBatchOf<T, 4>(w, xb, n, yb, mode, kind, stream);
    } else {
      LaunchGemvBatchOf<T, 8>(w, xb, n, yb, mode, kind, stream);
    }
  }
}

}  // namespace

bool GemvQuantSupports(model::GgmlType type) {
  return type == GgmlType::kQ4_0 || type == GgmlType::kQ4_1 || type == GgmlType::kQ8_0;
}

absl::StatusOr<QuantPlanes> RepackForGemv(model::GgmlType type, const uint8_t* bytes, int64_t n_bytes,
                                          int64_t rows, int64_t cols) {
  constexpr const char* fn = "RepackForGemv";
  if (!GemvQuantSupports(type)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: type %u has no quantized GEMV", fn, static_cast<uint32_t>(type)));
  }
  if (rows < 1) return absl::InvalidArgumentError(absl::StrFormat("%s: rows = %d < 1", fn, rows));
  if (cols < kBlock || cols % kBlock != 0) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: cols = %d is not a positive multiple of 32", fn, cols));
  }
  const int64_t nb = cols / kBlock, gb = GgufBlockBytes(type), qb = QsBytesPerBlock(type);
  if (rows > INT64_MAX / (nb * gb) || n_bytes != rows * nb * gb || bytes == nullptr) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: n_bytes = %d, %d x %d values need %d", fn, n_bytes,
                                                      rows, cols, rows <= INT64_MAX / (nb * gb) ? rows * nb * gb : -1));
  }
  QuantPlanes p;
  p.type = type;
  p.rows = rows;
  p.cols = cols;
  const int64_t blocks = rows * nb;
  p.qs.resize(static_cast<size_t>(blocks * qb));
  p.d.resize(static_cast<size_t>(blocks));
  if (type == GgmlType::kQ4_1) p.m.resize(static_cast<size_t>(blocks));
  const int64_t q_offset = type == GgmlType::kQ4_1 ? 4 : 2;  // the quants after d (and m)
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* src = bytes + b * gb;
    std::memcpy(&p.d[static_cast<size_t>(b)], src, 2);
    if (type == GgmlType::kQ4_1) std::memcpy(&p.m[static_cast<size_t>(b)], src + 2, 2);
    std::memcpy(p.qs.data() + b * qb, src + q_offset, static_cast<size_t>(qb));
  }
  return p;
}

absl::Status LaunchGemvQuantBatch(const QuantMatrixView& w, const __nv_bfloat16* x, int batch, void* y,
                                  bool y_bf16, bool accumulate, cudaStream_t stream, GemvQuantKernelKind kind) {
  constexpr const char* fn = "LaunchGemvQuant";
  if (auto st = CheckView(fn, w); !st.ok()) return st;
  if (batch < 1) return absl::InvalidArgumentError(absl::StrFormat("%s: batch = %d < 1", fn, batch));
  if (x == nullptr || y == nullptr) return absl::InvalidArgumentError(absl::StrFormat("%s: x or y is null", fn));
  if (!Aligned(x, 16)) return absl::InvalidArgumentError(absl::StrFormat("%s: x must be 16-byte aligned", fn));
  if (!Aligned(y, y_bf16 ? 2 : 4)) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: y is misaligned for its type", fn));
  }
  if (y_bf16 && accumulate) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: accumulate needs a float32 y", fn));
  }
  const OutMode mode = y_bf16 ? OutMode::kBf16 : (accumulate ? OutMode::kF32Accumulate : OutMode::kF32);
  const auto* xv = reinterpret_cast<const uint4*>(x);
  const size_t y_elem = y_bf16 ? 2 : 4;
  switch (w.type) {
    case GgmlType::kQ4_0: LaunchGemvTyped<GgmlType::kQ4_0>(w, xv, batch, y, y_elem, mode, kind, stream); break;
    case GgmlType::kQ4_1: LaunchGemvTyped<GgmlType::kQ4_1>(w, xv, batch, y, y_elem, mode, kind, stream); break;
    default: LaunchGemvTyped<GgmlType::kQ8_0>(w, xv, batch, y, y_elem, mode, kind, stream); break;
  }
  CUDA_RETURN_IF_LAUNCH_FAILED("GemvQuantKernel");
  return absl::OkStatus();
}

absl::Status LaunchGemvQuant(const QuantMatrixView& w, const __nv_bfloat16* x, void* y, bool y_bf16,
                             bool accumulate, cudaStream_t stream, GemvQuantKernelKind kind) {
  return LaunchGemvQuantBatch(w, x, 1, y, y_bf16, accumulate, stream, kind);
}

absl::Status LaunchDequantizeRows(const QuantMatrixView& w, int first, int count, __nv_bfloat16* out,
                                  cudaStream_t stream) {
  constexpr const char* fn = "LaunchDequantizeRows";
  if (auto st = CheckView(fn, w); !st.ok()) return st;
  if (first < 0 || count < 1 || first > w.rows - count) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: rows [first, first + count) = [%d, %d) is not inside [0, %d)", fn, first,
                        static_cast<int64_t>(first) + count, w.rows));
  }
  if (out == nullptr) return absl::InvalidArgumentError(absl::StrFormat("%s: out is null", fn));
  const int64_t n = static_cast<int64_t>(count) * w.cols;
  constexpr int kThreads = 256;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  if (blocks > INT32_MAX) return absl::InvalidArgumentError(absl::StrFormat("%s: %d values is too large a tile", fn, n));
  switch (w.type) {
    case GgmlType::kQ4_0:
      DequantizeRowsKernel<GgmlType::kQ4_0><<<blocks, kThreads, 0, stream>>>(w.qs, w.d, w.m, first, count, w.cols, out);
      break;
    case GgmlType::kQ4_1:
      DequantizeRowsKernel<GgmlType::kQ4_1><<<blocks, kThreads, 0, stream>>>(w.qs, w.d, w.m, first, count, w.cols, out);
      break;
    default:
      DequantizeRowsKernel<GgmlType::kQ8_0><<<blocks, kThreads, 0, stream>>>(w.qs, w.d, w.m, first, count, w.cols, out);
      break;
  }
  CUDA_RETURN_IF_LAUNCH_FAILED("DequantizeRowsKernel");
  return absl::OkStatus();
}

absl::Status LaunchFillRandomQuantPlanes(model::GgmlType type, uint8_t* qs, __half* d, __half* m, int64_t rows,
                                         int64_t cols, uint64_t seed, float scale, cudaStream_t stream) {
  constexpr const char* fn = "LaunchFillRandomQuantPlanes";
  if (!GemvQuantSupports(type)) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: type %u has no quantized GEMV", fn, static_cast<uint32_t>(type)));
  }
  if (rows < 1 || cols < kBlock || cols % kBlock != 0) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: %d x %d is not rows >= 1 by a multiple of 32", fn, rows, cols));
  }
  if (qs == nullptr || d == nullptr || (type == GgmlType::kQ4_1) != (m != nullptr)) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: null qs or d, or m given for a type without mins", fn));
  }
  const int64_t blocks = rows * (cols / kBlock);
  const int64_t qs_words = blocks * QsBytesPerBlock(type) / 8;
  constexpr int kThreads = 256;
  const int64_t grid = std::min<int64_t>((std::max(qs_words, blocks) + kThreads - 1) / kThreads, 65536);
  FillRandomPlanesKernel<<<static_cast<int>(grid), kThreads, 0, stream>>>(qs, qs_words, d, m, blocks, seed, scale);
  CUDA_RETURN_IF_LAUNCH_FAILED("FillRandomPlanesKernel");
  return absl::OkStatus();
}

}  // namespace tailorkv::cuda
