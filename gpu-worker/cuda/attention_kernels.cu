// Prefill and decode attention on tensor cores (mma.sync m16n8k16, bf16 in,
// fp32 accumulate), FlashAttention-2 style, and on Hopper a wgmma prefill
// kernel (FlashAttention-3 style, head_dim 128; the default where it runs,
// see "Prefill on Hopper" below). See attention_kernels.cuh for the contract
// and runtime::ref::AttentionHead for the reference.
//
// Shared machinery:
//  * K/V are staged through shared memory in tiles of kTileKeys rows by
//    cp.async (16-byte copies, L2 only), several tiles deep, so that copies
//    are in flight while a tile is consumed; one __syncthreads per tile.
//  * Tiles are stored [row][head_dim] with the 16-byte chunk index XORed by
//    (row & 7): the 8 row addresses of every ldmatrix hit 8 distinct bank
//    groups, and so do the cp.async writes.
//  * Cache rows past the valid range are zero-filled instead of read (the
//    cache there may hold anything, NaN included, or lie past the end).
//  * Online softmax in the log2 domain (scores pre-multiplied by
//    log2(e)/sqrt(head_dim)); P is rounded to bf16 for the P*V product, as in
//    FlashAttention-2, and the row sums are kept in fp32.
//
// Prefill: a block owns 128 query rows of one query head; each of 4 warps
// owns 32 consecutive rows as two m16 row tiles, so each K/V fragment read
// from shared memory feeds two mma, and walks the K/V tiles of its KV head up
// to its last row's position (two tiles resident: one consumed, one in
// flight; two blocks per SM); warps skip tiles that lie wholly after their
// rows. Blocks are issued heaviest (last rows) first.
//
// Decode: a block owns one KV head and one split (a contiguous chunk of the
// cache); the query heads of the GQA group are the rows of one 16-row mma
// tile (rows past the group are zero), so K and V are read exactly once.
// Each of 4 warps takes 16 keys of every tile with its own softmax state; the
// warps merge in shared memory and write an unnormalised partial (o, m, l)
// per (split, head). The chunk size is derived on the device from *length
// and the number of splits (fixed by the capacity), so every split is busy at
// any length; splits past the length exit at once. A second kernel merges the
// partials of the active splits.
#include "cuda/attention_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cuda/cuda_check.h"

namespace tailorkv::cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kTileKeys = 64;                         // K/V rows per shared-memory tile
constexpr int kStages = 3;                            // K/V tiles resident per decode block
constexpr int kPrefillRows = 128;                     // query rows per prefill block
constexpr int kPrefillWarpRows = 32;                  // query rows per prefill warp (2 x m16)
constexpr int kPrefillWarps = kPrefillRows / kPrefillWarpRows;
constexpr int kPrefillThreads = kPrefillWarps * 32;
constexpr int kPrefillStages = 2;                     // K/V tiles resident per prefill block
constexpr int kDecodeWarps = kTileKeys / 16;          // each warp takes 16 keys of a tile
constexpr int kDecodeThreads = kDecodeWarps * 32;
constexpr int kDecodeRows = 16;                       // mma rows: the query heads of a group
// Splits per KV head are chosen so that n_kv_heads x splits is about this many
// blocks: ~4 waves at 2 blocks per SM on a 132-SM H100 (and enough for larger
// chips), while the partials stay a few MB.
constexpr int kDecodeTargetBlocks = 1024;
constexpr int kCombineThreads = 256;
constexpr int kMergeStride = 8;  // float padding per row of the decode warp-merge buffer
constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFullMask = 0xffffffffu;
// PrefillKernel::kAuto picks the wgmma kernel where it runs (head_dim 128, an
// sm_90 device): 1.5x the mma.sync kernel on an H100 at 4k-128k tokens (see
// bench/NOTES-attention.md).
constexpr bool kWgmmaByDefault = true;

// ---------------------------------------------------------------------------
// PTX wrappers. All are volatile: they read shared memory that cp.async and
// barriers change behind the compiler's back.

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy; with valid == false nothing is read and the
// destination is zero-filled.
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void Ldmatrix4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void Ldmatrix4Trans(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// c += a * b for one m16n8k16 tile (a: 16x16 row-major, b: 16x8 "col").
__device__ __forceinline__ void MmaBf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 2^x; 2^-inf = +0.
__device__ __forceinline__ float FastExp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Two floats as a bf16x2 register, `lo` in the low half (the lower column).
__device__ __forceinline__ uint32_t PackBf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// ---------------------------------------------------------------------------
// Shared-memory tiles.

// Element offset of 16-byte chunk `chunk` of row `row` in a swizzled
// [rows][kD] tile.
template <int kD>
__device__ __forceinline__ int SwizzledOffset(int row, int chunk) {
  return row * kD + ((chunk ^ (row & 7)) << 3);
}

// Issues cp.async copies of rows [0, kRows) of a row-major bf16 matrix
// (`src` is row 0, `stride` elements between rows) into a swizzled tile.
// Rows >= valid_rows are zero-filled without touching global memory; `src`
// itself must be a valid address (row 0 is always valid at the call sites).
template <int kRows, int kD, int kThreads>
__device__ __forceinline__ void LoadTileAsync(bf16* smem, const bf16* src, int64_t stride,
                                              int valid_rows, int tid) {
  constexpr int kChunks = kD / 8;
  static_assert((kRows * kChunks) % kThreads == 0, "tile copy must split evenly over threads");
  const uint32_t base = SmemAddr(smem);
#pragma unroll
  for (int i = 0; i < kRows * kChunks / kThreads; ++i) {
    const int idx = tid + i * kThreads;
    const int row = idx / kChunks;
    const int chunk = idx % kChunks;
    const bool valid = row < valid_rows;
    const bf16* g = valid ? src + row * stride + chunk * 8 : src;
    CpAsync16(base + 2u * static_cast<uint32_t>(SwizzledOffset<kD>(row, chunk)), g, valid);
  }
}

// A fragments (16 rows x kD) of rows [row0, row0 + 16) of a swizzled tile.
template <int kD>
__device__ __forceinline__ void LoadAFragments(const bf16* tile, int row0, int lane,
                                               uint32_t (&a)[kD / 16][4]) {
  const int row = row0 + (lane & 15);
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    Ldmatrix4(SmemAddr(tile + SwizzledOffset<kD>(row, kk * 2 + (lane >> 4))), a[kk]);
  }
}

// s[2j], s[2j+1] += Q * K^T for keys [key0 + 16j, key0 + 16j + 16), j < kPairs:
// the scores of the warp's 16 rows against 16 * kPairs keys of the K tile.
template <int kD, int kPairs>
__device__ __forceinline__ void ScoreTile(const uint32_t (&qf)[kD / 16][4], const bf16* k_tile,
                                          int key0, int lane, float (&s)[2 * kPairs][4]) {
#pragma unroll
  for (int nt = 0; nt < 2 * kPairs; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) s[nt][e] = 0.0f;
  }
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
      // Matrices: keys +0..7 / dims +0..7, keys +0..7 / dims +8..15,
      //           keys +8..15 / dims +0..7, keys +8..15 / dims +8..15.
      const int key = key0 + 16 * j + (lane & 7) + ((lane >> 4) << 3);
      const int chunk = kk * 2 + ((lane >> 3) & 1);
      uint32_t b[4];
      Ldmatrix4(SmemAddr(k_tile + SwizzledOffset<kD>(key, chunk)), b);
      MmaBf16(s[2 * j], qf[kk], b[0], b[1]);
      MmaBf16(s[2 * j + 1], qf[kk], b[2], b[3]);
    }
  }
}

