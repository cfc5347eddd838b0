// Quantized KV cache kernels (contract in quant_kernels.cuh, format in
// runtime/quant_kv.h).
//
// Pack / Append / Materialize: one thread per quantization group (or per
// element), the exact fp32 operations of quant_kv.h's contract (IEEE
// division, directed fp16 rounding via __float2half_rd / _ru, rintf, fmaf),
// so codes and params are bit-identical to QuantKvCpu.
//
// Fused decode attention. The codes are never expanded in memory: a warp
// turns them into mma operands in registers.
//  * Tensor cores, m16n8k16 fp16 with fp32 accumulation. For scores the A
//    operand is q*s (query heads as rows, channels as k; rows past the GQA
//    group are zero), for P*V it is p*s (heads x tokens); the B operand is
//    the codes (channels x tokens for K, tokens x channels for V).
//  * A code becomes an fp16 operand with two integer ops per pair: a byte
//    permute (PRMT) brings the byte that holds the element of this lane's
//    column out of the two words of the pair into the low byte of each
//    half, and an AND keeps its b bits. The result is the fp16 SUBNORMAL
//    code * 2^(off - 24), exact, where off = (column * b) % 8 is fixed per
//    column; tensor cores take subnormal fp16 operands exactly and the
//    products are exact in fp32, so the column's factor 2^(24 - off) is
//    applied once to the fp32 result. No shifts, no conversions, no tables.
//  * The min terms: sum_c q_c z_c is one more mma per channel step with the z
//    values of the group as B in every column; sum_t p_t z_t likewise.
//  * p is scaled by 2^6 before it becomes fp16 (p <= 1), which keeps the
//    products p*s away from fp16's subnormal range (the tail of a long
//    softmax would otherwise lose mass); p*s overflows fp16 only for value
//    scales above 1023.
//  * Block = (KV head, split): 4 warps; tiles of 4 slices staged by
//    cp.async (codes and params of K and V, 3-4 stages); each warp owns one
//    slice of 32 or 64 tokens of a tile (inside one K group) with its own
//    online softmax; warps merge at the end and write an unnormalized
//    partial. About two waves of blocks, so each split streams several tiles.
//  * Scores use q*s as A (heads as rows); P*V is computed transposed,
//    o^T = V^T (p s)^T, so the score tile's registers are already the B
//    operand and each mma covers 16 channels.
//  * Tokens whose V is still in the ring (the last min(len, R)) are done by
//    other blocks of the same launch in plain fp32 (at most R tokens): keys
//    from the K ring, or dequantized from the codes when already quantized.
//  * A combine kernel merges the partials of the active blocks.
#include "cuda/quant_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "cuda/cuda_check.h"

namespace tailorkv::cuda {
namespace {

using bf16 = __nv_bfloat16;
using runtime::QuantShape;

constexpr int kWarps = 4;            // per split block; each owns kSlice tokens of a tile
constexpr int kThreads = kWarps * 32;
constexpr int kResTile = 32;          // tokens per residual block
constexpr int kMaxGroup = 8;          // query heads per KV head
constexpr int kTargetBlocks = 1024;   // split blocks over all KV heads (as the dense decode)
constexpr int kCombineThreads = 512;
constexpr float kPScale = 64.0f;      // p is scaled by this before becoming fp16
constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr size_t kPad = 256;          // bytes after each array (tile copies may overrun by 16)

// ---------------------------------------------------------------------------
// Quantization, exactly quant_kv.h's contract.

struct GroupQ {
  uint32_t params;  // scale16 | min16 << 16
  float s, z;
};

__device__ __forceinline__ GroupQ MakeGroupParams(float lo, float hi, int bits) {
  const float M = static_cast<float>((1u << bits) - 1u);
  const __half zh = __float2half_rd(fminf(fmaxf(lo, -65504.0f), 65504.0f));
  const float z = __half2float(zh);
  const float v = fminf(fmaxf(__fdiv_rn(__fsub_rn(hi, z), M), 0.0f), 65504.0f);
  const __half sh = __float2half_ru(v);
  GroupQ q;
  q.s = __half2float(sh);
  q.z = z;
  q.params = static_cast<uint32_t>(__half_as_ushort(sh)) |
             (static_cast<uint32_t>(__half_as_ushort(zh)) << 16);
  return q;
}

__device__ __forceinline__ uint32_t Code(float x, const GroupQ& q, int bits) {
  if (q.s == 0.0f) return 0u;
  const float M = static_cast<float>((1u << bits) - 1u);
  return static_cast<uint32_t>(fminf(fmaxf(rintf(__fdiv_rn(__fsub_rn(x, q.z), q.s)), 0.0f), M));
}

__device__ __forceinline__ float Dequant(uint32_t params, uint32_t code) {
  const float s = __half2float(__ushort_as_half(static_cast<unsigned short>(params & 0xffffu)));
  const float z = __half2float(__ushort_as_half(static_cast<unsigned short>(params >> 16)));
  return fmaf(s, static_cast<float>(code), z);
}

// Quantizes x[0], x[stride], ... x[(G-1) stride] (bf16) into params + W words.
__device__ void QuantizeGroupBf16(const bf16* x, int64_t stride, int G, int bits, uint32_t* params,
                                  uint32_t* words) {
  float lo = INFINITY, hi = -INFINITY;
  for (int i = 0; i < G; ++i) {
    const float v = __bfloat162float(x[i * stride]);
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
  }
  const GroupQ q = MakeGroupParams(lo, hi, bits);
  *params = q.params;
  const int per_word = 32 / bits;
  for (int w = 0; w < G / per_word; ++w) {
    uint32_t word = 0;
    for (int i = 0; i < per_word; ++i) {
      const float v = __bfloat162float(x[(w * per_word + i) * stride]);
      word |= Code(v, q, bits) << (i * bits);
    }
    words[w] = word;
  }
}

struct HeadStrides {
  int64_t k_code_words = 0, k_params = 0, v_code_words = 0, v_params = 0, res_elems = 0;
  HeadStrides() = default;
  explicit HeadStrides(const QuantShape& s)
      : k_code_words(s.k_code_words_per_head()),
        k_params(s.k_params_per_head()),
        v_code_words(s.v_code_words_per_head()),
        v_params(s.v_params_per_head()),
        res_elems(s.residual_elems_per_head()) {}
};

// Grid-stride over (head, group g in [g0, g1), channel): K groups along tokens.
__global__ void PackKeysKernel(const bf16* __restrict__ k_full, int64_t head_stride, int g0, int g1,
                               int n_kv, int hd, int G, int bits, HeadStrides hs,
                               QuantDeviceCache c) {
  const int W = G * bits / 32;
  const int64_t total = static_cast<int64_t>(n_kv) * (g1 - g0) * hd;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int ch = static_cast<int>(idx % hd);
    const int64_t rest = idx / hd;
    const int grp = g0 + static_cast<int>(rest % (g1 - g0));
    const int h = static_cast<int>(rest / (g1 - g0));
    const int64_t p = h * hs.k_params + static_cast<int64_t>(grp) * hd + ch;
    QuantizeGroupBf16(k_full + h * head_stride + static_cast<int64_t>(grp) * G * hd + ch, hd, G,
                      bits, c.k_params + p, c.k_codes + p * W);
  }
}

// Grid-stride over (head, position in [p0, p1), value group).
__global__ void PackValuesKernel(const bf16* __restrict__ v_full, int64_t head_stride, int p0,
                                 int p1, int n_kv, int hd, int G, int bits, HeadStrides hs,
                                 QuantDeviceCache c) {
  const int W = G * bits / 32, ng = hd / G;
  const int64_t total = static_cast<int64_t>(n_kv) * (p1 - p0) * ng;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int cg = static_cast<int>(idx % ng);
    const int64_t rest = idx / ng;
    const int pos = p0 + static_cast<int>(rest % (p1 - p0));
    const int h = static_cast<int>(rest / (p1 - p0));
    const int64_t p = h * hs.v_params + static_cast<int64_t>(pos) * ng + cg;
    QuantizeGroupBf16(v_full + h * head_stride + static_cast<int64_t>(pos) * hd + cg * G, 1, G, bits,
                      c.v_params + p, c.v_codes + p * W);
  }
}

