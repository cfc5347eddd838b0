#include "cuda/sparse_kernels.cuh"

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "cuda/cuda_check.h"
#include "cuda/sparse_fp8_device.cuh"
#include "cuda/sparse_index_kernels.cuh"  // kSparseMaxChannels

namespace tailorkv::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBins = 2048;                       // 11-bit digits (the last pass uses 1024)
constexpr int kBinsPerThread = kBins / kThreads;  // the select scan's items
constexpr int kPasses = 3;                        // digits at bits [21,32), [10,21), [0,10)
constexpr int kWriteItems = 4;                    // compaction items per thread per tile

// Per row, in the workspace.
struct RowState {
  uint32_t prefix;  // key bits decided so far (after pass 3: the threshold key T)
  int32_t k_rem;    // of the elements matching prefix, how many are still to take
  int32_t k_eff;    // min(k, n)
  int32_t n;
};

size_t Align16(size_t b) { return (b + 15) / 16 * 16; }

// Blocks per row: enough to fill an H100 (~2 blocks per SM in all) at the
// largest n, at least 8192 elements each so small n pays no merge cost.
int BlocksPerRow(int rows, int n_max) {
  const int by_n = std::max(1, (n_max + 8191) / 8192);
  return std::max(1, std::min(by_n, std::max(1, 256 / rows)));
}

struct Workspace {
  RowState* state;    // [rows]
  uint32_t* hist;     // [rows][kPasses][kBins]
  uint32_t* counter;  // [rows][4]: blocks done per pass
  uint2* counts;      // [rows][bpr]: (greater than T, equal to T) per block
};

Workspace Carve(void* base, int rows, int bpr) {
  char* p = static_cast<char*>(base);
  Workspace w;
  w.state = reinterpret_cast<RowState*>(p);
  p += Align16(sizeof(RowState) * rows);
  w.hist = reinterpret_cast<uint32_t*>(p);
  p += Align16(sizeof(uint32_t) * rows * kPasses * kBins);
  w.counter = reinterpret_cast<uint32_t*>(p);
  p += Align16(sizeof(uint32_t) * rows * 4);
  w.counts = reinterpret_cast<uint2*>(p);
  return w;
}