// One online-softmax step over kNT score tiles (already scaled to log2 units,
// masked entries -inf) of the rows (lane / 4) and (lane / 4 + 8). Rescales
// o and l, turns s into probabilities. m, l are per-lane copies of the row
// state (l is a partial sum over this lane's columns; summed over the quad at
// the end).
template <int kNT, int kONT>
__device__ __forceinline__ void OnlineSoftmax(float (&s)[kNT][4], float (&m)[2], float (&l)[2],
                                              float (&o)[kONT][4]) {
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    mx[0] = fmaxf(mx[0], fmaxf(s[nt][0], s[nt][1]));
    mx[1] = fmaxf(mx[1], fmaxf(s[nt][2], s[nt][3]));
  }
  float m_use[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFullMask, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFullMask, mx[r], 2));
    const float m_new = fmaxf(m[r], mx[r]);
    // A row with no unmasked key yet keeps m = -inf; subtracting 0 instead
    // keeps exp2(-inf - m) at 0 rather than NaN.
    m_use[r] = m_new == -INFINITY ? 0.0f : m_new;
    const float alpha = FastExp2(m[r] - m_use[r]);
    m[r] = m_new;
    l[r] *= alpha;
#pragma unroll
    for (int nt = 0; nt < kONT; ++nt) {
      o[nt][2 * r] *= alpha;
      o[nt][2 * r + 1] *= alpha;
    }
  }
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[nt][e] = FastExp2(s[nt][e] - m_use[e >> 1]);
      l[e >> 1] += s[nt][e];
    }
  }
}

// o += P * V for keys [key0, key0 + 16 * kPairs) of the V tile; P is the
// accumulator layout of ScoreTile, which is also the A-fragment layout.
template <int kD, int kPairs>
__device__ __forceinline__ void AccumulatePV(const float (&p)[2 * kPairs][4], const bf16* v_tile,
                                             int key0, int lane, float (&o)[kD / 8][4]) {
#pragma unroll
  for (int j = 0; j < kPairs; ++j) {
    uint32_t pa[4];
    pa[0] = PackBf16x2(p[2 * j][0], p[2 * j][1]);          // row g,   keys 2t, 2t+1
    pa[1] = PackBf16x2(p[2 * j][2], p[2 * j][3]);          // row g+8, keys 2t, 2t+1
    pa[2] = PackBf16x2(p[2 * j + 1][0], p[2 * j + 1][1]);  // row g,   keys 2t+8, 2t+9
    pa[3] = PackBf16x2(p[2 * j + 1][2], p[2 * j + 1][3]);  // row g+8, keys 2t+8, 2t+9
    // Matrices (transposed): keys +0..7 / dims +0..7, keys +8..15 / dims +0..7,
    //                        keys +0..7 / dims +8..15, keys +8..15 / dims +8..15.
    const int key = key0 + 16 * j + (lane & 7) + (((lane >> 3) & 1) << 3);
#pragma unroll
    for (int np = 0; np < kD / 16; ++np) {
      uint32_t b[4];
      Ldmatrix4Trans(SmemAddr(v_tile + SwizzledOffset<kD>(key, np * 2 + (lane >> 4))), b);
      MmaBf16(o[2 * np], pa, b[0], b[1]);
      MmaBf16(o[2 * np + 1], pa, b[2], b[3]);
    }
  }
}

// ---------------------------------------------------------------------------
// Prefill.

template <int kD>
constexpr int PrefillSmemBytes() {
  return (kPrefillRows * kD + kPrefillStages * 2 * kTileKeys * kD) * static_cast<int>(sizeof(bf16));
}

// Byte offsets, within a swizzled [rows][kD] tile row, of the 16-byte chunks
// 2i + hi (i < 4) for one lane, where `lane_x` = hi ^ (row & 7) and the lane's
// row is congruent to it mod 8. Chunk 2kk + hi of any kD then sits at
// (2kk & ~7) * 16 + off[kk & 3]: the first term and the row are compile-time
// offsets in an unrolled loop, so every ldmatrix address is a register plus an
// immediate.
struct LaneChunkOffsets {
  uint32_t off[4];
  __device__ __forceinline__ explicit LaneChunkOffsets(int lane_x) {
#pragma unroll
    for (int i = 0; i < 4; ++i) off[i] = static_cast<uint32_t>(((2 * i) ^ lane_x) << 4);
  }
  __device__ __forceinline__ uint32_t Chunk(int kk) const {
    return static_cast<uint32_t>((2 * kk) & ~7) * 16u + off[kk & 3];
  }
};

// LoadTileAsync for a K/V tile of kD-element rows: every thread copies the
// same chunk of rows r0, r0 + kRowStep, ..., so each source and destination
// address is one register plus an immediate, and nothing is kept live across
// tiles (computing the source per row, as LoadTileAsync's row-0 fallback needs,
// costs a 64-bit register pair per copy and spilled at kD = 128). Rows >=
// valid_rows are zero-filled with a 0-byte cp.async, which reads nothing, so
// their (computed, possibly past-the-end) source address is never touched.
template <int kRows, int kD, int kThreads>
__device__ __forceinline__ void LoadKvTileAsync(uint32_t smem, const bf16* src, int valid_rows,
                                                int tid) {
  constexpr int kChunks = kD / 8;
  constexpr int kRowStep = kThreads / kChunks;
  static_assert(kThreads % kChunks == 0 && kRows % kRowStep == 0, "tile copy must split evenly");
  const int r0 = tid / kChunks;
  const int chunk = tid % kChunks;
  const bf16* g = src + r0 * kD + chunk * 8;
  const uint32_t dst = smem + 2u * static_cast<uint32_t>(SwizzledOffset<kD>(r0, chunk));
#pragma unroll
  for (int i = 0; i < kRows / kRowStep; ++i) {
    // (r0 + i * kRowStep) & 7 == r0 & 7 when kRowStep % 8 == 0: same swizzle.
    static_assert(kRowStep % 8 == 0, "row step must keep the swizzle phase");
    CpAsync16(dst + i * kRowStep * kD * 2, g + i * kRowStep * kD, r0 + i * kRowStep < valid_rows);
  }
}