// Ring rows of positions [p0, p1) for K and V.
__global__ void PackRingsKernel(const bf16* __restrict__ k_full, const bf16* __restrict__ v_full,
                                int64_t head_stride, int p0, int p1, int n_kv, int hd, int R,
                                HeadStrides hs, QuantDeviceCache c) {
  const int64_t total = static_cast<int64_t>(n_kv) * (p1 - p0) * hd;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int d = static_cast<int>(idx % hd);
    const int64_t rest = idx / hd;
    const int pos = p0 + static_cast<int>(rest % (p1 - p0));
    const int h = static_cast<int>(rest / (p1 - p0));
    const int64_t src = h * head_stride + static_cast<int64_t>(pos) * hd + d;
    const int64_t dst = h * hs.res_elems + static_cast<int64_t>(pos % R) * hd + d;
    c.k_res[dst] = k_full[src];
    c.v_res[dst] = v_full[src];
  }
}

// One block per KV head. QuantKvCpu::Append at position *pos_ptr.
__global__ void AppendKernel(const bf16* __restrict__ k_full, const bf16* __restrict__ v_full,
                             int64_t head_stride, const int32_t* __restrict__ pos_ptr, int hd,
                             int G, int bits, int R, HeadStrides hs, QuantDeviceCache c) {
  const int h = blockIdx.x;
  const int pos = *pos_ptr;
  const int W = G * bits / 32, ng = hd / G;
  bf16* kr = c.k_res + h * hs.res_elems;
  bf16* vr = c.v_res + h * hs.res_elems;
  bf16* vrow = vr + static_cast<int64_t>(pos % R) * hd;
  // The V row's old token (pos - R) leaves the ring: quantize it first.
  if (pos >= R) {
    for (int cg = threadIdx.x; cg < ng; cg += blockDim.x) {
      const int64_t p = h * hs.v_params + static_cast<int64_t>(pos - R) * ng + cg;
      QuantizeGroupBf16(vrow + cg * G, 1, G, bits, c.v_params + p, c.v_codes + p * W);
    }
  }
  __syncthreads();
  const bf16* ksrc = k_full + h * head_stride + static_cast<int64_t>(pos) * hd;
  const bf16* vsrc = v_full + h * head_stride + static_cast<int64_t>(pos) * hd;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    kr[static_cast<int64_t>(pos % R) * hd + d] = ksrc[d];
    vrow[d] = vsrc[d];
  }
  if ((pos + 1) % R != 0) return;  // uniform over the block
  __syncthreads();
  // A full K ring holds positions [pos + 1 - R, pos] in rows 0..R-1, in order.
  const int first_group = (pos + 1 - R) / G;
  for (int idx = threadIdx.x; idx < (R / G) * hd; idx += blockDim.x) {
    const int gi = idx / hd, ch = idx % hd;
    const int64_t p = h * hs.k_params + static_cast<int64_t>(first_group + gi) * hd + ch;
    QuantizeGroupBf16(kr + static_cast<int64_t>(gi) * G * hd + ch, hd, G, bits, c.k_params + p,
                      c.k_codes + p * W);
  }
}

// Grid-stride over (head, position < len, channel).
__global__ void MaterializeKernel(int len, int n_kv, int hd, int G, int bits, int R, HeadStrides hs,
                                  QuantDeviceCache c, bf16* __restrict__ k_full,
                                  bf16* __restrict__ v_full, int64_t head_stride) {
  const int W = G * bits / 32, ng = hd / G;
  const int qk = len - len % R, qv = len > R ? len - R : 0;
  const uint32_t mask = (1u << bits) - 1u;
  const int64_t total = static_cast<int64_t>(n_kv) * len * hd;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int d = static_cast<int>(idx % hd);
    const int64_t rest = idx / hd;
    const int pos = static_cast<int>(rest % len);
    const int h = static_cast<int>(rest / len);
    const int64_t out = h * head_stride + static_cast<int64_t>(pos) * hd + d;
    const int64_t ring = h * hs.res_elems + static_cast<int64_t>(pos % R) * hd + d;
    if (pos < qk) {
      const int64_t p = h * hs.k_params + static_cast<int64_t>(pos / G) * hd + d;
      const int bit = (pos % G) * bits;
      const uint32_t code = (c.k_codes[p * W + (bit >> 5)] >> (bit & 31)) & mask;
      k_full[out] = __float2bfloat16_rn(Dequant(c.k_params[p], code));
    } else {
      k_full[out] = c.k_res[ring];
    }
    if (pos < qv) {
      const int64_t p = h * hs.v_params + static_cast<int64_t>(pos) * ng + d / G;
      const int bit = (d % G) * bits;
      const uint32_t code = (c.v_codes[p * W + (bit >> 5)] >> (bit & 31)) & mask;
      v_full[out] = __float2bfloat16_rn(Dequant(c.v_params[p], code));
    } else {
      v_full[out] = c.v_res[ring];
    }
  }
}

// ---------------------------------------------------------------------------
// Fused decode attention: device helpers.

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void CpAsync8(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 8 : 0)
               : "memory");
}
__device__ __forceinline__ void CpAsync4(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 4 : 0)
               : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// c += A * B, m16n8k16 fp16 in, fp32 accumulate; A rows 8..15 are zero
// (a0: row g, k 2t..2t+1; a2: row g, k 2t+8..2t+9).
__device__ __forceinline__ void MmaF16(float (&c)[4], uint32_t a0, uint32_t a2, uint32_t b0,
                                       uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
}

