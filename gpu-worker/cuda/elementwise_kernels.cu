// The per-token elementwise kernels of a Llama layer (contract in the .cuh).
//
// Three layers per op: a __global__ kernel templated on its compile-time
// sizes (vector width; head_dim for RoPE), a dispatcher that maps runtime
// sizes onto those instantiations through a switch whose default is
// InvalidArgument, and the public launcher that validates arguments, launches
// on the caller's stream and checks the launch.
//
// Argument conventions shared by every launcher:
//   - A row or element count n of 0 is a no-op that returns OK before any
//     pointer is looked at, so an empty chunk needs no buffers (the other
//     sizes must still be valid). Argmax has no such case: vocab must be > 0.
//     Negative counts, non-positive widths and null pointers are
//     InvalidArgument.
//   - RoPE supports head_dim 64 and 128 (as the attention kernels do) and
//     needs n <= capacity; cache rows at positions outside [0, capacity) are
//     not written (Q still is), since *start_pos is only known on the device.
//   - Validation runs before any CUDA call, so it needs no device.
//   - All kernels are memory-bound. Each has a 16-byte vector path, taken when
//     the row width is a multiple of the vector width and the base pointers
//     are 16-byte aligned, and a scalar path for everything else (odd widths,
//     offset pointers) that computes bit-identical results.
#include <cstdint>
#include <limits>

#include "absl/strings/str_cat.h"
#include "cuda/cuda_check.h"
#include "cuda/elementwise_kernels.cuh"

namespace tailorkv::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxBlock = 1024;
constexpr int kDefaultBlock = 256;
// Grid-stride kernels never need more blocks than this to fill an H100
// (132 SMs x 2048 threads / 256 threads per block = 1056 resident blocks).
constexpr int64_t kMaxGridStrideBlocks = 4096;

// ---------------------------------------------------------------------------
// Device helpers: vector loads/stores and block reductions.
// ---------------------------------------------------------------------------

__device__ __forceinline__ uint32_t Bf16Bits(float f) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}

// Two floats rounded to bf16, `lo` at the lower address (little endian).
__device__ __forceinline__ uint32_t PackBf16x2(float lo, float hi) {
  return Bf16Bits(lo) | (Bf16Bits(hi) << 16);
}

// v[0..V) = p[0..V). V % 4 == 0 requires p 16-byte aligned.
template <int V>
__device__ __forceinline__ void LoadF32(const float* __restrict__ p, float (&v)[V]) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int k = 0; k < V / 4; ++k) {
      const float4 t = reinterpret_cast<const float4*>(p)[k];
      v[4 * k + 0] = t.x;
      v[4 * k + 1] = t.y;
      v[4 * k + 2] = t.z;
      v[4 * k + 3] = t.w;
    }
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = p[k];
  }
}

// p[0..V) = v[0..V). V % 4 == 0 requires p 16-byte aligned.
template <int V>
__device__ __forceinline__ void StoreF32(float* __restrict__ p, const float (&v)[V]) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int k = 0; k < V / 4; ++k) {
      reinterpret_cast<float4*>(p)[k] =
          make_float4(v[4 * k], v[4 * k + 1], v[4 * k + 2], v[4 * k + 3]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) p[k] = v[k];
  }
}

// p[0..V) = bf16(v[0..V)), round to nearest even. V == 8 requires p 16-byte aligned.
template <int V>
__device__ __forceinline__ void StoreBf16(__nv_bfloat16* __restrict__ p, const float (&v)[V]) {
  if constexpr (V == 8) {
    uint4 u;
    u.x = PackBf16x2(v[0], v[1]);
    u.y = PackBf16x2(v[2], v[3]);
    u.z = PackBf16x2(v[4], v[5]);
    u.w = PackBf16x2(v[6], v[7]);
    *reinterpret_cast<uint4*>(p) = u;
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) p[k] = __float2bfloat16_rn(v[k]);
  }
}

// v[0..V) = float(p[0..V)) (exact). V == 8 requires p 16-byte aligned.
template <int V>
__device__ __forceinline__ void LoadBf16AsF32(const __nv_bfloat16* __restrict__ p, float (&v)[V]) {
  if constexpr (V == 8) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      v[2 * k] = __uint_as_float(w[k] << 16);
      v[2 * k + 1] = __uint_as_float(w[k] & 0xFFFF0000u);
    }
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = __bfloat162float(p[k]);
  }
}