__device__ __forceinline__ uint32_t Key(float x) {
  const uint32_t bits = __float_as_uint(x);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0;  // NaN ranks lowest
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ int ReadN(const int32_t* n_device, int n_max) {
  if (n_device == nullptr) return n_max;
  return min(max(*n_device, 0), n_max);
}

// This block's contiguous slice [lo, hi) of the row's n elements.
__device__ __forceinline__ void Slice(int n, int& lo, int& hi) {
  const int chunk = (n + gridDim.x - 1) / gridDim.x;
  lo = min(n, static_cast<int>(blockIdx.x) * chunk);
  hi = min(n, lo + chunk);
}

__global__ void TopKInitKernel(const int32_t* n_device, int n_max, int k, Workspace ws,
                               int32_t* out) {
  const int row = blockIdx.x;
  const int n = ReadN(n_device, n_max);
  const int k_eff = min(k, n);
  for (int i = threadIdx.x; i < kPasses * kBins; i += blockDim.x) {
    ws.hist[static_cast<size_t>(row) * kPasses * kBins + i] = 0;
  }
  if (threadIdx.x < 4) ws.counter[row * 4 + threadIdx.x] = 0;
  if (threadIdx.x == 0) ws.state[row] = RowState{0u, k_eff, k_eff, n};
  for (int i = k_eff + threadIdx.x; i < k; i += blockDim.x) out[static_cast<size_t>(row) * k + i] = -1;
}

// One radix pass: histogram of the digit at [SHIFT, SHIFT + BITS) over the
// elements whose higher bits equal the prefix found so far; the row's last
// block picks the digit holding the k_rem-th largest and updates the state.
template <int SHIFT, int BITS>
__global__ void __launch_bounds__(kThreads) TopKHistKernel(const float* scores, int64_t row_stride,
                                                           Workspace ws, int pass) {
  __shared__ uint32_t sh[kBins];
  __shared__ bool is_last;
  const int row = blockIdx.y;
  RowState st = ws.state[row];
  if (st.k_eff == 0) return;  // uniform across the row's blocks
  constexpr uint32_t kHiMask = SHIFT + BITS >= 32 ? 0u : ~((1u << (SHIFT + BITS)) - 1u);
  constexpr uint32_t kDigitMask = (1u << BITS) - 1u;
  for (int i = threadIdx.x; i < kBins; i += kThreads) sh[i] = 0;
  __syncthreads();
  int lo, hi;
  Slice(st.n, lo, hi);
  const float* s = scores + row * row_stride;
  int i = lo + threadIdx.x;
  for (; i + 3 * kThreads < hi; i += 4 * kThreads) {
    float v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = s[i + u * kThreads];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const uint32_t key = Key(v[u]);
      if ((key & kHiMask) == st.prefix) atomicAdd(&sh[(key >> SHIFT) & kDigitMask], 1u);
    }
  }
  for (; i < hi; i += kThreads) {
    const uint32_t key = Key(s[i]);
    if ((key & kHiMask) == st.prefix) atomicAdd(&sh[(key >> SHIFT) & kDigitMask], 1u);
  }
  __syncthreads();
  uint32_t* gh = ws.hist + (static_cast<size_t>(row) * kPasses + pass) * kBins;
  for (int b = threadIdx.x; b < kBins; b += kThreads) {
    if (sh[b] != 0) atomicAdd(&gh[b], sh[b]);
  }
  __threadfence();  // our histogram is visible before we count ourselves done
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(&ws.counter[row * 4 + pass], 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();

  // Last block: digits in descending order, kBinsPerThread consecutive per
  // thread; the exclusive scan gives the count above each thread's digits.
  using Scan = cub::BlockScan<uint32_t, kThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  uint32_t c[kBinsPerThread];
  uint32_t local = 0;
#pragma unroll
  for (int j = 0; j < kBinsPerThread; ++j) {
    c[j] = __ldcg(&gh[kBins - 1 - (threadIdx.x * kBinsPerThread + j)]);
    local += c[j];
  }
  uint32_t above;
  Scan(scan_tmp).ExclusiveSum(local, above);
  const uint32_t want = static_cast<uint32_t>(st.k_rem);
  if (above < want && want <= above + local) {
#pragma unroll
    for (int j = 0; j < kBinsPerThread; ++j) {
      if (above < want && want <= above + c[j]) {
        const uint32_t digit = kBins - 1 - (threadIdx.x * kBinsPerThread + j);
        ws.state[row].prefix = st.prefix | (digit << SHIFT);
        ws.state[row].k_rem = static_cast<int32_t>(want - above);
      }
      above += c[j];
    }
  }
}

// Per block: elements greater than and equal to the threshold key T.
__global__ void __launch_bounds__(kThreads) TopKCountKernel(const float* scores,
                                                            int64_t row_stride, Workspace ws) {
  const int row = blockIdx.y;
  const RowState st = ws.state[row];
  if (st.k_eff == 0) return;
  int lo, hi;
  Slice(st.n, lo, hi);
  const float* s = scores + row * row_stride;
  uint32_t gt = 0, eq = 0;
  for (int i = lo + threadIdx.x; i < hi; i += kThreads) {
    const uint32_t key = Key(s[i]);
    gt += key > st.prefix;
    eq += key == st.prefix;
  }
  using Reduce = cub::BlockReduce<uint32_t, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  gt = Reduce(tmp).Sum(gt);
  __syncthreads();
  eq = Reduce(tmp).Sum(eq);
  if (threadIdx.x == 0) ws.counts[static_cast<size_t>(row) * gridDim.x + blockIdx.x] = make_uint2(gt, eq);
}

// Ordered compaction: element i is taken when key > T, or key == T and fewer
// than `need` ties precede it; its output slot is (greater before i) +
// min(ties before i, need), so the output is ascending by index.
__global__ void __launch_bounds__(kThreads) TopKWriteKernel(const float* scores,
                                                            int64_t row_stride, int k,
                                                            Workspace ws, int32_t* out) {
  const int row = blockIdx.y;
  const RowState st = ws.state[row];
  if (st.k_eff == 0) return;
  const uint32_t t = st.prefix;
  const uint64_t need = static_cast<uint32_t>(st.k_rem);
  uint64_t gt_before = 0, eq_before = 0;
  const uint2* counts = ws.counts + static_cast<size_t>(row) * gridDim.x;
  for (int b = 0; b < static_cast<int>(blockIdx.x); ++b) {  // few blocks per row: a short loop
    const uint2 c = counts[b];
    gt_before += c.x;
    eq_before += c.y;
  }
  int lo, hi;
  Slice(st.n, lo, hi);
  const float* s = scores + row * row_stride;
  int32_t* o = out + static_cast<size_t>(row) * k;
  using Scan = cub::BlockScan<unsigned long long, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  for (int base = lo; base < hi; base += kThreads * kWriteItems) {
    unsigned long long flag[kWriteItems], excl[kWriteItems];
#pragma unroll
    for (int j = 0; j < kWriteItems; ++j) {
      const int i = base + threadIdx.x * kWriteItems + j;
      flag[j] = 0;
      if (i < hi) {
        const uint32_t key = Key(s[i]);
        flag[j] = key > t ? (1ull << 32) : (key == t ? 1ull : 0ull);
      }
    }
    unsigned long long total;
    Scan(tmp).ExclusiveSum(flag, excl, total);
#pragma unroll
    for (int j = 0; j < kWriteItems; ++j) {
      const int i = base + threadIdx.x * kWriteItems + j;
      const uint64_t g = gt_before + (excl[j] >> 32);
      const uint64_t e = eq_before + (excl[j] & 0xFFFFFFFFull);
      if (flag[j] >> 32) {
        o[g + min(e, need)] = i;
      } else if (flag[j] != 0 && e < need) {
        o[g + e] = i;
      }
    }
    gt_before += total >> 32;
    eq_before += total & 0xFFFFFFFFull;
    __syncthreads();  // tmp is reused by the next tile's scan
  }
}

// ---- Chunked Top-K (k <= kChunkedMaxK): two launches ----
// Stage 1, grid (chunks, rows): each block holds a chunk of C = threads x
// kChunkItems scores in registers as keys, finds its exact top-min(k, len)
// (radix select in shared memory) and writes them to the row's candidate
// list in index order. Every full chunk writes exactly min(k, C), so the
// candidates of a row are contiguous and ordered by index. Stage 2, one
// block per row: the same radix select over the row's candidates (cached in
// shared memory), then an ordered compaction, which is already ascending
// by index. Exact: an element of the row's top-k is in its chunk's top-k.
constexpr int kChunkItems = 16;       // keys per thread in stage 1
constexpr int kMergeThreads = 1024;   // stage 2 block
constexpr int kMergeCap = 32768;      // candidates per row stage 2 holds (128 KB of shared memory)
constexpr int kMergeTarget = 8192;    // prefer the smallest chunk with at most this many candidates
constexpr int kChunkedMaxK = 1024;
constexpr int kChunkThreadOptions[] = {256, 512, 1024};  // chunks of 4096, 8192, 16384 scores

// Programmatic dependent launch (sm_90+): stage 1 lets stage 2 be launched
// once all its blocks run; stage 2 waits here for stage 1 to complete and
// its writes to be visible. Both are no-ops without the launch attribute.
__device__ __forceinline__ void AllowDependentLaunch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void WaitForPrimaryGrid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Threshold of a radix select: the selection is every key whose bits under
// mask exceed prefix, plus the first `need` (by position) of those equal.
struct Threshold {
  uint32_t prefix, mask, need;
};

template <int T>
struct SelectShared {
  typename cub::BlockScan<uint32_t, T, cub::BLOCK_SCAN_WARP_SCANS>::TempStorage scan;
  uint32_t hist[kBins];
  uint32_t prefix, k_rem, count;
};

// Exact radix select of the `want` largest keys (1 <= want <= number of
// keys) over the keys for_each(f) passes to f in each thread. Digits of 11,
// 11 and 10 bits; stops early when the digit's whole bucket is taken. One
// shared histogram: 8-bit digits counted into 32 lane-private copies (no
// colliding atomics where scores share sign and exponent) ran slower on an
// H100 (8 x 128k, k = 128: 22.7 us against 19.7; 8 x 1M: 88 against 68), so
// atomic contention is not what limits this path.
template <int T, typename ForEach>
__device__ Threshold RadixSelect(uint32_t want, SelectShared<T>& sh, ForEach for_each) {
  constexpr int kPerThread = kBins / T;
  using Scan = cub::BlockScan<uint32_t, T, cub::BLOCK_SCAN_WARP_SCANS>;
  uint32_t prefix = 0, mask = 0, k_rem = want;
#pragma unroll 1
  for (int pass = 0; pass < kPasses; ++pass) {
    const int shift = pass == 0 ? 21 : (pass == 1 ? 10 : 0);
    const uint32_t digit_mask = pass == 2 ? 0x3FFu : 0x7FFu;
    for (int b = threadIdx.x; b < kBins; b += T) sh.hist[b] = 0;
    __syncthreads();
    for_each([&](uint32_t key) {
      if ((key & mask) == prefix) atomicAdd(&sh.hist[(key >> shift) & digit_mask], 1u);
    });
    __syncthreads();
    // Digits descending, kPerThread consecutive per thread.
    uint32_t c[kPerThread];
    uint32_t local = 0;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      c[j] = sh.hist[kBins - 1 - (threadIdx.x * kPerThread + j)];
      local += c[j];
    }
    uint32_t above;
    Scan(sh.scan).ExclusiveSum(local, above);
    if (above < k_rem && k_rem <= above + local) {
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        if (above < k_rem && k_rem <= above + c[j]) {
          const uint32_t digit = kBins - 1 - (threadIdx.x * kPerThread + j);
          sh.prefix = prefix | (digit << shift);
          sh.k_rem = k_rem - above;
          sh.count = c[j];
        }
        above += c[j];
      }
    }
    __syncthreads();
    prefix = sh.prefix;
    k_rem = sh.k_rem;
    mask |= digit_mask << shift;
    if (sh.count == k_rem) break;  // the whole bucket is taken: no ties to split
  }
  return Threshold{prefix, mask, k_rem};
}