// c += A * B with all four A registers (rows g and g + 8).
__device__ __forceinline__ void MmaF16x4(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float FastExp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t HalfPair(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
__device__ __forceinline__ uint32_t HMul2(uint32_t a, uint32_t b) {
  const __half2 r = __hmul2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
  return *reinterpret_cast<const uint32_t*>(&r);
}
__device__ __forceinline__ float Pow2(int e) { return __int_as_float((127 + e) << 23); }

__device__ __forceinline__ int ClampLength(int32_t len, int capacity) {
  return len < 0 ? 0 : (len > capacity ? capacity : len);
}

struct QuantAttnParams {
  const bf16* q;
  const uint32_t* k_codes;
  const uint32_t* k_params;
  const uint32_t* v_codes;
  const uint32_t* v_params;
  const bf16* k_res;
  const bf16* v_res;
  const int32_t* length;
  HeadStrides hs;
  int capacity, residual, group, max_splits, max_res;
  float scale_log2;
  float* part_o;   // [max_res + max_splits][n_heads][kD]
  float* part_ml;  // [max_res + max_splits][n_heads][2]
};

// kSlice: tokens per warp and tile (32, or 64 when G >= 64: twice the
// independent work per warp between barriers, fewer per-slice fixed costs).
template <int kD, int kBits, int kG, int kSlice>
struct QCfg {
  static constexpr int kTile = kWarps * kSlice;                  // tokens per staged tile
  static constexpr int kW = kG * kBits / 32;                     // words per group
  static constexpr int kNCG = kD / kG;                           // value groups per token
  static constexpr int kWT = kD * kBits / 32;                    // V code words per token
  static constexpr int kCodeWords = kTile * kD * kBits / 32;     // K (and V) codes of a tile
  static constexpr int kKGroups = kTile / kG;                    // K groups in a tile
  static constexpr int kKParamWords = kKGroups * kD;
  static constexpr int kVParamWords = kTile * kNCG;
  static constexpr int kStageWords = 2 * kCodeWords + kKParamWords + kVParamWords;
  // 4 stages, 3 when a stage is large (keeps 2 blocks per SM).
  static constexpr int kStages = kStageWords * 4 * 4 > 100 * 1024 ? 3 : 4;
  static constexpr int kSplitSmem = kStages * kStageWords * 4;
  static constexpr int kMergeSmem = kWarps * kMaxGroup * (kD + 4 + 2) * 4;
  static constexpr int kResSmem = (kMaxGroup * kD + 2 * kResTile * (kD + 1) + kMaxGroup * kResTile) * 4;
  static constexpr int kSmem = kSplitSmem > kMergeSmem
                                   ? (kSplitSmem > kResSmem ? kSplitSmem : kResSmem)
                                   : (kMergeSmem > kResSmem ? kMergeSmem : kResSmem);
  static_assert(kG >= kSlice && kTile % kG == 0 && kD % kG == 0, "group must be 32..128, <= head_dim");
  static_assert(kSlice == 32 || kSlice == 64, "slice of 32 or 64 tokens");
};

// Residual block r: tokens of the 32-token tile r after QV / 32, restricted to
// [QV, len): fp32 dot products and softmax, one partial per query head.
template <int kD, int kBits, int kG>
__device__ void ResidualBlock(const QuantAttnParams& P, int r, int kv_head, unsigned char* smem) {
  const int len = ClampLength(*P.length, P.capacity);
  const int R = P.residual;
  const int qv = len > R ? len - R : 0;
  const int qk = len - len % R;
  const int first = qv / kResTile;
  if (len == 0 || r > (len - 1) / kResTile - first) return;
  const int p0 = (first + r) * kResTile;
  const int group = P.group;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  constexpr int kStride = kD + 1;
  float* qf = reinterpret_cast<float*>(smem);   // [kMaxGroup][kD]
  float* kt = qf + kMaxGroup * kD;              // [kResTile][kD + 1]
  float* vt = kt + kResTile * kStride;          // [kResTile][kD + 1]
  float* sc = vt + kResTile * kStride;          // [kMaxGroup][kResTile]
  const int n_heads = gridDim.y * group;

  for (int i = tid; i < group * kD; i += kThreads) {
    qf[i] = __bfloat162float(P.q[static_cast<int64_t>(kv_head) * group * kD + i]) * P.scale_log2;
  }
  const bf16* kr = P.k_res + kv_head * P.hs.res_elems;
  const bf16* vr = P.v_res + kv_head * P.hs.res_elems;
  // 8-channel items (row, chunk), all loads of a thread issued before any
  // use: a serial chain of global loads would make these few blocks the
  // slowest of the launch.
  constexpr int kChunks = kD / 8;
  constexpr int kItems = kResTile * kChunks / kThreads;
  static_assert(kResTile * kChunks % kThreads == 0, "residual items per thread");
  uint4 kraw[kItems], vraw[kItems];
#pragma unroll
  for (int it = 0; it < kItems; ++it) {
    const int idx = tid + it * kThreads;
    const int row = idx / kChunks, ch = idx % kChunks * 8;
    const int pos = p0 + row;
    const bool valid = pos >= qv && pos < len;
    const int64_t ring = static_cast<int64_t>(valid ? pos % R : 0) * kD + ch;
    vraw[it] = valid ? *reinterpret_cast<const uint4*>(vr + ring) : make_uint4(0, 0, 0, 0);
    kraw[it] = valid && pos >= qk ? *reinterpret_cast<const uint4*>(kr + ring) : make_uint4(0, 0, 0, 0);
  }
#pragma unroll
  for (int it = 0; it < kItems; ++it) {
    const int idx = tid + it * kThreads;
    const int row = idx / kChunks, ch = idx % kChunks * 8;
    const int pos = p0 + row;
    const bf16* kv8 = reinterpret_cast<const bf16*>(&kraw[it]);
    const bf16* vv8 = reinterpret_cast<const bf16*>(&vraw[it]);
    float kf[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) kf[j] = __bfloat162float(kv8[j]);
    if (pos >= qv && pos < qk) {
      // Key already quantized, value still in the ring: dequantize the key.
      const int64_t cell = static_cast<int64_t>(pos / kG) * kD + ch;  // (group, channel)
      const int bit = (pos % kG) * kBits;
      const uint32_t* words = P.k_codes + kv_head * P.hs.k_code_words +
                              cell * (kG * kBits / 32) + (bit >> 5);
      const uint4* prm = reinterpret_cast<const uint4*>(P.k_params + kv_head * P.hs.k_params + cell);
      const uint4 pa = prm[0], pb = prm[1];
      const uint32_t pw[8] = {pa.x, pa.y, pa.z, pa.w, pb.x, pb.y, pb.z, pb.w};
      uint32_t cw[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) cw[j] = words[j * (kG * kBits / 32)];
#pragma unroll
      for (int j = 0; j < 8; ++j) kf[j] = Dequant(pw[j], (cw[j] >> (bit & 31)) & ((1u << kBits) - 1u));
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      kt[row * kStride + ch + j] = kf[j];
      vt[row * kStride + ch + j] = __bfloat162float(vv8[j]);
    }
  }
  __syncthreads();
  for (int i = tid; i < group * kResTile; i += kThreads) {
    const int h = i / kResTile, row = i % kResTile;
    const int pos = p0 + row;
    float s = -INFINITY;
    if (pos >= qv && pos < len) {
      s = 0.0f;
#pragma unroll 8
      for (int d = 0; d < kD; ++d) s = fmaf(qf[h * kD + d], kt[row * kStride + d], s);
    }
    sc[i] = s;
  }
  __syncthreads();
  float* ml = kt;  // K tile is done: [kMaxGroup][2]
  for (int h = warp; h < group; h += kWarps) {
    const float s = sc[h * kResTile + lane];
    float m = s;
#pragma unroll
    for (int off = 16; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(kFullMask, m, off));
    const float p = FastExp2(s - m);  // this tile holds a valid token, so m is finite
    float l = p;
#pragma unroll
    for (int off = 16; off > 0; off /= 2) l += __shfl_xor_sync(kFullMask, l, off);
    sc[h * kResTile + lane] = p;
    if (lane == 0) {
      ml[h * 2] = m;
      ml[h * 2 + 1] = l;
    }
  }
  __syncthreads();
  for (int i = tid; i < group * kD; i += kThreads) {
    const int h = i / kD, d = i % kD;
    float acc = 0.0f;
#pragma unroll 8
    for (int row = 0; row < kResTile; ++row) acc = fmaf(sc[h * kResTile + row], vt[row * kStride + d], acc);
    const int64_t head = static_cast<int64_t>(r) * n_heads + kv_head * group + h;
    P.part_o[head * kD + d] = acc;
    if (d == 0) {
      P.part_ml[head * 2] = ml[h * 2];
      P.part_ml[head * 2 + 1] = ml[h * 2 + 1];
    }
  }
}

// Byte (0..3) of the word holding element 8x + g of a run of b-bit elements.
template <int kBits>
__device__ __forceinline__ uint32_t PermSelector(int x, int g) {
  const int byte = (((8 * x + g) * kBits) & 31) >> 3;
  return static_cast<uint32_t>(byte) * 0x1111u + 0x4400u;  // a.byte -> bytes 0,1; b.byte -> 2,3
}

template <int N>
__device__ __forceinline__ void LoadWords(const uint32_t* p, uint32_t (&w)[N]) {
  if constexpr (N == 8) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    const uint4 u = *reinterpret_cast<const uint4*>(p + 4);
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
    w[4] = u.x, w[5] = u.y, w[6] = u.z, w[7] = u.w;
  } else if constexpr (N == 4) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
  } else if constexpr (N == 2) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    w[0] = v.x, w[1] = v.y;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) w[i] = p[i];
  }
}