// p[0..V) = q[0..V) (bit copy). V == 8 requires p and q 16-byte aligned.
template <int V>
__device__ __forceinline__ void CopyBf16(const __nv_bfloat16* __restrict__ q,
                                         __nv_bfloat16* __restrict__ p) {
  if constexpr (V == 8) {
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(q);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) p[k] = q[k];
  }
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
  return v;
}

__device__ __forceinline__ uint64_t WarpMax(uint64_t v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) {
    const uint64_t o = __shfl_xor_sync(0xFFFFFFFFu, v, off);
    v = o > v ? o : v;
  }
  return v;
}

// Sum over the block; every thread gets the total. blockDim.x must be a
// multiple of 32 (<= 1024) and every thread of the block must call it once.
__device__ float BlockSum(float v) {
  __shared__ float warp_sums[kMaxBlock / kWarp];
  __shared__ float total;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  v = WarpSum(v);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float t = lane < static_cast<int>(blockDim.x / kWarp) ? warp_sums[lane] : 0.0f;
    t = WarpSum(t);
    if (lane == 0) total = t;
  }
  __syncthreads();
  return total;
}

// Max over the block, valid in thread 0. Same preconditions as BlockSum.
__device__ uint64_t BlockMax(uint64_t v) {
  __shared__ uint64_t warp_max[kMaxBlock / kWarp];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  v = WarpMax(v);
  if (lane == 0) warp_max[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / kWarp) ? warp_max[lane] : 0;
    v = WarpMax(v);
  }
  return v;
}

// ---------------------------------------------------------------------------
// Kernels.
// ---------------------------------------------------------------------------

// One block per token; hidden % kVec == 0.
//   table: [vocab][hidden] bf16   ids: [n]   out: [n][hidden] f32   (n = gridDim.x)
template <int kVec>
__global__ void __launch_bounds__(kDefaultBlock)
    EmbeddingKernel(const __nv_bfloat16* __restrict__ table, int vocab,
                    const int32_t* __restrict__ ids, int hidden, float* __restrict__ out) {
  const int32_t id = ids[blockIdx.x];
  float* dst = out + static_cast<int64_t>(blockIdx.x) * hidden;
  const int chunks = hidden / kVec;
  if (id < 0 || id >= vocab) {
    float zeros[kVec] = {};
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) StoreF32<kVec>(dst + c * kVec, zeros);
    return;
  }
  const __nv_bfloat16* src = table + static_cast<int64_t>(id) * hidden;
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
    float v[kVec];
    LoadBf16AsF32<kVec>(src + c * kVec, v);
    StoreF32<kVec>(dst + c * kVec, v);
  }
}

// One block per row; hidden % kVec == 0; blockDim.x a multiple of 32.
// Operation order matches ref::RmsNorm: inv = 1 / sqrt(ss / hidden + eps),
// out = (x * inv) * w. The sum of squares is a float tree reduction (the
// reference sums in double); the difference is ~1e-7 relative.
//   x: [n][hidden] f32   w: [hidden] f32   out: [n][hidden] bf16   (n = gridDim.x)
template <int kVec>
__global__ void __launch_bounds__(kMaxBlock)
    RmsNormKernel(const float* __restrict__ x, const float* __restrict__ w, int hidden, float eps,
                  __nv_bfloat16* __restrict__ out) {
  const float* xr = x + static_cast<int64_t>(blockIdx.x) * hidden;
  __nv_bfloat16* orow = out + static_cast<int64_t>(blockIdx.x) * hidden;
  const int chunks = hidden / kVec;
  float ss = 0.0f;
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
    float v[kVec];
    LoadF32<kVec>(xr + c * kVec, v);
#pragma unroll
    for (int k = 0; k < kVec; ++k) ss = fmaf(v[k], v[k], ss);
  }
  ss = BlockSum(ss);
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(hidden) + eps);
  // Second pass re-reads the row (at most a few KB per block, served from L1/L2).
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
    float v[kVec], wv[kVec], o[kVec];
    LoadF32<kVec>(xr + c * kVec, v);
    LoadF32<kVec>(w + c * kVec, wv);