// Grid: (ceil(n / kPrefillRows), n_heads); block: kPrefillThreads.
//   q:       [n][n_heads][kD]
//   k_cache: [n_kv_heads][capacity][kD]   v_cache: same
//   out:     [n][n_heads][kD]
// Each warp owns kPrefillWarpRows = 32 consecutive query rows as two m16 row
// tiles, so every K/V fragment read from shared memory feeds two mma (half
// the shared-memory traffic per flop of 16 rows per warp). Q fragments are
// re-read from shared memory per tile: with o (2 x kD/8 x 4) and s (2 x 8 x 4)
// in registers, Q does not also fit at kD = 128. Two blocks per SM.
template <int kD>
__global__ void __launch_bounds__(kPrefillThreads, 2)
    PrefillAttentionKernel(const bf16* __restrict__ q, const bf16* __restrict__ k_cache,
                           const bf16* __restrict__ v_cache, int n, int start_pos, int n_heads,
                           int group, int capacity, float scale_log2, bf16* __restrict__ out) {
  constexpr int kKSteps = kD / 16;          // k16 steps of Q*K^T; also n16 pairs of P*V
  constexpr int kKeyPairs = kTileKeys / 16;  // k16 steps of P*V
  constexpr int kNT = kTileKeys / 8;         // n8 score tiles per row tile
  constexpr uint32_t kRowBytes = kD * sizeof(bf16);
  constexpr uint32_t kTileBytes = kTileKeys * kRowBytes;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  bf16* q_smem = reinterpret_cast<bf16*>(smem_raw);  // [kPrefillRows][kD]
  bf16* kv_smem = q_smem + kPrefillRows * kD;        // kPrefillStages x {K tile, V tile}

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int q_block = gridDim.x - 1 - blockIdx.x;  // heaviest blocks first
  const int head = blockIdx.y;
  const int kv_head = head / group;
  const int q_first = q_block * kPrefillRows;
  const int q_rows = min(kPrefillRows, n - q_first);
  const int kv_len = start_pos + q_first + q_rows;  // keys the block's last row attends to
  const int n_tiles = (kv_len + kTileKeys - 1) / kTileKeys;
  const int64_t q_stride = static_cast<int64_t>(n_heads) * kD;
  const bf16* k_head = k_cache + static_cast<int64_t>(kv_head) * capacity * kD;
  const bf16* v_head = v_cache + static_cast<int64_t>(kv_head) * capacity * kD;

  auto load_tile = [&](int tile) {
    const uint32_t k_tile = SmemAddr(kv_smem) + (tile % kPrefillStages) * 2 * kTileBytes;
    const int first = tile * kTileKeys;
    LoadKvTileAsync<kTileKeys, kD, kPrefillThreads>(
        k_tile, k_head + static_cast<int64_t>(first) * kD, kv_len - first, tid);
    LoadKvTileAsync<kTileKeys, kD, kPrefillThreads>(
        k_tile + kTileBytes, v_head + static_cast<int64_t>(first) * kD, kv_len - first, tid);
  };

  // Q travels in the first commit group, with tile 0.
  LoadTileAsync<kPrefillRows, kD, kPrefillThreads>(
      q_smem, q + static_cast<int64_t>(q_first) * q_stride + static_cast<int64_t>(head) * kD,
      q_stride, q_rows, tid);
  load_tile(0);
  CpAsyncCommit();

  const int warp_row0 = q_first + warp * kPrefillWarpRows;  // query index of the warp's first row
  const int warp_pos0 = start_pos + warp_row0;              // its position
  const int row_pos = warp_pos0 + lane / 4;  // position of row g of row tile 0 (+8, +16, +24)
  const bool warp_has_rows = warp_row0 < n;
  const int quad_col = (lane % 4) * 2;

  // Per-lane ldmatrix addresses. Q (A operand): rows lane & 15, chunk hi =
  // lane >> 4. K (B of Q*K^T): keys (lane & 7) + 8 * (lane >> 4), chunk hi =
  // (lane >> 3) & 1. V (B of P*V, transposed): keys (lane & 7) + 8 * ((lane >>
  // 3) & 1), chunk hi = lane >> 4.
  // Q and V share their chunk offsets.
  const LaneChunkOffsets qv_off((lane >> 4) ^ (lane & 7));
  const LaneChunkOffsets k_off(((lane >> 3) & 1) ^ (lane & 7));
  const uint32_t q_base = SmemAddr(q_smem) + (warp * kPrefillWarpRows + (lane & 15)) * kRowBytes;
  const uint32_t k_lane = ((lane & 7) + ((lane >> 4) << 3)) * kRowBytes;
  const uint32_t v_lane = kTileBytes + ((lane & 7) + (((lane >> 3) & 1) << 3)) * kRowBytes;
  const uint32_t kv_base = SmemAddr(kv_smem);

  float o[2][kD / 8][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kD / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mt][nt][e] = 0.0f;
    }
  }
  // Row state of rows g + 8 * i, i = 2 * mt + r; m in scaled log2 units.
  float m[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
  float l[4] = {0.0f, 0.0f, 0.0f, 0.0f};

  for (int tile = 0; tile < n_tiles; ++tile) {
    CpAsyncWait<0>();  // this thread's copies of `tile` (and Q) landed
    __syncthreads();   // everyone's landed; tile - 1's buffer is free
    if (tile + 1 < n_tiles) load_tile(tile + 1);
    CpAsyncCommit();

    const int key0 = tile * kTileKeys;
    if (!warp_has_rows || key0 > warp_pos0 + kPrefillWarpRows - 1) continue;  // all masked
    const uint32_t stage = kv_base + (tile % kPrefillStages) * 2 * kTileBytes;
    const uint32_t k_base = stage + k_lane;
    const uint32_t v_base = stage + v_lane;

    // S = Q * K^T: s[mt][nt] is rows 16 mt + (g, g + 8), keys 8 nt + (2t, 2t + 1).
    float s[2][kNT][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.0f;
      }
    }
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      uint32_t qa[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) Ldmatrix4(q_base + mt * 16 * kRowBytes + qv_off.Chunk(kk), qa[mt]);
#pragma unroll
      for (int j = 0; j < kKeyPairs; ++j) {
        uint32_t b[4];
        Ldmatrix4(k_base + j * 16 * kRowBytes + k_off.Chunk(kk), b);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          MmaBf16(s[mt][2 * j], qa[mt], b[0], b[1]);
          MmaBf16(s[mt][2 * j + 1], qa[mt], b[2], b[3]);
        }
      }
    }

    // Causal mask on raw scores (only tiles that reach past the warp's first row).
    if (key0 + kTileKeys - 1 > warp_pos0) {
      // key - pos = key_minus_pos + (constants of the unrolled indices).
      const int key_minus_pos = key0 + quad_col - row_pos;
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if (key_minus_pos > mt * 16 + (e >> 1) * 8 - nt * 8 - (e & 1)) s[mt][nt][e] = -INFINITY;
          }
        }
      }
    }

    // Online softmax; the scale is folded into one FFMA per score.
    float m_use[4];
    float alpha[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int mt = i >> 1;
      const int r = i & 1;
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
      const float m_new = fmaxf(m[i], mx * scale_log2);
      // A row with no unmasked key yet keeps m = -inf; subtracting 0 instead
      // keeps exp2(-inf - m) at 0 rather than NaN.
      m_use[i] = m_new == -INFINITY ? 0.0f : m_new;
      alpha[i] = FastExp2(m[i] - m_use[i]);
      m[i] = m_new;
      l[i] *= alpha[i];
    }
    // Once the running maxima settle, most tiles leave every alpha at exactly
    // 1 (2^0): skip the kD multiplies of o then (warp-uniform branch).
    if (__any_sync(kFullMask, alpha[0] != 1.0f || alpha[1] != 1.0f || alpha[2] != 1.0f ||
                                  alpha[3] != 1.0f)) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int nt = 0; nt < kD / 8; ++nt) {
          o[i >> 1][nt][2 * (i & 1)] *= alpha[i];
          o[i >> 1][nt][2 * (i & 1) + 1] *= alpha[i];
        }
      }
    }
    // P as bf16 A fragments: pa[mt][j] covers keys 16 j .. 16 j + 15.
    uint32_t pa[2][kKeyPairs][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        float p[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          p[e] = FastExp2(fmaf(s[mt][nt][e], scale_log2, -m_use[2 * mt + (e >> 1)]));
          l[2 * mt + (e >> 1)] += p[e];
        }
        pa[mt][nt / 2][(nt % 2) * 2] = PackBf16x2(p[0], p[1]);      // row g
        pa[mt][nt / 2][(nt % 2) * 2 + 1] = PackBf16x2(p[2], p[3]);  // row g + 8
      }
    }

    // O += P * V.