template <int kD, int kBits, int kG, int kSlice>
__device__ void SplitBlock(const QuantAttnParams& P, int split, int kv_head, unsigned char* smem) {
  using C = QCfg<kD, kBits, kG, kSlice>;
  constexpr int kTile = C::kTile;
  constexpr int kStages = C::kStages;
  constexpr int kNT = kSlice / 8;   // score n-tiles per slice
  constexpr int kKS = kSlice / 16;  // P*V k steps per slice
  const int len = ClampLength(*P.length, P.capacity);
  const int qv = len > P.residual ? len - P.residual : 0;
  const int n_tiles = (qv + kTile - 1) / kTile;
  if (n_tiles == 0) return;
  const int chunk = (n_tiles + P.max_splits - 1) / P.max_splits;
  const int tile_begin = split * chunk;
  if (tile_begin >= n_tiles) return;  // whole block: no barrier reached yet
  const int n_local = min(n_tiles, tile_begin + chunk) - tile_begin;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int group = P.group;
  const uint32_t* kch = P.k_codes + kv_head * P.hs.k_code_words;
  const uint32_t* kph = P.k_params + kv_head * P.hs.k_params;
  const uint32_t* vch = P.v_codes + kv_head * P.hs.v_code_words;
  const uint32_t* vph = P.v_params + kv_head * P.hs.v_params;
  uint32_t* stages = reinterpret_cast<uint32_t*>(smem);

  auto load_tile = [&](int i) {
    uint32_t* st = stages + (i % kStages) * C::kStageWords;
    const uint32_t base = SmemAddr(st);
    const int t0 = (tile_begin + i) * kTile;
    const int grp0 = t0 / kG;
    const uint32_t* kc = kch + static_cast<int64_t>(grp0) * kD * C::kW;
    for (int c = tid; c < C::kCodeWords / 4; c += kThreads) {
      const bool valid = (grp0 + 4 * c / (kD * C::kW)) * kG < qv;
      CpAsync16(base + 16u * c, valid ? kc + 4 * c : kc, valid);
    }
    const uint32_t* vc = vch + static_cast<int64_t>(t0) * C::kWT;
    const uint32_t vbase = base + 4u * C::kCodeWords;
    if constexpr (C::kWT >= 4) {
      for (int c = tid; c < C::kCodeWords / 4; c += kThreads) {
        const bool valid = t0 + 4 * c / C::kWT < qv;
        CpAsync16(vbase + 16u * c, valid ? vc + 4 * c : vc, valid);
      }
    } else {
      // Two words per token: a head's codes may start 8-byte aligned only.
      static_assert(C::kWT == 2, "value codes per token");
      for (int c = tid; c < C::kCodeWords / 2; c += kThreads) {
        const bool valid = t0 + c < qv;
        CpAsync8(vbase + 8u * c, valid ? vc + 2 * c : vc, valid);
      }
    }
    const uint32_t* kp = kph + static_cast<int64_t>(grp0) * kD;
    const uint32_t kpbase = vbase + 4u * C::kCodeWords;
    for (int c = tid; c < C::kKParamWords / 4; c += kThreads) {
      const bool valid = (grp0 + 4 * c / kD) * kG < qv;
      CpAsync16(kpbase + 16u * c, valid ? kp + 4 * c : kp, valid);
    }
    // Value params per word: a token past QV may hold anything (even NaN
    // bit patterns) and must read as 0, since p * s is computed for it.
    const uint32_t* vp = vph + static_cast<int64_t>(t0) * C::kNCG;
    const uint32_t vpbase = kpbase + 4u * C::kKParamWords;
    for (int c = tid; c < C::kVParamWords; c += kThreads) {
      const bool valid = t0 + c / C::kNCG < qv;
      CpAsync4(vpbase + 4u * c, valid ? vp + c : vp, valid);
    }
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_local) load_tile(s);
    CpAsyncCommit();
  }

  // Per-lane constants.
  const uint32_t mm = ((1u << kBits) - 1u) << ((g * kBits) & 7);
  const uint32_t mask = mm | (mm << 16);
  uint32_t sel[4];
#pragma unroll
  for (int x = 0; x < 4; ++x) sel[x] = PermSelector<kBits>(x, g);
  float colscale[2];
#pragma unroll
  for (int e = 0; e < 2; ++e) colscale[e] = Pow2(24 - (((2 * t + e) * kBits) & 7));

  // Query fragments in fp16, pre-scaled to log2 units; rows >= group are 0.
  uint32_t qh[kD / 16][2];
  {
    const bool row_ok = g < group;
    const bf16* qrow = P.q + (static_cast<int64_t>(kv_head) * group + (row_ok ? g : 0)) * kD;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      const int c0 = kk * 16 + 2 * t;
      const float sl = row_ok ? P.scale_log2 : 0.0f;
      qh[kk][0] = HalfPair(__bfloat162float(qrow[c0]) * sl, __bfloat162float(qrow[c0 + 1]) * sl);
      qh[kk][1] = HalfPair(__bfloat162float(qrow[c0 + 8]) * sl, __bfloat162float(qrow[c0 + 9]) * sl);
    }
  }

  // o^T: [channel][head] tiles of 16 channels x 8 heads (heads 2t, 2t+1 in this lane).
  float o[kD / 16][4];
  float oz[C::kNCG][4];  // the min term, [head g][*] (every column equal)