// Ordered compaction over a warp-striped arrangement: warp w's item j of
// lane l sits at position (w * items + j) * 32 + l, so positions order as
// (warp, item, lane). Calls emit(position, slot, key) for each selected
// item, slot = its rank among the selected by position. kItems > 0 fixes
// items at compile time (the keys then stay in registers).
template <int T, int kItems, typename KeyAt, typename Emit>
__device__ void OrderedCompact(const Threshold& th, int items, int count, uint32_t* warp_gt,
                               uint32_t* warp_eq, KeyAt key_at, Emit emit) {
  if (kItems > 0) items = kItems;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint32_t g = 0, e = 0;
#pragma unroll
  for (int j = 0; j < items; ++j) {
    const int p = (warp * items + j) * 32 + lane;
    const bool valid = p < count;
    const uint32_t m = valid ? key_at(j, p) & th.mask : 0u;
    g += __popc(__ballot_sync(0xFFFFFFFFu, valid && m > th.prefix));
    e += __popc(__ballot_sync(0xFFFFFFFFu, valid && m == th.prefix));
  }
  if (lane == 0) {
    warp_gt[warp] = g;
    warp_eq[warp] = e;
  }
  __syncthreads();
  g = 0;
  e = 0;
  for (int w = 0; w < warp; ++w) {
    g += warp_gt[w];
    e += warp_eq[w];
  }
  const uint32_t lt = (1u << lane) - 1u;
#pragma unroll
  for (int j = 0; j < items; ++j) {
    const int p = (warp * items + j) * 32 + lane;
    const bool valid = p < count;
    const uint32_t key = valid ? key_at(j, p) : 0u;
    const uint32_t m = key & th.mask;
    const bool is_gt = valid && m > th.prefix, is_eq = valid && m == th.prefix;
    const uint32_t bg = __ballot_sync(0xFFFFFFFFu, is_gt), be = __ballot_sync(0xFFFFFFFFu, is_eq);
    const uint32_t my_g = g + __popc(bg & lt), my_e = e + __popc(be & lt);
    if (is_gt) {
      emit(p, my_g + min(my_e, th.need), key);
    } else if (is_eq && my_e < th.need) {
      emit(p, my_g + my_e, key);
    }
    g += __popc(bg);
    e += __popc(be);
  }
}