#pragma unroll
    for (int j = 0; j < kKeyPairs; ++j) {
#pragma unroll
      for (int np = 0; np < kKSteps; ++np) {
        uint32_t b[4];
        Ldmatrix4Trans(v_base + j * 16 * kRowBytes + qv_off.Chunk(np), b);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          MmaBf16(o[mt][2 * np], pa[mt][j], b[0], b[1]);
          MmaBf16(o[mt][2 * np + 1], pa[mt][j], b[2], b[3]);
        }
      }
    }
  }
  CpAsyncWait<0>();  // leave no copy in flight at exit

  if (!warp_has_rows) return;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    l[i] += __shfl_xor_sync(kFullMask, l[i], 1);
    l[i] += __shfl_xor_sync(kFullMask, l[i], 2);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int mt = i >> 1;
    const int r = i & 1;
    const int row = warp_row0 + lane / 4 + i * 8;
    if (row >= n) continue;
    const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
    bf16* dst = out + (static_cast<int64_t>(row) * n_heads + head) * kD + quad_col;
#pragma unroll
    for (int nt = 0; nt < kD / 8; ++nt) {
      *reinterpret_cast<__nv_bfloat162*>(dst + nt * 8) =
          __floats2bfloat162_rn(o[mt][nt][2 * r] * inv, o[mt][nt][2 * r + 1] * inv);
    }
  }
}

// ---------------------------------------------------------------------------
// Prefill on Hopper: wgmma (sm_90a), FlashAttention-3 style, head_dim 128.
//
// Block: 128 query rows of one query head; 384 threads = two consumer
// warpgroups (warps 0-3, 4-7; 64 rows each) and one producer warpgroup
// (warps 8-11), which gives most of its registers to the consumers
// (setmaxnreg: 240 per consumer thread, 24 per producer thread).
//  * The producer copies Q once and then every K and V tile (128 keys) of the
//    block's KV head into shared memory with cp.async, kStages tiles deep,
//    and signals each copy's completion on an mbarrier
//    (cp.async.mbarrier.arrive.noinc); consumers hand a stage back through
//    an "empty" mbarrier (one arrival per consumer warp).
//  * Tiles are stored in the wgmma 128-byte-swizzle layout as two 64-column
//    halves [2][rows][64]: row r's 16-byte chunk c (of 8) sits at
//    r * 128 + ((c ^ (r & 7)) << 4), 1024-byte aligned atoms of 8 rows. The
//    same bytes serve as K-major operands (Q, and K for S = Q K^T) and as the
//    MN-major (transposed) B operand V of O += P V.
//  * S = Q K^T: 8 wgmma m64n128k16, A and B from shared memory. P (bf16)
//    stays in registers as the A operand of P V: the accumulator layout of S
//    is the A-fragment layout, as with mma.sync.
//  * Named barriers make the two warpgroups take turns issuing S = Q K^T
//    (ping-pong), which keeps them out of phase: one's softmax runs while
//    the other's products occupy the tensor cores. (Issuing S of tile t
//    together with P V of tile t - 1 within a warpgroup, as FA3 also does,
//    needs S, P and O live at once: ptxas then spills and serializes the
//    wgmma at the 168-register entry cap, setmaxnreg notwithstanding.)
// Both warpgroups walk every tile of the block (the lower one may see one
// wholly masked tile) so that their barrier rounds pair up.

constexpr int kWgRows = 64;                           // query rows per consumer warpgroup
constexpr int kWgmmaRows = 2 * kWgRows;               // query rows per block
constexpr int kWgmmaKeys = 128;                       // keys per K/V tile
constexpr int kWgmmaD = 128;                          // head_dim
constexpr int kWgmmaConsumerThreads = 256;
constexpr int kWgmmaProducerThreads = 128;
constexpr int kWgmmaThreads = kWgmmaConsumerThreads + kWgmmaProducerThreads;
constexpr uint32_t kWgmmaQBytes = kWgmmaRows * kWgmmaD * 2;    // 32 KB
constexpr uint32_t kWgmmaTileBytes = kWgmmaKeys * kWgmmaD * 2;  // 32 KB (K or V)
constexpr uint32_t kWgmmaHalfBytes = kWgmmaKeys * 128;         // one 64-column half of a tile

template <int kStages>
constexpr int WgmmaSmemBytes() {
  // 1024 bytes of slack to align the base for the swizzle atoms, then Q, the
  // stages and the mbarriers.
  return 1024 + static_cast<int>(kWgmmaQBytes) + kStages * 2 * static_cast<int>(kWgmmaTileBytes) +
         8 * (1 + 4 * kStages);
}

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define TKV_HAS_WGMMA 1
#else
#define TKV_HAS_WGMMA 0
#endif

#if TKV_HAS_WGMMA
// d (+)= A * B, m64n128k16, A and B from shared memory (both K-major).
__device__ __forceinline__ void WgmmaSS(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                        int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),
        "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
        "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]),
        "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),
        "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),
        "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]),
        "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]),
        "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// d += A * B, m64n128k16, A (bf16 fragments) from registers, B from shared
// memory MN-major (transposed).
__device__ __forceinline__ void WgmmaRS(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b,
                                        int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),
        "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
        "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]),
        "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),
        "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),
        "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]),
        "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]),
        "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b),
        "r"(accumulate));
}

__device__ __forceinline__ void WgmmaFence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void WgmmaCommit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void WgmmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses of `d` across a wgmma wait.
__device__ __forceinline__ void PinRegisters(float (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i]));
}
#endif  // TKV_HAS_WGMMA

__device__ __forceinline__ void MbarInit(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void MbarArrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Arrives on `bar` once every cp.async this thread issued so far has landed.
__device__ __forceinline__ void CpAsyncMbarArrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Waits for the completion of the phase of `bar` with parity `parity`. A hang
// (a pipeline bug) traps after 2^24 polls instead of spinning forever.
__device__ __forceinline__ void MbarWait(uint32_t bar, uint32_t parity) {
  for (uint32_t polls = 0;; ++polls) {
    uint32_t done;
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
    if (done) return;
    if (polls > (1u << 24)) __trap();
  }
}
__device__ __forceinline__ void NamedBarSync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void NamedBarArrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// wgmma shared-memory descriptor, 128-byte swizzle: start address, leading
// and stride byte offsets (all >> 4).
__device__ __forceinline__ uint64_t SmemDesc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3ffff) >> 4) |
         (static_cast<uint64_t>(lbo >> 4) << 16) | (static_cast<uint64_t>(sbo >> 4) << 32) |
         (1ull << 62);
}

// Copies rows [0, kRows) of a row-major [rows][128] bf16 matrix (`src` is
// row 0 of this thread's 16-byte column chunk, `stride` elements between
// rows) into a swizzled [2][kRows][64] tile with the 128 producer threads:
// thread pt copies chunk pt % 16 of rows 8 i + pt / 16, so its swizzle phase
// (row & 7) is fixed. Rows >= valid_rows are zero-filled unread.
template <int kRows>
__device__ __forceinline__ void ProducerLoadSwizzled(uint32_t dst, const bf16* src,
                                                     int64_t stride, int valid_rows, int pt) {
  const int chunk = pt & 15;
  const int r0 = pt >> 4;
  dst += static_cast<uint32_t>(chunk >> 3) * (kRows * 128) + static_cast<uint32_t>(r0) * 128 +
         (static_cast<uint32_t>((chunk & 7) ^ r0) << 4);
  src += r0 * stride;
#pragma unroll
  for (int i = 0; i < kRows / 8; ++i) {
    CpAsync16(dst + i * 1024, src + 8 * i * stride, 8 * i + r0 < valid_rows);
  }
}