#pragma unroll
  for (int mt = 0; mt < kD / 16; ++mt) o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0.0f;
#pragma unroll
  for (int cg = 0; cg < C::kNCG; ++cg) oz[cg][0] = oz[cg][1] = oz[cg][2] = oz[cg][3] = 0.0f;
  float m = -INFINITY, l = 0.0f;  // row g

  for (int i = 0; i < n_local; ++i) {
    CpAsyncWait<kStages - 2>();
    __syncthreads();
    if (i + kStages - 1 < n_local) load_tile(i + kStages - 1);
    CpAsyncCommit();
    const int t0 = (tile_begin + i) * kTile;
    const int sl = warp * kSlice;  // slice offset in the tile
    const int s0 = t0 + sl;
    if (s0 >= qv) continue;
    const uint32_t* st = stages + (i % kStages) * C::kStageWords;
    const uint32_t* skc = st;
    const uint32_t* svc = skc + C::kCodeWords;
    const uint32_t* skp = svc + C::kCodeWords;
    const uint32_t* svp = skp + C::kKParamWords;
    const int gl = sl / kG;                // K group in the tile
    const int word0 = (sl % kG) / 32 * kBits;  // first word of the slice in a channel's group
    constexpr int kKW = kSlice / 32 * kBits;    // words of the slice per channel

    // A = q * s (fp16) and the min term q . z of this group.
    uint32_t qs[kD / 16][2];
    float dz[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const uint32_t* kp = skp + gl * kD + 2 * t;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      const uint2 p01 = *reinterpret_cast<const uint2*>(kp + kk * 16);
      const uint2 p89 = *reinterpret_cast<const uint2*>(kp + kk * 16 + 8);
      qs[kk][0] = HMul2(qh[kk][0], __byte_perm(p01.x, p01.y, 0x5410));
      qs[kk][1] = HMul2(qh[kk][1], __byte_perm(p89.x, p89.y, 0x5410));
      MmaF16(dz, qh[kk][0], qh[kk][1], __byte_perm(p01.x, p01.y, 0x7632),
             __byte_perm(p89.x, p89.y, 0x7632));
    }
    const float qz = dz[0];

    // Scores of the slice's tokens: n-tiles of 8.
    float sc[kNT][4];
#pragma unroll
    for (int j = 0; j < kNT; ++j) sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
    const uint32_t* kc = skc + gl * kD * C::kW + word0 + 2 * t * C::kW;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      uint32_t wa[kKW], wb[kKW], wc[kKW], wd[kKW];
      LoadWords<kKW>(kc + (kk * 16) * C::kW, wa);
      LoadWords<kKW>(kc + (kk * 16 + 1) * C::kW, wb);
      LoadWords<kKW>(kc + (kk * 16 + 8) * C::kW, wc);
      LoadWords<kKW>(kc + (kk * 16 + 9) * C::kW, wd);
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        constexpr int kPerWord = 4 / kBits;  // n-tiles per word
        const int wi = j / kPerWord;
        const uint32_t lo = __byte_perm(wa[wi], wb[wi], sel[j % kPerWord]) & mask;
        const uint32_t hi = __byte_perm(wc[wi], wd[wi], sel[j % kPerWord]) & mask;
        MmaF16(sc[j], qs[kk][0], qs[kk][1], lo, hi);
      }
    }

    // Online softmax of row g over the slice's scores.
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int tok = s0 + 8 * j + 2 * t + e;
        const float v = fmaf(sc[j][e], colscale[e], qz);
        sc[j][e] = tok < qv ? v : -INFINITY;
        mx = fmaxf(mx, sc[j][e]);
      }
    }
    mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
    const float m_new = fmaxf(m, mx);  // finite: token s0 < qv is in every row
    const float alpha = FastExp2(m - m_new);
    m = m_new;
    l *= alpha;
    if (__any_sync(kFullMask, alpha != 1.0f)) {
      // o holds heads 2t and 2t + 1, whose state lives in lanes 8t and 8t + 4.
      const float a0 = __shfl_sync(kFullMask, alpha, 8 * t);
      const float a1 = __shfl_sync(kFullMask, alpha, 8 * t + 4);
#pragma unroll
      for (int mt = 0; mt < kD / 16; ++mt) {
        o[mt][0] *= a0;
        o[mt][1] *= a1;
        o[mt][2] *= a0;
        o[mt][3] *= a1;
      }
#pragma unroll
      for (int cg = 0; cg < C::kNCG; ++cg) {
        oz[cg][0] *= alpha;
        oz[cg][1] *= alpha;
      }
    }
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        sc[j][e] = FastExp2(sc[j][e] - m_new);
        l += sc[j][e];
      }
    }

    // P * V, 16 tokens per k step, as o^T += V^T (A: codes, 16 channels x 16
    // tokens) * (p s)^T (B: tokens x heads). The score tile's layout (row g =
    // head, columns 2t, 2t+1 = tokens) is already B's, so p never moves.