// Where stage 1 reads a row's keys: scores in memory, or (LaunchScoreFp8TopK)
// scores computed from the FP8 index as they are read, never stored.
// Prepare stages what every key of the row needs in shared memory (`sq`,
// kSparseMaxChannels floats; the kernel syncs after it).
struct ScoreKeys {
  const float* scores;
  int64_t row_stride;
  __device__ void Prepare(int, float*) const {}
  __device__ uint32_t operator()(int row, int i, const float*) const {
    return Key(scores[row * row_stride + i]);
  }
};
template <int kChunks>  // d = 16 * kChunks channels
struct Fp8IndexKeys {
  const float* q_chan;
  const uint8_t* index;  // 16-byte aligned
  int64_t index_rows;
  int first;
  __device__ void Prepare(int row, float* sq) const {
    if (threadIdx.x < 16 * kChunks) sq[threadIdx.x] = q_chan[row * 16 * kChunks + threadIdx.x];
  }
  __device__ uint32_t operator()(int row, int i, const float* sq) const {
    const int64_t r = static_cast<int64_t>(row) * index_rows + first + i;
    return Key(Fp8IndexDot<kChunks>(sq, reinterpret_cast<const uint4*>(index + r * 16 * kChunks)));
  }
};

// cand_key / cand_idx: [rows][cand_stride]. Chunk b of a row writes its
// top-min(k, len) at b * min(k, C), ascending by index; chunks at or past n
// (read from the device) do nothing.
template <int T, typename Keys>
__global__ void __launch_bounds__(T) TopKChunkKernel(Keys keys, int n_max,
                                                     const int32_t* n_device, int k,
                                                     uint32_t* __restrict__ cand_key,
                                                     int32_t* __restrict__ cand_idx,
                                                     int64_t cand_stride) {
  constexpr int kChunk = T * kChunkItems;
  __shared__ SelectShared<T> sh;
  __shared__ uint32_t warp_gt[T / 32], warp_eq[T / 32];
  __shared__ float sq[kSparseMaxChannels];
  AllowDependentLaunch();
  const int n = ReadN(n_device, n_max);
  const int row = blockIdx.y;
  const int lo = blockIdx.x * kChunk;
  if (lo >= n) return;
  const int len = min(kChunk, n - lo);
  const int kk = min(k, len);
  keys.Prepare(row, sq);
  __syncthreads();
  const int64_t out_at = row * cand_stride + static_cast<int64_t>(blockIdx.x) * min(k, kChunk);
  uint32_t* ok = cand_key + out_at;
  int32_t* oi = cand_idx + out_at;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int base = warp * kChunkItems * 32 + lane;  // item j at base + 32 j: coalesced loads
  uint32_t key[kChunkItems];
#pragma unroll
  for (int j = 0; j < kChunkItems; ++j) {
    const int p = base + 32 * j;
    key[j] = p < len ? keys(row, lo + p, sq) : 0u;
  }
  if (kk == len) {  // the chunk is all taken (block-uniform)
#pragma unroll
    for (int j = 0; j < kChunkItems; ++j) {
      const int p = base + 32 * j;
      if (p < len) {
        ok[p] = key[j];
        oi[p] = lo + p;
      }
    }
    return;
  }
  const Threshold th = RadixSelect<T>(static_cast<uint32_t>(kk), sh, [&](auto f) {
#pragma unroll
    for (int j = 0; j < kChunkItems; ++j) {
      if (base + 32 * j < len) f(key[j]);
    }
  });
  OrderedCompact<T, kChunkItems>(
      th, kChunkItems, len, warp_gt, warp_eq, [&](int j, int) { return key[j]; },
      [&](int p, uint32_t slot, uint32_t v) {
        ok[slot] = v;
        oi[slot] = lo + p;
      });
}