// Grid: (ceil(n / 128), n_heads); block: kWgmmaThreads. Arguments as
// PrefillAttentionKernel; head_dim 128.
template <int kStages>
__global__ void __launch_bounds__(kWgmmaThreads, 1)
    PrefillWgmmaKernel(const bf16* __restrict__ q, const bf16* __restrict__ k_cache,
                       const bf16* __restrict__ v_cache, int n, int start_pos, int n_heads,
                       int group, int capacity, float scale_log2, bf16* __restrict__ out) {
#if TKV_HAS_WGMMA
  constexpr int kD = kWgmmaD;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t q_smem = (SmemAddr(smem_raw) + 1023u) & ~1023u;  // [2 wg][2][64][64]
  const uint32_t kv_smem = q_smem + kWgmmaQBytes;  // stage s: K at + s * 2 * tile, V after it
  const uint32_t bars = kv_smem + kStages * 2 * kWgmmaTileBytes;
  const uint32_t q_full = bars;
  auto k_full = [&](int s) { return bars + 8u * (1 + s); };
  auto v_full = [&](int s) { return bars + 8u * (1 + kStages + s); };
  auto k_empty = [&](int s) { return bars + 8u * (1 + 2 * kStages + s); };
  auto v_empty = [&](int s) { return bars + 8u * (1 + 3 * kStages + s); };
  auto k_stage = [&](int s) { return kv_smem + static_cast<uint32_t>(s) * 2 * kWgmmaTileBytes; };

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int q_block = gridDim.x - 1 - blockIdx.x;  // heaviest blocks first
  const int head = blockIdx.y;
  const int kv_head = head / group;
  const int q_first = q_block * kWgmmaRows;
  const int q_rows = min(kWgmmaRows, n - q_first);
  const int kv_len = start_pos + q_first + q_rows;  // keys the block's last row attends to
  const int n_tiles = (kv_len + kWgmmaKeys - 1) / kWgmmaKeys;
  const int64_t q_stride = static_cast<int64_t>(n_heads) * kD;

  if (tid == 0) {
    MbarInit(q_full, kWgmmaProducerThreads);
    for (int s = 0; s < kStages; ++s) {
      MbarInit(k_full(s), kWgmmaProducerThreads);
      MbarInit(v_full(s), kWgmmaProducerThreads);
      MbarInit(k_empty(s), kWgmmaConsumerThreads / 32);
      MbarInit(v_empty(s), kWgmmaConsumerThreads / 32);
    }
  }
  __syncthreads();

  if (tid >= kWgmmaConsumerThreads) {
    // Producer warpgroup.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
    const int pt = tid - kWgmmaConsumerThreads;
    const int chunk8 = (pt & 15) * 8;
    const bf16* q_src = q + static_cast<int64_t>(q_first) * q_stride +
                        static_cast<int64_t>(head) * kD + chunk8;
    ProducerLoadSwizzled<kWgRows>(q_smem, q_src, q_stride, q_rows, pt);
    ProducerLoadSwizzled<kWgRows>(q_smem + kWgmmaQBytes / 2, q_src + kWgRows * q_stride, q_stride,
                                  q_rows - kWgRows, pt);
    CpAsyncMbarArrive(q_full);
    const bf16* k_src = k_cache + static_cast<int64_t>(kv_head) * capacity * kD + chunk8;
    const bf16* v_src = v_cache + static_cast<int64_t>(kv_head) * capacity * kD + chunk8;
    for (int t = 0; t < n_tiles; ++t) {
      const int s = t % kStages;
      const uint32_t phase = (t / kStages) & 1;
      const int first = t * kWgmmaKeys;
      const int64_t offset = static_cast<int64_t>(first) * kD;
      MbarWait(k_empty(s), phase ^ 1);
      ProducerLoadSwizzled<kWgmmaKeys>(k_stage(s), k_src + offset, kD, kv_len - first, pt);
      CpAsyncMbarArrive(k_full(s));
      MbarWait(v_empty(s), phase ^ 1);
      ProducerLoadSwizzled<kWgmmaKeys>(k_stage(s) + kWgmmaTileBytes, v_src + offset, kD,
                                       kv_len - first, pt);
      CpAsyncMbarArrive(v_full(s));
    }
    CpAsyncCommit();  // wait for every copy before the warp exits
    CpAsyncWait<0>();
  } else {
  // Consumer warpgroups (not indented: the else branch runs to the end).
  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
  const int wg = warp / 4;
  const int wl = warp % 4;
  const int g = lane / 4;
  const int quad_col = (lane % 4) * 2;
  const int wg_row0 = q_first + wg * kWgRows;  // query index of the warpgroup's first row
  const int wg_pos0 = start_pos + wg_row0;
  const int row_pos = wg_pos0 + wl * 16 + g;  // position of this thread's row g (and g + 8)
  const int my_bar = 1 + wg;                  // named barriers 1, 2: "my turn to issue"
  const int other_bar = 2 - wg;

  // Descriptors: Q (K-major, A), K (K-major, B), V (MN-major, B). K-step kk
  // of Q K^T: half kk / 4 of the columns, byte offset 32 * (kk % 4) within
  // the swizzled 128-byte row. Key step kk of P V: 16 rows = 2048 bytes.
  const uint64_t q_desc = SmemDesc(q_smem + wg * (kWgmmaQBytes / 2), 16, 1024);
  const uint64_t k_desc0 = SmemDesc(kv_smem, 16, 1024);
  const uint64_t v_desc0 = SmemDesc(kv_smem + kWgmmaTileBytes, kWgmmaHalfBytes, 1024);
  constexpr uint64_t kStageDesc = 2 * kWgmmaTileBytes >> 4;
  auto q_kstep = [](int kk) -> uint64_t {
    return ((kk / 4) * (kWgRows * 128) + (kk % 4) * 32) >> 4;
  };
  auto k_kstep = [](int kk) -> uint64_t {
    return ((kk / 4) * kWgmmaHalfBytes + (kk % 4) * 32) >> 4;
  };

  float o[64];
  float s[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.0f, 0.0f};
  uint32_t p[8][4];

  auto issue_s = [&](int stage) {
    const uint64_t k_desc = k_desc0 + stage * kStageDesc;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) WgmmaSS(s, q_desc + q_kstep(kk), k_desc + k_kstep(kk), kk);
  };
  auto issue_pv = [&](int stage) {
    const uint64_t v_desc = v_desc0 + stage * kStageDesc;
#pragma unroll
    for (int kk = 0; kk < kWgmmaKeys / 16; ++kk) WgmmaRS(o, p[kk], v_desc + kk * (2048 >> 4), 1);
  };
  // Mask, running max, P = 2^(s * scale - m) in place, l; returns whether
  // o needs rescaling, with the factors in alpha.
  auto softmax = [&](int tile, float (&alpha)[2]) {
    const int key0 = tile * kWgmmaKeys;
    if (key0 + kWgmmaKeys - 1 > wg_pos0) {  // the tile reaches past the warpgroup's first row
      const int key_minus_pos = key0 + quad_col - row_pos;
#pragma unroll
      for (int i = 0; i < 16; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (key_minus_pos + 8 * i + (e & 1) > 8 * (e >> 1)) s[4 * i + e] = -INFINITY;
        }
      }
    }
    float m_use[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int i = 0; i < 16; ++i) mx = fmaxf(mx, fmaxf(s[4 * i + 2 * r], s[4 * i + 2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
      const float m_new = fmaxf(m[r], mx * scale_log2);
      m_use[r] = m_new == -INFINITY ? 0.0f : m_new;
      alpha[r] = FastExp2(m[r] - m_use[r]);
      m[r] = m_new;
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int i = 0; i < 64; ++i) {
      s[i] = FastExp2(fmaf(s[i], scale_log2, -m_use[(i >> 1) & 1]));
      l[(i >> 1) & 1] += s[i];
    }
  };
  auto pack_p = [&] {
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
#pragma unroll
      for (int j = 0; j < 4; ++j) p[kk][j] = PackBf16x2(s[8 * kk + 2 * j], s[8 * kk + 2 * j + 1]);
    }
  };
  auto rescale_o = [&](const float (&alpha)[2]) {
    if (__any_sync(kFullMask, alpha[0] != 1.0f || alpha[1] != 1.0f)) {
#pragma unroll
      for (int i = 0; i < 64; ++i) o[i] *= alpha[(i >> 1) & 1];
    }
  };

  if (wg == 1) NamedBarArrive(other_bar, kWgmmaConsumerThreads);  // warpgroup 0 issues first
  MbarWait(q_full, 0);

  for (int t = 0; t < n_tiles; ++t) {
    const int stage = t % kStages;
    const uint32_t phase = (t / kStages) & 1;
    MbarWait(k_full(stage), phase);
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    // S = Q K^T; the warpgroups take turns to issue it, so that one's
    // softmax runs while the other's products occupy the tensor cores.
    NamedBarSync(my_bar, kWgmmaConsumerThreads);
    WgmmaFence();
    issue_s(stage);
    WgmmaCommit();
    // Warpgroup 1's last arrival would have no matching wait.
    if (wg == 0 || t + 1 < n_tiles) NamedBarArrive(other_bar, kWgmmaConsumerThreads);
    WgmmaWait<0>();
    PinRegisters(s);
    if (lane == 0) MbarArrive(k_empty(stage));
    float alpha[2];
    softmax(t, alpha);
    rescale_o(alpha);
    pack_p();
    // O += P V.
    MbarWait(v_full(stage), phase);
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    WgmmaFence();
    issue_pv(stage);
    WgmmaCommit();
    WgmmaWait<0>();
    PinRegisters(o);
    if (lane == 0) MbarArrive(v_empty(stage));
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(kFullMask, l[r], 1);
    l[r] += __shfl_xor_sync(kFullMask, l[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = wg_row0 + wl * 16 + g + 8 * r;
    if (row >= n) continue;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    bf16* dst = out + (static_cast<int64_t>(row) * n_heads + head) * kD + quad_col;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      *reinterpret_cast<__nv_bfloat162*>(dst + 8 * i) =
          __floats2bfloat162_rn(o[4 * i + 2 * r] * inv, o[4 * i + 2 * r + 1] * inv);
    }
  }
  }  // consumer warpgroups
#else
  __trap();  // built without sm_90a: the host never launches this
#endif  // TKV_HAS_WGMMA
}