#pragma unroll
    for (int ks = 0; ks < kKS; ++ks) {
      const uint32_t p01 = HalfPair(sc[2 * ks][0] * kPScale, sc[2 * ks][1] * kPScale);
      const uint32_t p89 = HalfPair(sc[2 * ks + 1][0] * kPScale, sc[2 * ks + 1][1] * kPScale);
      const int tl = sl + 16 * ks + 2 * t;  // tile-local tokens tl, tl+1, tl+8, tl+9
      uint32_t bps[C::kNCG][2];
#pragma unroll
      for (int cg = 0; cg < C::kNCG; ++cg) {
        const uint32_t xa = svp[tl * C::kNCG + cg], xb = svp[(tl + 1) * C::kNCG + cg];
        const uint32_t xc = svp[(tl + 8) * C::kNCG + cg], xd = svp[(tl + 9) * C::kNCG + cg];
        bps[cg][0] = HMul2(p01, __byte_perm(xa, xb, 0x5410));
        bps[cg][1] = HMul2(p89, __byte_perm(xc, xd, 0x5410));
        MmaF16(oz[cg], p01, p89, __byte_perm(xa, xb, 0x7632), __byte_perm(xc, xd, 0x7632));
      }
      const uint32_t* v0 = svc + tl * C::kWT;
      constexpr int kVec = C::kWT >= 4 ? 4 : C::kWT;
      constexpr int kPerWord = 4 / kBits;  // 8-channel tiles per word
#pragma unroll
      for (int wq = 0; wq < C::kWT / kVec; ++wq) {
        uint32_t a[kVec], b[kVec], c[kVec], d[kVec];
        LoadWords<kVec>(v0 + wq * kVec, a);
        LoadWords<kVec>(v0 + C::kWT + wq * kVec, b);
        LoadWords<kVec>(v0 + 8 * C::kWT + wq * kVec, c);
        LoadWords<kVec>(v0 + 9 * C::kWT + wq * kVec, d);
        // 8-channel tiles nt = 2 mt (rows g) and 2 mt + 1 (rows g + 8) of
        // each 16-channel tile mt covered by these words.
#pragma unroll
        for (int n2 = 0; n2 < kVec * kPerWord; n2 += 2) {
          const int nt = wq * kVec * kPerWord + n2;
          const int mt = nt / 2;
          const int wi0 = n2 / kPerWord, wi1 = (n2 + 1) / kPerWord;
          const uint32_t s0 = sel[n2 % kPerWord], s1 = sel[(n2 + 1) % kPerWord];
          const uint32_t a0 = __byte_perm(a[wi0], b[wi0], s0) & mask;
          const uint32_t a1 = __byte_perm(a[wi1], b[wi1], s1) & mask;
          const uint32_t a2 = __byte_perm(c[wi0], d[wi0], s0) & mask;
          const uint32_t a3 = __byte_perm(c[wi1], d[wi1], s1) & mask;
          const int cg = mt * 16 / kG;
          MmaF16x4(o[mt], a0, a1, a2, a3, bps[cg][0], bps[cg][1]);
        }
      }
    }
  }
  CpAsyncWait<0>();
  __syncthreads();  // every warp is done with the stages: reuse them for the merge

  l += __shfl_xor_sync(kFullMask, l, 1);
  l += __shfl_xor_sync(kFullMask, l, 2);
  constexpr int kStride = kD + 4;
  float* merge_o = reinterpret_cast<float*>(smem);             // [warps][8][kStride]
  float* merge_ml = merge_o + kWarps * kMaxGroup * kStride;     // [warps][8][2]
  {
    // Codes of channel rows g and g + 8 were scaled by 2^(off - 24), p by kPScale.
    const float rowscale = Pow2(24 - ((g * kBits) & 7)) * (1.0f / kPScale);
    float* w0 = merge_o + (warp * kMaxGroup + 2 * t) * kStride;  // head 2t; head 2t+1 is +kStride
#pragma unroll
    for (int mt = 0; mt < kD / 16; ++mt) {
      const int ch = mt * 16 + g;
      w0[ch] = o[mt][0] * rowscale;
      w0[kStride + ch] = o[mt][1] * rowscale;
      w0[ch + 8] = o[mt][2] * rowscale;
      w0[kStride + ch + 8] = o[mt][3] * rowscale;
    }
    if (t == 0) {
      merge_ml[(warp * kMaxGroup + g) * 2] = m;
      merge_ml[(warp * kMaxGroup + g) * 2 + 1] = l;
    }
    __syncwarp();
    // The min term of head g, value group cg: channels [cg G, cg G + G), a
    // quarter of them per lane of the quad.
    float* wg = merge_o + (warp * kMaxGroup + g) * kStride;
#pragma unroll
    for (int cg = 0; cg < C::kNCG; ++cg) {
      const float z = oz[cg][0] * (1.0f / kPScale);
      for (int i = t; i < kG; i += 4) wg[cg * kG + i] += z;
    }
  }
  __syncthreads();
  const int n_heads = gridDim.y * group;
  const int part = P.max_res + split;
  for (int idx = tid; idx < group * kD; idx += kThreads) {
    const int row = idx / kD, d = idx % kD;
    float m_max = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m_max = fmaxf(m_max, merge_ml[(w * kMaxGroup + row) * 2]);
    float acc = 0.0f, sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float sc = FastExp2(merge_ml[(w * kMaxGroup + row) * 2] - m_max);
      acc += merge_o[(w * kMaxGroup + row) * kStride + d] * sc;
      sum += merge_ml[(w * kMaxGroup + row) * 2 + 1] * sc;
    }
    const int64_t head = static_cast<int64_t>(part) * n_heads + kv_head * group + row;
    P.part_o[head * kD + d] = acc;
    if (d == 0) {
      P.part_ml[head * 2] = m_max;
      P.part_ml[head * 2 + 1] = sum;
    }
  }
}

// Grid: (max_res + max_splits, n_kv_heads); block: kThreads. Residual
// blocks first, so they start in the first wave. 32-token slices at 1 and 2
// bits (G = 32): 3 blocks per SM (168 registers, a few bytes of spill at 2
// bits), the kernel being latency-bound with 8 warps per SM; 64-token slices
// and 4-bit tiles: 2 blocks per SM, no spill.
template <int kD, int kBits, int kG, int kSlice>
__global__ void __launch_bounds__(kThreads, (kBits == 4 || kSlice == 64) ? 2 : 3)
    QuantDecodeKernel(QuantAttnParams P) {
  extern __shared__ __align__(16) unsigned char smem[];
  if (static_cast<int>(blockIdx.x) < P.max_res) {
    ResidualBlock<kD, kBits, kG>(P, blockIdx.x, blockIdx.y, smem);
  } else {
    SplitBlock<kD, kBits, kG, kSlice>(P, blockIdx.x - P.max_res, blockIdx.y, smem);
  }
}

// Grid: (n_heads); merges the partials of the active blocks (derived from
// *length exactly as the blocks derive them).
template <int kD>
__global__ void __launch_bounds__(kCombineThreads)
    QuantCombineKernel(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                       const int32_t* __restrict__ length, int capacity, int residual,
                       int max_splits, int max_res, int tile, bf16* __restrict__ out) {
  constexpr int kGroups = kCombineThreads / kD;
  __shared__ float red_o[kGroups][kD];
  __shared__ float red_l[kGroups];
  const int head = blockIdx.x, n_heads = gridDim.x;
  const int tid = threadIdx.x, lane = tid % 32, d = tid % kD, grp = tid / kD;
  const int len = ClampLength(*length, capacity);
  if (len == 0) {
    if (grp == 0) out[static_cast<int64_t>(head) * kD + d] = __float2bfloat16(0.0f);
    return;
  }
  const int qv = len > residual ? len - residual : 0;
  const int n_res = (len - 1) / kResTile - qv / kResTile + 1;
  const int n_tiles = (qv + tile - 1) / tile;
  int n_split = 0;
  if (n_tiles > 0) {
    const int chunk = (n_tiles + max_splits - 1) / max_splits;
    n_split = (n_tiles + chunk - 1) / chunk;
  }
  const int n_parts = n_res + n_split;
  auto part = [&](int i) { return i < n_res ? i : max_res + (i - n_res); };
  float m_max = -INFINITY;
  for (int i = lane; i < n_parts; i += 32) {
    m_max = fmaxf(m_max, part_ml[(static_cast<int64_t>(part(i)) * n_heads + head) * 2]);
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) m_max = fmaxf(m_max, __shfl_xor_sync(kFullMask, m_max, off));
  // Batches of 8 independent loads per thread: the loop is latency-bound
  // otherwise (one L2 round trip per partial).
  float acc = 0.0f, sum = 0.0f;
  constexpr int kBatch = 8;
  for (int first = grp; first < n_parts; first += kBatch * kGroups) {
    float po[kBatch], pm[kBatch], pl[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = first + u * kGroups;
      pm[u] = -INFINITY;
      pl[u] = po[u] = 0.0f;
      if (i < n_parts) {
        const int64_t idx = static_cast<int64_t>(part(i)) * n_heads + head;
        pm[u] = part_ml[idx * 2];
        pl[u] = part_ml[idx * 2 + 1];
        po[u] = part_o[idx * kD + d];
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const float sc = FastExp2(pm[u] - m_max);
      acc += po[u] * sc;
      sum += pl[u] * sc;
    }
  }
  red_o[grp][d] = acc;
  if (d == 0) red_l[grp] = sum;
  __syncthreads();
  if (grp != 0) return;
  float total = 0.0f, total_l = 0.0f;
#pragma unroll
  for (int i = 0; i < kGroups; ++i) {
    total += red_o[i][d];
    total_l += red_l[i];
  }
  out[static_cast<int64_t>(head) * kD + d] = __float2bfloat16(total / total_l);
}

// ---------------------------------------------------------------------------
// Host side.

int MaxSplits(const QuantShape& s, int tile) {
  const int by_blocks = (kTargetBlocks + s.n_kv_heads - 1) / s.n_kv_heads;
  const int by_capacity = (s.capacity + tile - 1) / tile;
  return std::max(1, std::min(by_blocks, by_capacity));
}
int MaxResidualBlocks(const QuantShape& s) { return s.params.residual / kResTile + 1; }

int GridFor(int64_t total) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((total + 255) / 256, 4096)));
}

}  // namespace