// One block per row: the top-min(k, n) of the row's candidates, ascending,
// to out[row][0, min(k, n)), then -1 up to k. Candidate keys are cached in
// dynamic shared memory (kMergeCap keys at most).
__global__ void __launch_bounds__(kMergeThreads) TopKMergeKernel(
    int n_max, const int32_t* n_device, int k, int chunk, const uint32_t* __restrict__ cand_key,
    const int32_t* __restrict__ cand_idx, int64_t cand_stride, int32_t* __restrict__ out) {
  extern __shared__ uint32_t skey[];
  __shared__ SelectShared<kMergeThreads> sh;
  __shared__ uint32_t warp_gt[kMergeThreads / 32], warp_eq[kMergeThreads / 32];
  WaitForPrimaryGrid();  // everything below may depend on stage 1 or what preceded it
  const int n = ReadN(n_device, n_max);
  const int row = blockIdx.x;
  const int k_eff = min(k, n);
  int32_t* o = out + static_cast<int64_t>(row) * k;
  for (int i = k_eff + threadIdx.x; i < k; i += kMergeThreads) o[i] = -1;
  if (k_eff == 0) return;
  const int nb = (n + chunk - 1) / chunk;
  const int m = (nb - 1) * min(k, chunk) + min(k, n - (nb - 1) * chunk);
  const uint32_t* ck = cand_key + row * cand_stride;
  const int32_t* ci = cand_idx + row * cand_stride;
  if (m == k_eff) {  // every candidate is taken (n <= chunk)
    for (int i = threadIdx.x; i < m; i += kMergeThreads) o[i] = ci[i];
    return;
  }
  for (int i = threadIdx.x; i < m; i += kMergeThreads) skey[i] = ck[i];
  __syncthreads();
  const int items = (m + kMergeThreads - 1) / kMergeThreads;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const Threshold th = RadixSelect<kMergeThreads>(static_cast<uint32_t>(k_eff), sh, [&](auto f) {
    for (int j = 0; j < items; ++j) {
      const int p = (warp * items + j) * 32 + lane;
      if (p < m) f(skey[p]);
    }
  });
  OrderedCompact<kMergeThreads, 0>(
      th, items, m, warp_gt, warp_eq, [&](int, int p) { return skey[p]; },
      [&](int p, uint32_t slot, uint32_t) { o[slot] = ci[p]; });
}

// Stage-1 threads for (n_max, k), 0 when the chunked path does not apply:
// the smallest chunk whose candidates stay under kMergeTarget, else under
// kMergeCap.
int64_t Candidates(int n_max, int k, int threads) {
  const int64_t c = static_cast<int64_t>(threads) * kChunkItems;
  return (n_max + c - 1) / c * std::min<int64_t>(k, c);
}

int ChunkThreads(int n_max, int k, int forced = 0) {
  if (n_max < 1 || k < 1 || k > kChunkedMaxK) return 0;
  if (forced != 0) {
    for (const int t : kChunkThreadOptions) {
      if (t == forced && Candidates(n_max, k, t) <= kMergeCap) return t;
    }
    return 0;
  }
  for (const int limit : {kMergeTarget, kMergeCap}) {
    for (const int t : kChunkThreadOptions) {
      if (Candidates(n_max, k, t) <= limit) return t;
    }
  }
  return 0;
}

// Candidates per row in the workspace: at most min(n, kMergeCap).
int64_t CandStride(int n_max) { return (std::min(std::max(n_max, 1), kMergeCap) + 3) / 4 * 4; }

size_t ChunkedWorkspaceBytes(int rows, int n_max) {
  return 2 * Align16(sizeof(uint32_t) * static_cast<size_t>(rows) * CandStride(n_max));
}

constexpr int kGatherUnroll = 8;  // 16-byte loads in flight per thread

__global__ void __launch_bounds__(kThreads) GatherKernel(const uint4* __restrict__ src,
                                                         int64_t head_stride16, int64_t src_rows,
                                                         int chunks, const int32_t* __restrict__ idx,
                                                         int count, int64_t total,
                                                         uint4* __restrict__ dst) {
  // Item = 16 bytes of a destination row; consecutive threads take
  // consecutive items (coalesced within a row), each thread kGatherUnroll
  // items a grid apart with all loads issued before the stores. Small
  // gathers spread over many SMs (one item per thread), large ones keep
  // kGatherUnroll loads in flight per thread.
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; base < total;
       base += nthreads * kGatherUnroll) {
    uint4 v[kGatherUnroll];
    bool ok[kGatherUnroll];
#pragma unroll
    for (int u = 0; u < kGatherUnroll; ++u) {
      const int64_t item = base + u * nthreads;
      ok[u] = false;
      if (item < total) {
        const int64_t r = item / chunks;  // destination row = head * count + i
        const int c = static_cast<int>(item - r * chunks);
        const int64_t j = idx[r];
        if (j >= 0 && j < src_rows) {
          const int64_t h = r / count;
          v[u] = src[h * head_stride16 + j * chunks + c];
          ok[u] = true;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kGatherUnroll; ++u) {
      if (ok[u]) dst[base + u * nthreads] = v[u];
    }
  }
}

__global__ void __launch_bounds__(kThreads) MapThroughPoolKernel(const int32_t* __restrict__ idx, int k,
                                                                 const int32_t* __restrict__ pool,
                                                                 int n_pool, int64_t total,
                                                                 int32_t* __restrict__ out) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (t >= total) return;
  const int64_t r = t / k;
  const int32_t j = idx[t];
  out[t] = (j >= 0 && j < n_pool) ? pool[r * n_pool + j] : -1;
}