// ---------------------------------------------------------------------------
// Decode.

__device__ __forceinline__ int ClampLength(int32_t len, int capacity) {
  return len < 0 ? 0 : (len > capacity ? capacity : len);
}

// Keys per split for `len` keys over at most `max_splits` splits: a multiple of
// the tile so that only the last split has a partial tile. Active splits:
// ceil(len / chunk) <= max_splits.
__device__ __forceinline__ int DecodeChunk(int len, int max_splits) {
  const int per_split = (len + max_splits - 1) / max_splits;
  return (per_split + kTileKeys - 1) / kTileKeys * kTileKeys;
}

template <int kD>
constexpr int DecodeSmemBytes() {
  return (kDecodeRows * kD + kStages * 2 * kTileKeys * kD) * static_cast<int>(sizeof(bf16));
}
static_assert(kDecodeWarps * kDecodeRows * (128 + kMergeStride + 2) * 4 <=
                  kStages * 2 * kTileKeys * 128 * 2,
              "decode warp-merge buffer must fit in the K/V stages");
static_assert(kDecodeWarps * kDecodeRows * (64 + kMergeStride + 2) * 4 <=
                  kStages * 2 * kTileKeys * 64 * 2,
              "decode warp-merge buffer must fit in the K/V stages");

// Grid: (max_splits, n_kv_heads); block: kDecodeThreads.
//   q:       [n_kv_heads * group][kD]
//   k_cache: [n_kv_heads][capacity][kD]   v_cache: same
//   length:  [1], keys to attend to
//   part_o:  [max_splits][n_kv_heads * group][kD] unnormalised outputs
//   part_ml: [max_splits][n_kv_heads * group][2] (max in log2 units, sum)
template <int kD>
__global__ void __launch_bounds__(kDecodeThreads, 2)
    DecodeAttentionKernel(const bf16* __restrict__ q, const bf16* __restrict__ k_cache,
                          const bf16* __restrict__ v_cache, const int32_t* __restrict__ length,
                          int group, int capacity, int max_splits, float scale_log2,
                          float* __restrict__ part_o, float* __restrict__ part_ml) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  bf16* q_smem = reinterpret_cast<bf16*>(smem_raw);  // [kDecodeRows][kD]
  bf16* kv_smem = q_smem + kDecodeRows * kD;         // kStages x {K tile, V tile}

  const int split = blockIdx.x;
  const int kv_head = blockIdx.y;
  const int n_heads = gridDim.y * group;
  const int len = ClampLength(*length, capacity);
  const int chunk = DecodeChunk(len, max_splits);
  const int k_begin = split * chunk;
  if (k_begin >= len) return;  // whole block: no barrier has been reached yet
  const int k_end = min(len, k_begin + chunk);
  const int n_tiles = (k_end - k_begin + kTileKeys - 1) / kTileKeys;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const bf16* k_head = k_cache + static_cast<int64_t>(kv_head) * capacity * kD;
  const bf16* v_head = v_cache + static_cast<int64_t>(kv_head) * capacity * kD;

  auto load_tile = [&](int tile) {
    bf16* k_tile = kv_smem + (tile % kStages) * 2 * kTileKeys * kD;
    const int first = k_begin + tile * kTileKeys;
    LoadTileAsync<kTileKeys, kD, kDecodeThreads>(k_tile, k_head + static_cast<int64_t>(first) * kD,
                                                 kD, k_end - first, tid);
    LoadTileAsync<kTileKeys, kD, kDecodeThreads>(k_tile + kTileKeys * kD,
                                                 v_head + static_cast<int64_t>(first) * kD, kD,
                                                 k_end - first, tid);
  };

  // The group's query heads are rows 0..group-1 of the A tile; the rest are zero.
  LoadTileAsync<kDecodeRows, kD, kDecodeThreads>(
      q_smem, q + static_cast<int64_t>(kv_head) * group * kD, kD, group, tid);
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) {
    if (t < n_tiles) load_tile(t);
    CpAsyncCommit();
  }

  const int quad_col = (lane % 4) * 2;
  uint32_t qf[kD / 16][4];
  float o[kD / 8][4];