absl::Status ValidateQuantShape(const QuantShape& shape) {
  if (absl::Status st = shape.Validate(); !st.ok()) return st;
  if (shape.head_dim != 64 && shape.head_dim != 128) {
    return absl::InvalidArgumentError(
        absl::StrCat("quant kernels: head_dim ", shape.head_dim, " unsupported (64 or 128)"));
  }
  return absl::OkStatus();
}

QuantDeviceLayout QuantLayout(const QuantShape& s) {
  QuantDeviceLayout L;
  size_t at = 0;
  auto place = [&](size_t bytes) {
    const size_t off = at;
    at = (off + bytes + kPad + 255) / 256 * 256;
    return off;
  };
  const int64_t h = s.n_kv_heads;
  L.k_codes = place(h * s.k_code_words_per_head() * 4);
  L.k_params = place(h * s.k_params_per_head() * 4);
  L.v_codes = place(h * s.v_code_words_per_head() * 4);
  L.v_params = place(h * s.v_params_per_head() * 4);
  L.k_res = place(h * s.residual_elems_per_head() * 2);
  L.v_res = place(h * s.residual_elems_per_head() * 2);
  L.bytes = at;
  return L;
}

QuantDeviceCache QuantCacheAt(void* base, const QuantShape& shape) {
  const QuantDeviceLayout L = QuantLayout(shape);
  char* b = static_cast<char*>(base);
  QuantDeviceCache c;
  c.k_codes = reinterpret_cast<uint32_t*>(b + L.k_codes);
  c.k_params = reinterpret_cast<uint32_t*>(b + L.k_params);
  c.v_codes = reinterpret_cast<uint32_t*>(b + L.v_codes);
  c.v_params = reinterpret_cast<uint32_t*>(b + L.v_params);
  c.k_res = reinterpret_cast<bf16*>(b + L.k_res);
  c.v_res = reinterpret_cast<bf16*>(b + L.v_res);
  return c;
}

namespace {
absl::Status ValidateCache(const QuantDeviceCache& c, const char* what) {
  if (c.k_codes == nullptr || c.k_params == nullptr || c.v_codes == nullptr ||
      c.v_params == nullptr || c.k_res == nullptr || c.v_res == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": cache arrays must be non-null"));
  }
  return absl::OkStatus();
}
}  // namespace

absl::Status LaunchQuantPack(const bf16* k_full, const bf16* v_full, int64_t head_stride, int start,
                             int end, const QuantShape& shape, const QuantDeviceCache& cache,
                             cudaStream_t stream) {
  if (absl::Status st = ValidateQuantShape(shape); !st.ok()) return st;
  if (start < 0 || start > end || end > shape.capacity) {
    return absl::InvalidArgumentError(absl::StrCat("quant pack: range [", start, ", ", end,
                                                   ") outside capacity ", shape.capacity));
  }
  if (head_stride < static_cast<int64_t>(end) * shape.head_dim) {
    return absl::InvalidArgumentError(absl::StrCat("quant pack: head_stride ", head_stride,
                                                   " smaller than ", end, " rows"));
  }
  if (start == end) return absl::OkStatus();
  if (k_full == nullptr || v_full == nullptr) {
    return absl::InvalidArgumentError("quant pack: k_full and v_full must be non-null");
  }
  if (absl::Status st = ValidateCache(cache, "quant pack"); !st.ok()) return st;
  const int R = shape.params.residual, G = shape.params.group, b = shape.params.bits;
  const int hd = shape.head_dim, n_kv = shape.n_kv_heads;
  const HeadStrides hs(shape);
  const int g0 = (start - start % R) / G, g1 = (end - end % R) / G;
  if (g1 > g0) {
    PackKeysKernel<<<GridFor(static_cast<int64_t>(n_kv) * (g1 - g0) * hd), 256, 0, stream>>>(
        k_full, head_stride, g0, g1, n_kv, hd, G, b, hs, cache);
    CUDA_RETURN_IF_LAUNCH_FAILED("PackKeysKernel");
  }
  const int v0 = start > R ? start - R : 0, v1 = end > R ? end - R : 0;
  if (v1 > v0) {
    PackValuesKernel<<<GridFor(static_cast<int64_t>(n_kv) * (v1 - v0) * (hd / G)), 256, 0,
                       stream>>>(v_full, head_stride, v0, v1, n_kv, hd, G, b, hs, cache);
    CUDA_RETURN_IF_LAUNCH_FAILED("PackValuesKernel");
  }
  const int r0 = std::max(end - R, start);
  PackRingsKernel<<<GridFor(static_cast<int64_t>(n_kv) * (end - r0) * hd), 256, 0, stream>>>(
      k_full, v_full, head_stride, r0, end, n_kv, hd, R, hs, cache);
  CUDA_RETURN_IF_LAUNCH_FAILED("PackRingsKernel");
  return absl::OkStatus();
}

absl::Status LaunchQuantAppend(const bf16* k_full, const bf16* v_full, int64_t head_stride,
                               const int32_t* pos, const QuantShape& shape,
                               const QuantDeviceCache& cache, cudaStream_t stream) {
  if (absl::Status st = ValidateQuantShape(shape); !st.ok()) return st;
  if (k_full == nullptr || v_full == nullptr || pos == nullptr) {
    return absl::InvalidArgumentError("quant append: k_full, v_full and pos must be non-null");
  }
  if (absl::Status st = ValidateCache(cache, "quant append"); !st.ok()) return st;
  AppendKernel<<<shape.n_kv_heads, 256, 0, stream>>>(k_full, v_full, head_stride, pos,
                                                     shape.head_dim, shape.params.group,
                                                     shape.params.bits, shape.params.residual,
                                                     HeadStrides(shape), cache);
  CUDA_RETURN_IF_LAUNCH_FAILED("AppendKernel");
  return absl::OkStatus();
}