#pragma unroll
    for (int k = 0; k < kVec; ++k) o[k] = v[k] * inv * wv[k];
    StoreBf16<kVec>(orow + c * kVec, o);
  }
}

// One block per token t, at position *start_pos + t. blockDim.x must be a
// multiple of kHeadDim / 2: each thread then keeps one frequency index i for
// every head it rotates, so the precise sincosf (whose exact argument
// reduction is slow at large angles) runs once per thread. The angle is the
// float product (float)pos * inv_freq[i], exactly as ref::ApplyRope forms it.
// Positions outside [0, capacity) write Q but not the cache (the kernel must
// not write out of bounds; the caller keeps positions in range). Inputs are
// widened to float exactly, so the rotation is ref::ApplyRope's float
// arithmetic on the bf16 values; V is a bit copy.
//   qkv:      [n][(n_heads + 2 * n_kv_heads) * kHeadDim] bf16, Q | K | V per token
//   start_pos: [1]     inv_freq: [kHeadDim / 2] f32
//   q_out:    [n][n_heads][kHeadDim] bf16
//   k_cache, v_cache: [n_kv_heads][capacity][kHeadDim] bf16
template <int kHeadDim, bool kAdjacentPairs, int kVec>
__global__ void __launch_bounds__(kMaxBlock)
    RopeAppendKvKernel(const __nv_bfloat16* __restrict__ qkv, const int32_t* __restrict__ start_pos,
                       int n_heads, int n_kv_heads, const float* __restrict__ inv_freq,
                       __nv_bfloat16* __restrict__ q_out, __nv_bfloat16* __restrict__ k_cache,
                       __nv_bfloat16* __restrict__ v_cache, int capacity) {
  static_assert(kHeadDim % (2 * kVec) == 0);
  constexpr int kHalf = kHeadDim / 2;
  const int t = blockIdx.x;
  const int pos = *start_pos + t;
  const bool in_cache = pos >= 0 && pos < capacity;
  const int64_t row_width = static_cast<int64_t>(n_heads + 2 * n_kv_heads) * kHeadDim;
  const __nv_bfloat16* row = qkv + t * row_width;

  const int i = threadIdx.x % kHalf;
  float sin_a, cos_a;
  sincosf(static_cast<float>(pos) * inv_freq[i], &sin_a, &cos_a);
  const int a = kAdjacentPairs ? 2 * i : i;
  const int b = kAdjacentPairs ? 2 * i + 1 : i + kHalf;
  const int heads_per_pass = blockDim.x / kHalf;
  // Heads [0, n_heads) are Q, [n_heads, n_heads + n_kv_heads) are K.
  for (int h = threadIdx.x / kHalf; h < n_heads + n_kv_heads; h += heads_per_pass) {
    const __nv_bfloat16* src = row + h * kHeadDim;
    const float x0 = __bfloat162float(src[a]);
    const float x1 = __bfloat162float(src[b]);
    const float r0 = x0 * cos_a - x1 * sin_a;
    const float r1 = x0 * sin_a + x1 * cos_a;
    __nv_bfloat16* dst;
    if (h < n_heads) {
      dst = q_out + (static_cast<int64_t>(t) * n_heads + h) * kHeadDim;
    } else if (in_cache) {
      dst = k_cache + (static_cast<int64_t>(h - n_heads) * capacity + pos) * kHeadDim;
    } else {
      continue;
    }
    dst[a] = __float2bfloat16_rn(r0);
    dst[b] = __float2bfloat16_rn(r1);
  }
  if (!in_cache) return;

  const __nv_bfloat16* v = row + static_cast<int64_t>(n_heads + n_kv_heads) * kHeadDim;
  constexpr int kChunksPerHead = kHeadDim / kVec;
  for (int c = threadIdx.x; c < n_kv_heads * kChunksPerHead; c += blockDim.x) {
    const int h = c / kChunksPerHead;
    const int d = (c % kChunksPerHead) * kVec;
    CopyBf16<kVec>(v + h * kHeadDim + d,
                   v_cache + (static_cast<int64_t>(h) * capacity + pos) * kHeadDim + d);
  }
}