size_t RadixWorkspaceBytes(int rows, int n_max) {
  const int bpr = BlocksPerRow(rows, std::max(n_max, 0));
  return Align16(sizeof(RowState) * rows) + Align16(sizeof(uint32_t) * rows * kPasses * kBins) +
         Align16(sizeof(uint32_t) * rows * 4) + Align16(sizeof(uint2) * rows * bpr);
}

absl::Status ValidateTopK(const float* scores, int64_t row_stride, int rows, int n_max, int k,
                          int32_t* out, void* workspace, size_t workspace_bytes) {
  if (rows < 1 || rows > 65535) return absl::InvalidArgumentError(absl::StrCat("LaunchTopK: rows = ", rows, " outside [1, 65535]"));
  if (n_max < 0 || n_max > kTopKMaxN) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchTopK: n_max = ", n_max, " outside [0, ", kTopKMaxN, "]"));
  }
  if (row_stride < n_max) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchTopK: row_stride = ", row_stride, " < n_max = ", n_max));
  }
  if (k < 0 || k > kTopKMaxK) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchTopK: k = ", k, " outside [0, ", kTopKMaxK, "]"));
  }
  if (k == 0) return absl::OkStatus();
  if (out == nullptr) return absl::InvalidArgumentError("LaunchTopK: out is null");
  if (scores == nullptr && n_max > 0) return absl::InvalidArgumentError("LaunchTopK: scores is null");
  if (workspace == nullptr) return absl::InvalidArgumentError("LaunchTopK: workspace is null");
  const size_t need = TopKWorkspaceBytes(rows, n_max);
  if (workspace_bytes < need) {
    return absl::InvalidArgumentError(
        absl::StrCat("LaunchTopK: workspace_bytes = ", workspace_bytes, " < ", need));
  }
  return absl::OkStatus();
}

absl::Status LaunchRadix(const float* scores, int64_t row_stride, int rows, int n_max,
                         const int32_t* n_device, int k, int32_t* out, void* workspace,
                         cudaStream_t stream) {
  const int bpr = BlocksPerRow(rows, n_max);
  const Workspace ws = Carve(workspace, rows, bpr);
  const dim3 grid(bpr, rows);
  TopKInitKernel<<<rows, kThreads, 0, stream>>>(n_device, n_max, k, ws, out);
  CUDA_RETURN_IF_LAUNCH_FAILED("TopKInitKernel");
  if (n_max == 0) return absl::OkStatus();
  TopKHistKernel<21, 11><<<grid, kThreads, 0, stream>>>(scores, row_stride, ws, 0);
  CUDA_RETURN_IF_LAUNCH_FAILED("TopKHistKernel");
  TopKHistKernel<10, 11><<<grid, kThreads, 0, stream>>>(scores, row_stride, ws, 1);
  CUDA_RETURN_IF_LAUNCH_FAILED("TopKHistKernel");
  TopKHistKernel<0, 10><<<grid, kThreads, 0, stream>>>(scores, row_stride, ws, 2);
  CUDA_RETURN_IF_LAUNCH_FAILED("TopKHistKernel");
  TopKCountKernel<<<grid, kThreads, 0, stream>>>(scores, row_stride, ws);
  CUDA_RETURN_IF_LAUNCH_FAILED("TopKCountKernel");
  TopKWriteKernel<<<grid, kThreads, 0, stream>>>(scores, row_stride, k, ws, out);
  CUDA_RETURN_IF_LAUNCH_FAILED("TopKWriteKernel");
  return absl::OkStatus();
}

template <int T, typename Keys>
absl::Status LaunchChunk(const Keys& keys, int rows, int n_max,
                         const int32_t* n_device, int k, uint32_t* cand_key, int32_t* cand_idx,
                         int64_t cand_stride, cudaStream_t stream) {
  constexpr int kChunk = T * kChunkItems;
  const dim3 grid((n_max + kChunk - 1) / kChunk, rows);
  TopKChunkKernel<T, Keys><<<grid, T, 0, stream>>>(keys, n_max, n_device, k, cand_key, cand_idx,
                                                   cand_stride);
  CUDA_RETURN_IF_LAUNCH_FAILED("TopKChunkKernel");
  return absl::OkStatus();
}