absl::Status LaunchQuantMaterialize(int len, const QuantShape& shape, const QuantDeviceCache& cache,
                                    bf16* k_full, bf16* v_full, int64_t head_stride,
                                    cudaStream_t stream) {
  if (absl::Status st = ValidateQuantShape(shape); !st.ok()) return st;
  if (len < 0 || len > shape.capacity) {
    return absl::InvalidArgumentError(
        absl::StrCat("quant materialize: len ", len, " outside [0, ", shape.capacity, "]"));
  }
  if (head_stride < static_cast<int64_t>(len) * shape.head_dim) {
    return absl::InvalidArgumentError("quant materialize: head_stride smaller than len rows");
  }
  if (len == 0) return absl::OkStatus();
  if (k_full == nullptr || v_full == nullptr) {
    return absl::InvalidArgumentError("quant materialize: outputs must be non-null");
  }
  if (absl::Status st = ValidateCache(cache, "quant materialize"); !st.ok()) return st;
  MaterializeKernel<<<GridFor(static_cast<int64_t>(shape.n_kv_heads) * len * shape.head_dim), 256,
                      0, stream>>>(len, shape.n_kv_heads, shape.head_dim, shape.params.group,
                                   shape.params.bits, shape.params.residual, HeadStrides(shape),
                                   cache, k_full, v_full, head_stride);
  CUDA_RETURN_IF_LAUNCH_FAILED("MaterializeKernel");
  return absl::OkStatus();
}

size_t QuantDecodeWorkspaceBytes(const QuantShape& shape, int n_heads) {
  if (!ValidateQuantShape(shape).ok() || n_heads <= 0) return 0;
  // Sized for the smallest tile (the most splits).
  return static_cast<size_t>(MaxSplits(shape, kWarps * 32) + MaxResidualBlocks(shape)) * n_heads *
         (shape.head_dim + 2) * sizeof(float);
}

namespace {

template <int kD, int kBits, int kG, int kSlice>
absl::Status LaunchTyped(QuantAttnParams p, const QuantShape& shape, int n_heads, bf16* out,
                         cudaStream_t stream) {
  using C = QCfg<kD, kBits, kG, kSlice>;
  // About two waves of resident blocks (residual blocks included): each
  // split then streams several tiles through its pipeline, and a small
  // second wave keeps the tail short. Never more than the workspace holds.
  constexpr int kBlocksPerSm = (kBits == 4 || kSlice == 64) ? 2 : 3;
  const int wave_blocks = 2 * DeviceSmCount() * kBlocksPerSm - p.max_res * shape.n_kv_heads;
  p.max_splits = std::max(1, std::min(MaxSplits(shape, C::kTile), wave_blocks / shape.n_kv_heads));
  p.part_ml = p.part_o + static_cast<size_t>(p.max_splits + p.max_res) * n_heads * kD;
  CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(QuantDecodeKernel<kD, kBits, kG, kSlice>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem));
  const dim3 grid(p.max_res + p.max_splits, shape.n_kv_heads);
  QuantDecodeKernel<kD, kBits, kG, kSlice><<<grid, kThreads, C::kSmem, stream>>>(p);
  CUDA_RETURN_IF_LAUNCH_FAILED("QuantDecodeKernel");
  QuantCombineKernel<kD><<<n_heads, kCombineThreads, 0, stream>>>(
      p.part_o, p.part_ml, p.length, p.capacity, p.residual, p.max_splits, p.max_res, C::kTile,
      out);
  CUDA_RETURN_IF_LAUNCH_FAILED("QuantCombineKernel");
  return absl::OkStatus();
}

// Slice per warp: 64 tokens at 1 and 2 bits where the group allows (H100,
// Llama-8B shape: 27.0 / 66.4 us at 32k / 128k for 1 bit vs 27.5 / 69.7 with
// 32, 2 bits 29.8 / 71.5 vs 30.8 / 77.9), 32 at 4 bits (55.5 / 152.3 vs
// 60.4 / 153.5: larger stages, fewer blocks per SM). Both variants pass the tests.
template <int kD, int kBits>
absl::Status ByGroup(const QuantAttnParams& p, const QuantShape& shape, int n_heads, bf16* out,
                     cudaStream_t stream) {
  constexpr int kWide = kBits == 4 ? 32 : 64;
  switch (shape.params.group) {
    case 32:
      return LaunchTyped<kD, kBits, 32, 32>(p, shape, n_heads, out, stream);
    case 64:
      return LaunchTyped<kD, kBits, 64, kWide>(p, shape, n_heads, out, stream);
    case 128:
      if constexpr (kD >= 128) return LaunchTyped<kD, kBits, 128, kWide>(p, shape, n_heads, out, stream);
      [[fallthrough]];
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("quant attention: group ", shape.params.group, " unsupported"));
  }
}

template <int kD>
absl::Status ByBits(const QuantAttnParams& p, const QuantShape& shape, int n_heads, bf16* out,
                    cudaStream_t stream) {
  const int bits = shape.params.bits;
  switch (bits) {
    case 1:
      return ByGroup<kD, 1>(p, shape, n_heads, out, stream);
    case 2:
      return ByGroup<kD, 2>(p, shape, n_heads, out, stream);
    case 4:
      return ByGroup<kD, 4>(p, shape, n_heads, out, stream);
    default:
      return absl::InvalidArgumentError(absl::StrCat("quant attention: bits ", bits, " unsupported"));
  }
}

}  // namespace

absl::Status LaunchQuantDecodeAttention(const bf16* q, int n_heads, const QuantShape& shape,
                                        const QuantDeviceCache& cache, const int32_t* length,
                                        void* workspace, bf16* out, cudaStream_t stream) {
  if (absl::Status st = ValidateQuantShape(shape); !st.ok()) return st;
  if (n_heads <= 0 || n_heads % shape.n_kv_heads != 0 || n_heads / shape.n_kv_heads > kMaxGroup) {
    return absl::InvalidArgumentError(absl::StrCat(
        "quant attention: n_heads ", n_heads, " must be a multiple of n_kv_heads ",
        shape.n_kv_heads, " with at most ", kMaxGroup, " query heads per KV head"));
  }
  if (q == nullptr || length == nullptr || workspace == nullptr || out == nullptr) {
    return absl::InvalidArgumentError("quant attention: q, length, workspace, out must be non-null");
  }
  if (absl::Status st = ValidateCache(cache, "quant attention"); !st.ok()) return st;
  QuantAttnParams p;
  p.q = q;
  p.k_codes = cache.k_codes;
  p.k_params = cache.k_params;
  p.v_codes = cache.v_codes;
  p.v_params = cache.v_params;
  p.k_res = cache.k_res;
  p.v_res = cache.v_res;
  p.length = length;
  p.hs = HeadStrides(shape);
  p.capacity = shape.capacity;
  p.residual = shape.params.residual;
  p.group = n_heads / shape.n_kv_heads;
  p.max_res = MaxResidualBlocks(shape);
  p.scale_log2 = kLog2e / std::sqrt(static_cast<float>(shape.head_dim));
  p.part_o = static_cast<float*>(workspace);
  switch (shape.head_dim) {
    case 64:
      return ByBits<64>(p, shape, n_heads, out, stream);
    case 128:
      return ByBits<128>(p, shape, n_heads, out, stream);
    default:
      return absl::InvalidArgumentError("quant attention: head_dim unsupported");
  }
}

}  // namespace tailorkv::cuda