#pragma unroll
  for (int nt = 0; nt < kD / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[nt][e] = 0.0f;
  }
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.0f, 0.0f};

  for (int tile = 0; tile < n_tiles; ++tile) {
    CpAsyncWait<kStages - 2>();
    __syncthreads();
    if (tile + kStages - 1 < n_tiles) load_tile(tile + kStages - 1);
    CpAsyncCommit();
    if (tile == 0) LoadAFragments<kD>(q_smem, 0, lane, qf);

    const int warp_key0 = k_begin + tile * kTileKeys + warp * 16;  // first key of this warp
    if (warp_key0 >= k_end) continue;
    const bf16* k_tile = kv_smem + (tile % kStages) * 2 * kTileKeys * kD;
    const bf16* v_tile = k_tile + kTileKeys * kD;

    float s[2][4];
    ScoreTile<kD, 1>(qf, k_tile, warp * 16, lane, s);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = warp_key0 + nt * 8 + quad_col + (e & 1);
        s[nt][e] = key < k_end ? s[nt][e] * scale_log2 : -INFINITY;
      }
    }
    OnlineSoftmax(s, m, l, o);
    AccumulatePV<kD, 1>(s, v_tile, warp * 16, lane, o);
  }
  CpAsyncWait<0>();
  __syncthreads();  // every warp is done with the K/V stages: reuse them for the merge

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(kFullMask, l[r], 1);
    l[r] += __shfl_xor_sync(kFullMask, l[r], 2);
  }
  constexpr int kStride = kD + kMergeStride;
  float* merge_o = reinterpret_cast<float*>(kv_smem);           // [warps][16][kStride]
  float* merge_ml = merge_o + kDecodeWarps * kDecodeRows * kStride;  // [warps][16][2]
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = lane / 4 + r * 8;
    float* dst = merge_o + (warp * kDecodeRows + row) * kStride + quad_col;
#pragma unroll
    for (int nt = 0; nt < kD / 8; ++nt) {
      *reinterpret_cast<float2*>(dst + nt * 8) = make_float2(o[nt][2 * r], o[nt][2 * r + 1]);
    }
    if (lane % 4 == 0) {
      merge_ml[(warp * kDecodeRows + row) * 2] = m[r];
      merge_ml[(warp * kDecodeRows + row) * 2 + 1] = l[r];
    }
  }
  __syncthreads();

  // Warp 0 always saw key k_begin (< len), so the block maximum is finite.
  for (int idx = tid; idx < group * kD; idx += kDecodeThreads) {
    const int row = idx / kD;
    const int d = idx % kD;
    float m_max = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) m_max = fmaxf(m_max, merge_ml[(w * kDecodeRows + row) * 2]);
    float acc = 0.0f;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      const float scale = FastExp2(merge_ml[(w * kDecodeRows + row) * 2] - m_max);
      acc += merge_o[(w * kDecodeRows + row) * kStride + d] * scale;
      sum += merge_ml[(w * kDecodeRows + row) * 2 + 1] * scale;
    }
    const int64_t head = static_cast<int64_t>(split) * n_heads + kv_head * group + row;
    part_o[head * kD + d] = acc;
    if (d == 0) {
      part_ml[head * 2] = m_max;
      part_ml[head * 2 + 1] = sum;
    }
  }
}

// Grid: (n_heads); block: kCombineThreads. Merges the partials of the active
// splits (derived from *length exactly as DecodeAttentionKernel does).
//   part_o, part_ml: as written by DecodeAttentionKernel
//   out: [n_heads][kD]
template <int kD>
__global__ void __launch_bounds__(kCombineThreads)
    DecodeCombineKernel(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                        const int32_t* __restrict__ length, int capacity, int max_splits,
                        bf16* __restrict__ out) {
  constexpr int kGroups = kCombineThreads / kD;  // splits summed in parallel per dim
  __shared__ float red_o[kGroups][kD];
  __shared__ float red_l[kGroups];

  const int head = blockIdx.x;
  const int n_heads = gridDim.x;
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int d = tid % kD;
  const int grp = tid / kD;
  const int len = ClampLength(*length, capacity);
  if (len == 0) {  // outside the contract; write zeros rather than NaN
    if (grp == 0) out[static_cast<int64_t>(head) * kD + d] = __float2bfloat16(0.0f);
    return;
  }
  const int chunk = DecodeChunk(len, max_splits);
  const int n_splits = (len + chunk - 1) / chunk;

  float m_max = -INFINITY;
  for (int s = lane; s < n_splits; s += 32) {
    m_max = fmaxf(m_max, part_ml[(static_cast<int64_t>(s) * n_heads + head) * 2]);
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    m_max = fmaxf(m_max, __shfl_xor_sync(kFullMask, m_max, off));
  }
  float acc = 0.0f;
  float sum = 0.0f;
  for (int s = grp; s < n_splits; s += kGroups) {
    const int64_t idx = static_cast<int64_t>(s) * n_heads + head;
    const float scale = FastExp2(part_ml[idx * 2] - m_max);
    acc += part_o[idx * kD + d] * scale;
    sum += part_ml[idx * 2 + 1] * scale;
  }
  red_o[grp][d] = acc;
  if (d == 0) red_l[grp] = sum;
  __syncthreads();
  if (grp != 0) return;
  float total = 0.0f;
  float total_l = 0.0f;
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
    total += red_o[g][d];
    total_l += red_l[g];
  }
  out[static_cast<int64_t>(head) * kD + d] = __float2bfloat16(total / total_l);
}

// ---------------------------------------------------------------------------
// Host side.

absl::Status ValidateShape(const AttentionShape& s) {
  if (s.head_dim != 64 && s.head_dim != 128) {
    return absl::InvalidArgumentError(
        absl::StrCat("attention: head_dim ", s.head_dim, " unsupported (64 or 128)"));
  }
  if (s.n_heads <= 0 || s.n_kv_heads <= 0 || s.n_heads % s.n_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("attention: n_heads ", s.n_heads,
                                                   " must be a positive multiple of n_kv_heads ",
                                                   s.n_kv_heads));
  }
  if (s.n_heads > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("attention: n_heads ", s.n_heads, " too large"));
  }
  if (s.capacity <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("attention: capacity ", s.capacity));
  }
  return absl::OkStatus();
}

bool Aligned16(const void* p) { return p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 == 0; }

absl::Status ValidatePointers(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs) {
    if (!Aligned16(p)) {
      return absl::InvalidArgumentError("attention: buffers must be non-null and 16-byte aligned");
    }
  }
  return absl::OkStatus();
}

// Splits per KV head (the grid's x extent); fixed by the shape so that the
// workspace size and a captured graph do not depend on the length.
int DecodeMaxSplits(const AttentionShape& s) {
  const int by_blocks = (kDecodeTargetBlocks + s.n_kv_heads - 1) / s.n_kv_heads;
  const int by_capacity = (s.capacity + kTileKeys - 1) / kTileKeys;
  return by_blocks < by_capacity ? by_blocks : by_capacity;
}

float ScaleLog2(int head_dim) { return kLog2e / std::sqrt(static_cast<float>(head_dim)); }

template <int kD>
absl::Status LaunchPrefillTyped(const bf16* q, const bf16* k_cache, const bf16* v_cache, int n,
                                int start_pos, const AttentionShape& shape, bf16* out,
                                cudaStream_t stream) {
  constexpr int kSmem = PrefillSmemBytes<kD>();
  CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      PrefillAttentionKernel<kD>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  const dim3 grid((n + kPrefillRows - 1) / kPrefillRows, shape.n_heads);
  PrefillAttentionKernel<kD><<<grid, kPrefillThreads, kSmem, stream>>>(
      q, k_cache, v_cache, n, start_pos, shape.n_heads, shape.n_heads / shape.n_kv_heads,
      shape.capacity, ScaleLog2(kD), out);
  CUDA_RETURN_IF_LAUNCH_FAILED("PrefillAttentionKernel");
  return absl::OkStatus();
}