// Grid-stride over the n * ffn / kVec chunks; ffn % kVec == 0. Same float
// expression as ref::SwiGlu on the exactly widened inputs: g / (1 + exp(-g)) * u.
//   gate_up: [n][2 * ffn] bf16 (gate | up per row)   out: [n][ffn] bf16
template <int kVec>
__global__ void __launch_bounds__(kDefaultBlock)
    SwiGluKernel(const __nv_bfloat16* __restrict__ gate_up, int64_t n, int ffn,
                 __nv_bfloat16* __restrict__ out) {
  const int chunks_per_row = ffn / kVec;
  const int64_t total = n * chunks_per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < total;
       c += stride) {
    const int64_t r = c / chunks_per_row;
    const int j = static_cast<int>(c - r * chunks_per_row) * kVec;
    const __nv_bfloat16* g = gate_up + r * 2 * ffn + j;
    float gv[kVec], uv[kVec], o[kVec];
    LoadBf16AsF32<kVec>(g, gv);
    LoadBf16AsF32<kVec>(g + ffn, uv);
#pragma unroll
    for (int k = 0; k < kVec; ++k) o[k] = gv[k] / (1.0f + expf(-gv[k])) * uv[k];
    StoreBf16<kVec>(out + r * ffn + j, o);
  }
}

// Orders (value, id) pairs as one unsigned key: larger value first, then
// lower id. NaN ranks below every number (including -inf); -0 and +0 tie.
__device__ __forceinline__ uint64_t ArgmaxKey(float v, int i) {
  uint32_t u = __float_as_uint(v);
  uint32_t key;
  if (isnan(v)) {
    key = 0;
  } else {
    if ((u << 1) == 0) u = 0;  // -0 -> +0: they compare equal on the CPU, so they tie here
    // Monotone map of float order onto unsigned order; -inf maps to 0x007FFFFF > 0.
    key = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  return (static_cast<uint64_t>(key) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(i));
}

constexpr int kArgmaxThreads = 1024;
constexpr int kArgmaxUnroll = 4;

// A single block: greedy decoding reads one vocab row per step. Measured on
// an H100 (ncu, row in L2): 20 us for vocab 128256, bound by the key
// arithmetic of one SM; a multi-block version would need a workspace that
// the contract does not have.
//   logits: [vocab] f32   out_id: [1]
template <int kVec>
__global__ void __launch_bounds__(kArgmaxThreads)
    ArgmaxKernel(const float* __restrict__ logits, int vocab, int32_t* __restrict__ out_id) {
  uint64_t best = 0;  // below every real key: the low half of a real key is >= 2^32 - vocab > 0
  const int body = vocab / kVec;
  const int stride = blockDim.x;
  int c = threadIdx.x;
  // kArgmaxUnroll independent loads in flight before the first use: one SM streams
  // the row, so latency, not bandwidth, bounds this loop.
  for (; c + (kArgmaxUnroll - 1) * stride < body; c += kArgmaxUnroll * stride) {
    float v[kArgmaxUnroll][kVec];
#pragma unroll
    for (int u = 0; u < kArgmaxUnroll; ++u) LoadF32<kVec>(logits + (c + u * stride) * kVec, v[u]);
#pragma unroll
    for (int u = 0; u < kArgmaxUnroll; ++u) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const uint64_t key = ArgmaxKey(v[u][k], (c + u * stride) * kVec + k);
        best = key > best ? key : best;
      }
    }
  }
  for (; c < body; c += stride) {
    float v[kVec];
    LoadF32<kVec>(logits + c * kVec, v);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const uint64_t key = ArgmaxKey(v[k], c * kVec + k);
      best = key > best ? key : best;
    }
  }
  for (int i = body * kVec + threadIdx.x; i < vocab; i += blockDim.x) {
    const uint64_t key = ArgmaxKey(logits[i], i);
    best = key > best ? key : best;
  }
  best = BlockMax(best);
  if (threadIdx.x == 0) {
    *out_id = static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(best & 0xFFFFFFFFu));
  }
}