template <typename Keys>
absl::Status LaunchChunked(int threads, const Keys& keys, int rows,
                           int n_max, const int32_t* n_device, int k, int32_t* out,
                           void* workspace, bool programmatic, cudaStream_t stream) {
  const int64_t cand_stride = CandStride(n_max);
  auto* cand_key = static_cast<uint32_t*>(workspace);
  auto* cand_idx = reinterpret_cast<int32_t*>(
      static_cast<char*>(workspace) + Align16(sizeof(uint32_t) * static_cast<size_t>(rows) * cand_stride));
  switch (threads) {
    case 256:
      RETURN_IF_ERROR(LaunchChunk<256>(keys, rows, n_max, n_device, k, cand_key,
                                       cand_idx, cand_stride, stream));
      break;
    case 512:
      RETURN_IF_ERROR(LaunchChunk<512>(keys, rows, n_max, n_device, k, cand_key,
                                       cand_idx, cand_stride, stream));
      break;
    case 1024:
      RETURN_IF_ERROR(LaunchChunk<1024>(keys, rows, n_max, n_device, k, cand_key,
                                        cand_idx, cand_stride, stream));
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat("LaunchTopK: no chunk of ", threads, " threads"));
  }
  const int chunk = threads * kChunkItems;
  const int64_t max_cands =
      std::min<int64_t>(static_cast<int64_t>((n_max + chunk - 1) / chunk) * std::min(k, chunk), cand_stride);
  const int smem = static_cast<int>(sizeof(uint32_t) * max_cands);
  // Above 48 KB of shared memory a kernel must opt in; a host-side setting,
  // allowed while a stream is being captured.
  CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(TopKMergeKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(sizeof(uint32_t) * kMergeCap)));
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(rows);
  cfg.blockDim = dim3(kMergeThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  // Stage 2's blocks wait on their SMs once stage 1 has started everywhere:
  // only when stage 1 fits in half the GPU's threads, so that waiting never
  // takes room from stage 1 (at 8 x 1M, two waves, it cost 7 us).
  const int64_t stage1_threads = static_cast<int64_t>((n_max + chunk - 1) / chunk) * rows * threads;
  cfg.numAttrs = programmatic && stage1_threads <= static_cast<int64_t>(DeviceSmCount()) * 1024 ? 1 : 0;
  CUDA_RETURN_IF_ERROR(cudaLaunchKernelEx(&cfg, TopKMergeKernel, n_max, n_device, k, chunk,
                                          static_cast<const uint32_t*>(cand_key),
                                          static_cast<const int32_t*>(cand_idx), cand_stride, out));
  return absl::OkStatus();
}

}  // namespace

size_t TopKWorkspaceBytes(int rows, int n_max) {
  rows = std::max(rows, 1);
  return std::max(RadixWorkspaceBytes(rows, n_max), ChunkedWorkspaceBytes(rows, n_max));
}

bool TopKUsesChunkedPath(int n_max, int k) { return ChunkThreads(n_max, k) != 0; }

absl::Status LaunchTopK(const float* scores, int64_t row_stride, int rows, int n_max,
                        const int32_t* n_device, int k, int32_t* out, void* workspace,
                        size_t workspace_bytes, cudaStream_t stream, const TopKOptions& options) {
  RETURN_IF_ERROR(ValidateTopK(scores, row_stride, rows, n_max, k, out, workspace, workspace_bytes));
  if (k == 0) return absl::OkStatus();
  const int threads = options.radix_only ? 0 : ChunkThreads(n_max, k, options.chunk_threads);
  if (threads != 0) {
    return LaunchChunked(threads, ScoreKeys{scores, row_stride}, rows, n_max, n_device, k, out,
                         workspace, options.programmatic_launch, stream);
  }
  return LaunchRadix(scores, row_stride, rows, n_max, n_device, k, out, workspace, stream);
}

absl::Status LaunchTopK(const float* scores, int64_t row_stride, int rows, int n_max,
                        const int32_t* n_device, int k, int32_t* out, void* workspace,
                        size_t workspace_bytes, cudaStream_t stream) {
  return LaunchTopK(scores, row_stride, rows, n_max, n_device, k, out, workspace, workspace_bytes,
                    stream, TopKOptions{});
}