// Whether the wgmma kernel runs on the current device: compute capability
// 9.0, and the binary holds sm_90a code for it (a build for other targets
// holds only the trapping stub, which the device would run as sm_8x code).
bool WgmmaDevice() {
  int device = 0;
  int major = 0;
  int minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess ||
      major != 9 || minor != 0) {
    return false;
  }
  cudaFuncAttributes attr{};
  return cudaFuncGetAttributes(&attr, PrefillWgmmaKernel<3>) == cudaSuccess &&
         attr.binaryVersion == 90;
}

template <int kStages>
absl::Status LaunchPrefillWgmma(const bf16* q, const bf16* k_cache, const bf16* v_cache, int n,
                                int start_pos, const AttentionShape& shape, bf16* out,
                                cudaStream_t stream) {
  constexpr int kSmem = WgmmaSmemBytes<kStages>();
  CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      PrefillWgmmaKernel<kStages>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  const dim3 grid((n + kWgmmaRows - 1) / kWgmmaRows, shape.n_heads);
  PrefillWgmmaKernel<kStages><<<grid, kWgmmaThreads, kSmem, stream>>>(
      q, k_cache, v_cache, n, start_pos, shape.n_heads, shape.n_heads / shape.n_kv_heads,
      shape.capacity, ScaleLog2(kWgmmaD), out);
  CUDA_RETURN_IF_LAUNCH_FAILED("PrefillWgmmaKernel");
  return absl::OkStatus();
}

template <int kD>
absl::Status LaunchDecodeTyped(const bf16* q, const bf16* k_cache, const bf16* v_cache,
                               const int32_t* length, const AttentionShape& shape,
                               void* workspace, bf16* out, cudaStream_t stream) {
  constexpr int kSmem = DecodeSmemBytes<kD>();
  const int max_splits = DecodeMaxSplits(shape);
  float* part_o = static_cast<float*>(workspace);
  float* part_ml = part_o + static_cast<size_t>(max_splits) * shape.n_heads * kD;
  CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      DecodeAttentionKernel<kD>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  const dim3 grid(max_splits, shape.n_kv_heads);
  DecodeAttentionKernel<kD><<<grid, kDecodeThreads, kSmem, stream>>>(
      q, k_cache, v_cache, length, shape.n_heads / shape.n_kv_heads, shape.capacity, max_splits,
      ScaleLog2(kD), part_o, part_ml);
  CUDA_RETURN_IF_LAUNCH_FAILED("DecodeAttentionKernel");
  DecodeCombineKernel<kD><<<shape.n_heads, kCombineThreads, 0, stream>>>(
      part_o, part_ml, length, shape.capacity, max_splits, out);
  CUDA_RETURN_IF_LAUNCH_FAILED("DecodeCombineKernel");
  return absl::OkStatus();
}

}  // namespace

absl::Status LaunchPrefillAttention(const __nv_bfloat16* q, const __nv_bfloat16* k_cache,
                                    const __nv_bfloat16* v_cache, int n, int start_pos,
                                    const AttentionShape& shape, __nv_bfloat16* out,
                                    cudaStream_t stream) {
  return LaunchPrefillAttentionWith(PrefillKernel::kAuto, q, k_cache, v_cache, n, start_pos, shape,
                                    out, stream);
}

bool PrefillKernelSupported(PrefillKernel kernel, const AttentionShape& shape) {
  switch (kernel) {
    case PrefillKernel::kAuto:
    case PrefillKernel::kMmaSync:
      return ValidateShape(shape).ok();
    case PrefillKernel::kWgmma:
    case PrefillKernel::kWgmmaTwoStage:
      return ValidateShape(shape).ok() && shape.head_dim == kWgmmaD && WgmmaDevice();
  }
  return false;
}

absl::Status LaunchPrefillAttentionWith(PrefillKernel kernel, const __nv_bfloat16* q,
                                        const __nv_bfloat16* k_cache,
                                        const __nv_bfloat16* v_cache, int n, int start_pos,
                                        const AttentionShape& shape, __nv_bfloat16* out,
                                        cudaStream_t stream) {
  if (absl::Status st = ValidateShape(shape); !st.ok()) return st;
  if (n < 0 || start_pos < 0 ||
      static_cast<int64_t>(start_pos) + n > static_cast<int64_t>(shape.capacity)) {
    return absl::InvalidArgumentError(absl::StrCat("prefill attention: rows [", start_pos, ", ",
                                                   static_cast<int64_t>(start_pos) + n,
                                                   ") outside capacity ", shape.capacity));
  }
  if (n == 0) return absl::OkStatus();
  if (absl::Status st = ValidatePointers({q, k_cache, v_cache, out}); !st.ok()) return st;
  if (kernel == PrefillKernel::kAuto) {
    kernel = kWgmmaByDefault && PrefillKernelSupported(PrefillKernel::kWgmma, shape)
                 ? PrefillKernel::kWgmma
                 : PrefillKernel::kMmaSync;
  }
  if (kernel == PrefillKernel::kWgmma || kernel == PrefillKernel::kWgmmaTwoStage) {
    if (!PrefillKernelSupported(kernel, shape)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "prefill attention: the wgmma kernel needs head_dim 128 (got ", shape.head_dim,
          ") and a compute capability 9.0 device"));
    }
    return kernel == PrefillKernel::kWgmma
               ? LaunchPrefillWgmma<3>(q, k_cache, v_cache, n, start_pos, shape, out, stream)
               : LaunchPrefillWgmma<2>(q, k_cache, v_cache, n, start_pos, shape, out, stream);
  }
  switch (shape.head_dim) {
    case 64:
      return LaunchPrefillTyped<64>(q, k_cache, v_cache, n, start_pos, shape, out, stream);
    case 128:
      return LaunchPrefillTyped<128>(q, k_cache, v_cache, n, start_pos, shape, out, stream);
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("prefill attention: head_dim ", shape.head_dim, " unsupported"));
  }
}

size_t DecodeAttentionWorkspaceBytes(const AttentionShape& shape) {
  if (!ValidateShape(shape).ok()) return 0;
  return static_cast<size_t>(DecodeMaxSplits(shape)) * shape.n_heads * (shape.head_dim + 2) *
         sizeof(float);
}

absl::Status LaunchDecodeAttention(const __nv_bfloat16* q, const __nv_bfloat16* k_cache,
                                   const __nv_bfloat16* v_cache, const int32_t* length,
                                   const AttentionShape& shape, void* workspace,
                                   __nv_bfloat16* out, cudaStream_t stream) {
  if (absl::Status st = ValidateShape(shape); !st.ok()) return st;
  const int group = shape.n_heads / shape.n_kv_heads;
  if (group > kDecodeRows) {
    return absl::InvalidArgumentError(absl::StrCat("decode attention: ", group,
                                                   " query heads per KV head (at most ",
                                                   kDecodeRows, ")"));
  }
  if (length == nullptr || reinterpret_cast<uintptr_t>(length) % alignof(int32_t) != 0) {
    return absl::InvalidArgumentError("decode attention: length must be a non-null int32 pointer");
  }
  if (absl::Status st = ValidatePointers({q, k_cache, v_cache, workspace, out}); !st.ok()) {
    return st;
  }
  switch (shape.head_dim) {
    case 64:
      return LaunchDecodeTyped<64>(q, k_cache, v_cache, length, shape, workspace, out, stream);
    case 128:
      return LaunchDecodeTyped<128>(q, k_cache, v_cache, length, shape, workspace, out, stream);
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("decode attention: head_dim ", shape.head_dim, " unsupported"));
  }
}

}  // namespace tailorkv::cuda