// Grid-stride; the first n / kVec * kVec elements in vectors, the rest scalar.
//   src: [n] f32   dst: [n] bf16
template <int kVec>
__global__ void __launch_bounds__(kDefaultBlock)
    F32ToBf16Kernel(const float* __restrict__ src, int64_t n, __nv_bfloat16* __restrict__ dst) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t body = n / kVec;
  for (int64_t c = tid; c < body; c += stride) {
    float v[kVec];
    LoadF32<kVec>(src + c * kVec, v);
    StoreBf16<kVec>(dst + c * kVec, v);
  }
  for (int64_t i = body * kVec + tid; i < n; i += stride) dst[i] = __float2bfloat16_rn(src[i]);
}

//   value: [1]
__global__ void AddScalarKernel(int32_t* value, int32_t delta) { *value += delta; }

// ---------------------------------------------------------------------------
// Host helpers.
// ---------------------------------------------------------------------------

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Threads for a block that strides over `work` items: a multiple of 32 in
// [32, max_threads].
int BlockFor(int64_t work, int max_threads) {
  const int64_t rounded = (work + kWarp - 1) / kWarp * kWarp;
  if (rounded < kWarp) return kWarp;
  return rounded > max_threads ? max_threads : static_cast<int>(rounded);
}

int GridFor(int64_t work, int threads) {
  int64_t blocks = (work + threads - 1) / threads;
  if (blocks < 1) blocks = 1;
  return static_cast<int>(blocks > kMaxGridStrideBlocks ? kMaxGridStrideBlocks : blocks);
}

absl::Status NullPointer(const char* op) {
  return absl::InvalidArgumentError(absl::StrCat(op, ": null pointer argument"));
}

absl::Status UnsupportedVector(const char* op, int vec) {
  return absl::InvalidArgumentError(absl::StrCat(op, ": no kernel for vector width ", vec));
}

template <int kHeadDim, bool kAdjacentPairs>
absl::Status DispatchRope(const __nv_bfloat16* qkv, int n, const int32_t* start_pos, int n_heads,
                          int n_kv_heads, const float* inv_freq, __nv_bfloat16* q_out,
                          __nv_bfloat16* k_cache, __nv_bfloat16* v_cache, int capacity,
                          cudaStream_t stream) {
  // One thread per rotated pair, up to kMaxBlock (a multiple of kHeadDim / 2):
  // a decode step is one block, and its time is the chain of dependent
  // load-rotate-store passes over the heads (Llama-8B: 3 passes, not the 10
  // of a 256-thread block, which took 5.4 us per layer on an H100, ncu).
  static_assert(kMaxBlock % (kHeadDim / 2) == 0);
  const int64_t pairs = static_cast<int64_t>(n_heads + n_kv_heads) * (kHeadDim / 2);
  const int threads = pairs < kMaxBlock ? static_cast<int>(pairs) : kMaxBlock;
  const int vec = Aligned16(qkv) && Aligned16(v_cache) ? 8 : 1;
  switch (vec) {
    case 8:
      RopeAppendKvKernel<kHeadDim, kAdjacentPairs, 8><<<n, threads, 0, stream>>>(
          qkv, start_pos, n_heads, n_kv_heads, inv_freq, q_out, k_cache, v_cache, capacity);
      break;
    case 1:
      RopeAppendKvKernel<kHeadDim, kAdjacentPairs, 1><<<n, threads, 0, stream>>>(
          qkv, start_pos, n_heads, n_kv_heads, inv_freq, q_out, k_cache, v_cache, capacity);
      break;
    default:
      return UnsupportedVector("LaunchRopeAppendKv", vec);
  }
  CUDA_RETURN_IF_LAUNCH_FAILED("RopeAppendKvKernel");
  return absl::OkStatus();
}

}  // namespace

// ---------------------------------------------------------------------------
// Launchers.
// ---------------------------------------------------------------------------