absl::Status LaunchMapThroughPool(const int32_t* idx, int k, const int32_t* pool, int n_pool,
                                  int rows, int32_t* out, cudaStream_t stream) {
  constexpr const char* kFn = "LaunchMapThroughPool: ";
  if (rows < 1) return absl::InvalidArgumentError(absl::StrCat(kFn, "rows = ", rows, " < 1"));
  if (k < 0) return absl::InvalidArgumentError(absl::StrCat(kFn, "k = ", k, " < 0"));
  if (n_pool < 0) return absl::InvalidArgumentError(absl::StrCat(kFn, "n_pool = ", n_pool, " < 0"));
  if (k == 0) return absl::OkStatus();
  if (idx == nullptr) return absl::InvalidArgumentError(absl::StrCat(kFn, "idx is null"));
  if (pool == nullptr && n_pool > 0) return absl::InvalidArgumentError(absl::StrCat(kFn, "pool is null"));
  if (out == nullptr) return absl::InvalidArgumentError(absl::StrCat(kFn, "out is null"));
  const int64_t total = static_cast<int64_t>(rows) * k;
  MapThroughPoolKernel<<<static_cast<unsigned>((total + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      idx, k, pool, n_pool, total, out);
  CUDA_RETURN_IF_LAUNCH_FAILED("MapThroughPoolKernel");
  return absl::OkStatus();
}

absl::Status LaunchGatherRows(const void* src, int64_t src_head_stride, int64_t src_rows,
                              int64_t row_bytes, const int32_t* idx, int count, int heads,
                              void* dst, cudaStream_t stream) {
  if (row_bytes <= 0 || row_bytes % 16 != 0 || row_bytes / 16 > (1 << 30)) {
    return absl::InvalidArgumentError(
        absl::StrCat("LaunchGatherRows: row_bytes = ", row_bytes, " is not a positive multiple of 16"));
  }
  if (heads < 1) return absl::InvalidArgumentError(absl::StrCat("LaunchGatherRows: heads = ", heads, " < 1"));
  if (count < 0) return absl::InvalidArgumentError(absl::StrCat("LaunchGatherRows: count = ", count, " < 0"));
  if (src_rows < 0) return absl::InvalidArgumentError(absl::StrCat("LaunchGatherRows: src_rows = ", src_rows, " < 0"));
  if (src_head_stride % 16 != 0 || (heads > 1 && src_head_stride < 0)) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchGatherRows: src_head_stride = ", src_head_stride,
                                                   " is not a non-negative multiple of 16"));
  }
  if (count == 0) return absl::OkStatus();
  if (src == nullptr || idx == nullptr || dst == nullptr) {
    return absl::InvalidArgumentError("LaunchGatherRows: src, idx and dst must be non-null");
  }
  if (reinterpret_cast<uintptr_t>(src) % 16 != 0 || reinterpret_cast<uintptr_t>(dst) % 16 != 0) {
    return absl::InvalidArgumentError("LaunchGatherRows: src and dst must be 16-byte aligned");
  }
  const int sms = DeviceSmCount();
  const int chunks = static_cast<int>(row_bytes / 16);
  const int64_t total = static_cast<int64_t>(heads) * count * chunks;
  // Grid, from two H100 runs (docs/results/sparse-h100-2026-11-22-v1, -v2):
  // one block per kThreads * kGatherUnroll items (v1, items block-local) ran
  // 8 x 896 x 256 B rows in 86 us, one item per thread (v2) in 150 us; but v1
  // left a decode-sized 8 x 128 x 256 B gather on 8 SMs: 20.6 us vs 14.8 with
  // v2's 64 blocks. So v1's block count, at least 64 blocks (this
  // combination is not measured yet).
  const int64_t per_block = static_cast<int64_t>(kThreads) * kGatherUnroll;
  const int64_t want = std::max<int64_t>((total + per_block - 1) / per_block,
                                         std::min<int64_t>((total + kThreads - 1) / kThreads, 64));
  const int blocks = static_cast<int>(std::min<int64_t>(want, sms * 8));
  GatherKernel<<<blocks, kThreads, 0, stream>>>(static_cast<const uint4*>(src), src_head_stride / 16,
                                                src_rows, chunks, idx, count, total,
                                                static_cast<uint4*>(dst));
  CUDA_RETURN_IF_LAUNCH_FAILED("GatherKernel");
  return absl::OkStatus();
}

}  // namespace tailorkv::cuda

namespace tailorkv::cuda {

bool ScoreFp8TopKApplies(int n_max, int k, int d) {
  return (d == 16 || d == 32 || d == 64) && d <= kSparseMaxChannels && ChunkThreads(n_max, k) != 0;
}

absl::Status LaunchScoreFp8TopK(const float* q_chan, const uint8_t* index, int64_t index_rows, int d,
                                int rows, int first, int n_max, int k, int32_t* out, void* workspace,
                                size_t workspace_bytes, cudaStream_t stream, int chunk_threads) {
  constexpr const char* kFn = "LaunchScoreFp8TopK";
  // The Top-K's own checks (scores: the index stands in for them).
  if (absl::Status s = ValidateTopK(reinterpret_cast<const float*>(index), n_max, rows, n_max, k,
                                    out, workspace, workspace_bytes);
      !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(kFn, ": ", s.message()));
  }
  if (k == 0 || n_max == 0) {
    // Nothing to score: the rows' outputs are all -1 (the Top-K's own path).
    return k == 0 ? absl::OkStatus()
                  : LaunchTopK(reinterpret_cast<const float*>(workspace), 0, rows, 0, nullptr, k, out,
                               workspace, workspace_bytes, stream);
  }
  if (!ScoreFp8TopKApplies(n_max, k, d)) {
    return absl::InvalidArgumentError(absl::StrCat(kFn, ": (n_max = ", n_max, ", k = ", k, ", d = ", d,
                                                   ") outside the fused path (ScoreFp8TopKApplies)"));
  }
  if (first < 0 || index_rows < static_cast<int64_t>(first) + n_max) {
    return absl::InvalidArgumentError(absl::StrCat(kFn, ": index_rows = ", index_rows, " < first + n_max = ",
                                                   static_cast<int64_t>(first) + n_max));
  }
  if (q_chan == nullptr) return absl::InvalidArgumentError(absl::StrCat(kFn, ": q_chan is null"));
  if (reinterpret_cast<uintptr_t>(index) % 16 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(kFn, ": index is not 16-byte aligned"));
  }
  // A forced chunk that does not fit falls back to the choice by size.
  int threads = chunk_threads != 0 ? ChunkThreads(n_max, k, chunk_threads) : 0;
  if (threads == 0) threads = ChunkThreads(n_max, k);
  switch (d) {
    case 16:
      return LaunchChunked(threads, Fp8IndexKeys<1>{q_chan, index, index_rows, first}, rows, n_max,
                           nullptr, k, out, workspace, true, stream);
    case 32:
      return LaunchChunked(threads, Fp8IndexKeys<2>{q_chan, index, index_rows, first}, rows, n_max,
                           nullptr, k, out, workspace, true, stream);
    default:
      return LaunchChunked(threads, Fp8IndexKeys<4>{q_chan, index, index_rows, first}, rows, n_max,
                           nullptr, k, out, workspace, true, stream);
  }
}

}  // namespace tailorkv::cuda