absl::Status LaunchEmbedding(const __nv_bfloat16* table, int vocab, const int32_t* ids, int n,
                             int hidden, float* out, cudaStream_t stream) {
  if (vocab <= 0 || hidden <= 0 || n < 0) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchEmbedding: vocab ", vocab, ", hidden ",
                                                   hidden, ", n ", n,
                                                   " (need vocab > 0, hidden > 0, n >= 0)"));
  }
  if (n == 0) return absl::OkStatus();
  if (table == nullptr || ids == nullptr || out == nullptr) return NullPointer("LaunchEmbedding");
  const int vec = hidden % 8 == 0 && Aligned16(table) && Aligned16(out) ? 8 : 1;
  const int threads = BlockFor(hidden / vec, kDefaultBlock);
  switch (vec) {
    case 8:
      EmbeddingKernel<8><<<n, threads, 0, stream>>>(table, vocab, ids, hidden, out);
      break;
    case 1:
      EmbeddingKernel<1><<<n, threads, 0, stream>>>(table, vocab, ids, hidden, out);
      break;
    default:
      return UnsupportedVector("LaunchEmbedding", vec);
  }
  CUDA_RETURN_IF_LAUNCH_FAILED("EmbeddingKernel");
  return absl::OkStatus();
}

absl::Status LaunchRmsNorm(const float* x, const float* w, int n, int hidden, float eps,
                           __nv_bfloat16* out, cudaStream_t stream) {
  if (hidden <= 0 || n < 0 || !(eps >= 0.0f)) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchRmsNorm: n ", n, ", hidden ", hidden,
                                                   ", eps ", eps,
                                                   " (need n >= 0, hidden > 0, eps >= 0)"));
  }
  if (n == 0) return absl::OkStatus();
  if (x == nullptr || w == nullptr || out == nullptr) return NullPointer("LaunchRmsNorm");
  const int vec = hidden % 8 == 0 && Aligned16(x) && Aligned16(w) && Aligned16(out) ? 8 : 1;
  const int threads = BlockFor(hidden / vec, kMaxBlock);
  switch (vec) {
    case 8:
      RmsNormKernel<8><<<n, threads, 0, stream>>>(x, w, hidden, eps, out);
      break;
    case 1:
      RmsNormKernel<1><<<n, threads, 0, stream>>>(x, w, hidden, eps, out);
      break;
    default:
      return UnsupportedVector("LaunchRmsNorm", vec);
  }
  CUDA_RETURN_IF_LAUNCH_FAILED("RmsNormKernel");
  return absl::OkStatus();
}

absl::Status LaunchRopeAppendKv(const __nv_bfloat16* qkv, int n, const int32_t* start_pos,
                                int n_heads, int n_kv_heads, int head_dim, const float* inv_freq,
                                bool adjacent_pairs, __nv_bfloat16* q_out, __nv_bfloat16* k_cache,
                                __nv_bfloat16* v_cache, int capacity, cudaStream_t stream) {
  if (n < 0 || n_heads <= 0 || n_kv_heads <= 0 || n_heads % n_kv_heads != 0 || capacity <= 0 ||
      n > capacity) {
    return absl::InvalidArgumentError(absl::StrCat(
        "LaunchRopeAppendKv: n ", n, ", n_heads ", n_heads, ", n_kv_heads ", n_kv_heads,
        ", capacity ", capacity,
        " (need 0 <= n <= capacity, n_heads and n_kv_heads > 0, n_heads % n_kv_heads == 0)"));
  }
  if (head_dim != 64 && head_dim != 128) {
    return absl::InvalidArgumentError(
        absl::StrCat("LaunchRopeAppendKv: head_dim ", head_dim, " unsupported (64 or 128)"));
  }
  if (n == 0) return absl::OkStatus();
  if (qkv == nullptr || start_pos == nullptr || inv_freq == nullptr || q_out == nullptr ||
      k_cache == nullptr || v_cache == nullptr) {
    return NullPointer("LaunchRopeAppendKv");
  }
  switch (head_dim) {
    case 64:
      return adjacent_pairs
                 ? DispatchRope<64, true>(qkv, n, start_pos, n_heads, n_kv_heads, inv_freq, q_out,
                                          k_cache, v_cache, capacity, stream)
                 : DispatchRope<64, false>(qkv, n, start_pos, n_heads, n_kv_heads, inv_freq, q_out,
                                           k_cache, v_cache, capacity, stream);
    case 128:
      return adjacent_pairs
                 ? DispatchRope<128, true>(qkv, n, start_pos, n_heads, n_kv_heads, inv_freq, q_out,
                                           k_cache, v_cache, capacity, stream)
                 : DispatchRope<128, false>(qkv, n, start_pos, n_heads, n_kv_heads, inv_freq, q_out,
                                            k_cache, v_cache, capacity, stream);
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("LaunchRopeAppendKv: head_dim ", head_dim, " unsupported (64 or 128)"));
  }
}

absl::Status LaunchSwiGlu(const __nv_bfloat16* gate_up, int n, int ffn, __nv_bfloat16* out,
                          cudaStream_t stream) {
  if (n < 0 || ffn <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("LaunchSwiGlu: n ", n, ", ffn ", ffn, " (need n >= 0, ffn > 0)"));
  }
  if (n == 0) return absl::OkStatus();
  if (gate_up == nullptr || out == nullptr) return NullPointer("LaunchSwiGlu");
  const int vec = ffn % 8 == 0 && Aligned16(gate_up) && Aligned16(out) ? 8 : 1;
  const int64_t chunks = static_cast<int64_t>(n) * (ffn / vec);
  const int grid = GridFor(chunks, kDefaultBlock);
  switch (vec) {
    case 8:
      SwiGluKernel<8><<<grid, kDefaultBlock, 0, stream>>>(gate_up, n, ffn, out);
      break;
    case 1:
      SwiGluKernel<1><<<grid, kDefaultBlock, 0, stream>>>(gate_up, n, ffn, out);
      break;
    default:
      return UnsupportedVector("LaunchSwiGlu", vec);
  }
  CUDA_RETURN_IF_LAUNCH_FAILED("SwiGluKernel");
  return absl::OkStatus();
}

absl::Status LaunchArgmax(const float* logits, int vocab, int32_t* out_id, cudaStream_t stream) {
  if (vocab <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("LaunchArgmax: vocab ", vocab, " (need vocab > 0)"));
  }
  if (logits == nullptr || out_id == nullptr) return NullPointer("LaunchArgmax");
  const int vec = Aligned16(logits) ? 4 : 1;
  switch (vec) {
    case 4:
      ArgmaxKernel<4><<<1, kArgmaxThreads, 0, stream>>>(logits, vocab, out_id);
      break;
    case 1:
      ArgmaxKernel<1><<<1, kArgmaxThreads, 0, stream>>>(logits, vocab, out_id);
      break;
    default:
      return UnsupportedVector("LaunchArgmax", vec);
  }
  CUDA_RETURN_IF_LAUNCH_FAILED("ArgmaxKernel");
  return absl::OkStatus();
}

absl::Status LaunchF32ToBf16(const float* src, int64_t n, __nv_bfloat16* dst, cudaStream_t stream) {
  if (n < 0) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchF32ToBf16: n ", n, " (need n >= 0)"));
  }
  if (n == 0) return absl::OkStatus();
  if (src == nullptr || dst == nullptr) return NullPointer("LaunchF32ToBf16");
  const int vec = Aligned16(src) && Aligned16(dst) ? 8 : 1;
  const int grid = GridFor(n / vec, kDefaultBlock);
  switch (vec) {
    case 8:
      F32ToBf16Kernel<8><<<grid, kDefaultBlock, 0, stream>>>(src, n, dst);
      break;
    case 1:
      F32ToBf16Kernel<1><<<grid, kDefaultBlock, 0, stream>>>(src, n, dst);
      break;
    default:
      return UnsupportedVector("LaunchF32ToBf16", vec);
  }
  CUDA_RETURN_IF_LAUNCH_FAILED("F32ToBf16Kernel");
  return absl::OkStatus();
}

absl::Status LaunchAddScalar(int32_t* value, int32_t delta, cudaStream_t stream) {
  if (value == nullptr) return NullPointer("LaunchAddScalar");
  AddScalarKernel<<<1, 1, 0, stream>>>(value, delta);
  CUDA_RETURN_IF_LAUNCH_FAILED("AddScalarKernel");
  return absl::OkStatus();
}

}  // namespace tailorkv::cuda
