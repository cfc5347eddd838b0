#include "cuda/sparse_tier_kernels.cuh"

#include <algorithm>
#include <cub/block/block_scan.cuh>
#include <cstdint>
#include <utility>

#include "absl/strings/str_cat.h"
#include "cuda/cuda_check.h"
#include "cuda/sparse_launch_checks.h"

namespace tailorkv::cuda {
namespace {

// All kernels move 16-byte chunks (8 bf16): head_dim % 8 == 0 and the K/V
// head strides are multiples of 8 elements, so with 16-byte aligned base
// pointers every row starts 16-byte aligned.
constexpr int kThreads = 256;
constexpr int kStoreUnroll = 4;   // device reads, posted host writes: little to hide
constexpr int kLoadUnroll = 8;    // reads over PCIe: keep many in flight (as GatherKernel)
constexpr int kTileTokens = 64;   // LaunchStoreHostKT's shared-memory tile: tokens x channels
constexpr int kTileChannels = 64;
constexpr int kTilePitch = kTileTokens + 2;  // bf16; odd word pitch (33): conflict-free reads
constexpr int kMaxAbsRowsPerLane = 16;

// Grid sizing and argument checks: sparse_launch_checks.h.
using sparse_launch::Bad;
using sparse_launch::CheckGatherKvRows;
using sparse_launch::CheckHostRowsCopy;
using sparse_launch::CheckPtr;
using sparse_launch::CheckRange;
using sparse_launch::CheckShape;
using sparse_launch::CheckStride;
int StrideBlocks(int64_t total, int unroll) {
  return sparse_launch::StrideBlocks(total, unroll, kThreads);
}

// Host rows <-> K/V rows. Item = one 16-byte chunk of a host row (cpr
// chunks of K then cpr of V); consecutive threads take consecutive items,
// so the host side is one contiguous run per head (rows first.. are
// adjacent there) and the device side is contiguous per half row.
template <bool kToHost, int kUnroll>
__global__ void __launch_bounds__(kThreads)
    HostRowsKernel(uint4* __restrict__ k, uint4* __restrict__ v, int64_t head_stride16,
                   uint4* __restrict__ host, int64_t host_rows, int first, int n, int cpr,
                   int64_t total) {
  const int chunks = 2 * cpr;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; base < total;
       base += nthreads * kUnroll) {
    uint4 val[kUnroll];
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
        dev_at[u] = h * head_stride16 + row * cpr + (is_v[u] ? c - cpr : c);
        if (kToHost) {
          val[u] = is_v[u] ? v[dev_at[u]] : k[dev_at[u]];
        } else {
          val[u] = host[host_at[u]];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u * nthreads < total) {
        if (kToHost) {
          host[host_at[u]] = val[u];
        } else if (is_v[u]) {
          v[dev_at[u]] = val[u];
        } else {
          k[dev_at[u]] = val[u];
        }
      }
    }
  }
}

// One block: tokens [t0, t0 + 64) (t0 a multiple of 64, clipped to [first,
// first + n)) x channels [c0, c0 + 64) (clipped to head_dim) of one head.
// Reads token rows (16 B per thread, coalesced), transposes in shared
// memory, writes each channel's 64 tokens as eight 16-byte chunks (128
// contiguous bytes per channel; 4 channels per warp). A chunk that is only
// partly inside [first, first + n), or not 16-byte aligned in kt (kt_cols %
// 8 != 0), is written element by element.
__global__ void __launch_bounds__(kThreads)
    StoreKTKernel(const uint4* __restrict__ k, int64_t head_stride16, int first, int n, int cpr,
                  uint16_t* __restrict__ kt, int64_t kt_cols, int first_tile) {
  // bf16 bit patterns (pure data movement).
  __shared__ __align__(16) uint16_t sh[kTileChannels][kTilePitch];
  const int h = blockIdx.z;
  const int head_dim = cpr * 8;
  const int64_t t0 = static_cast<int64_t>(first_tile + static_cast<int>(blockIdx.x)) * kTileTokens;
  const int chunk0 = blockIdx.y * (kTileChannels / 8);
  const int64_t end = static_cast<int64_t>(first) + n;
  constexpr int kChunksPerTile = kTileChannels / 8;  // 8 chunks of 8 channels
  // Load: item = (token, chunk) with the chunk fastest.
  for (int item = threadIdx.x; item < kTileTokens * kChunksPerTile; item += kThreads) {
    const int tl = item / kChunksPerTile;
    const int cl = item % kChunksPerTile;
    const int64_t t = t0 + tl;
    if (t >= first && t < end && chunk0 + cl < cpr) {
      const uint4 val = k[h * head_stride16 + t * cpr + chunk0 + cl];
      const uint16_t* e = reinterpret_cast<const uint16_t*>(&val);
#pragma unroll
      for (int u = 0; u < 8; ++u) sh[cl * 8 + u][tl] = e[u];
    }
  }
  __syncthreads();
  // Store: item = (channel, 8-token chunk) with the token chunk fastest.
  constexpr int kTokChunks = kTileTokens / 8;
  for (int item = threadIdx.x; item < kTileChannels * kTokChunks; item += kThreads) {
    const int j = item % kTokChunks;
    const int cl = item / kTokChunks;
    const int c = chunk0 * 8 + cl;
    if (c >= head_dim) continue;
    const int64_t col0 = t0 + 8 * j;
    if (col0 + 8 <= first || col0 >= end) continue;
    uint16_t* dst = kt + (static_cast<int64_t>(h) * head_dim + c) * kt_cols + col0;
    const uint16_t* src = &sh[cl][8 * j];
    if (col0 >= first && col0 + 8 <= end && reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
      const uint32_t* w = reinterpret_cast<const uint32_t*>(src);  // 4-byte aligned: pitch even
      *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
    } else {
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        if (col0 + u >= first && col0 + u < end) dst[u] = src[u];
      }
    }
  }
}

// GatherKernel's pattern (sparse_kernels.cu) with the destination split:
// item = 16-byte chunk of a selected host row (K chunks then V chunks), so
// consecutive lanes read consecutive bytes of one row (a 512-byte row is one
// warp at head_dim 128) and each thread has kLoadUnroll loads in flight, a
// grid apart.
__global__ void __launch_bounds__(kThreads)
    GatherKvKernel(const uint4* __restrict__ host, int64_t host_rows, int64_t src_first,
                   const int32_t* __restrict__ idx, int count, int cpr, int64_t total,
                   uint4* __restrict__ dst_k, uint4* __restrict__ dst_v, int64_t dst_head_stride16,
                   int dst_first) {
  const int chunks = 2 * cpr;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; base < total;
       base += nthreads * kLoadUnroll) {
    uint4 val[kLoadUnroll];
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
          dst_at[u] = h * dst_head_stride16 + (dst_first + i) * cpr + (is_v[u] ? c - cpr : c);
          ok[u] = true;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kLoadUnroll; ++u) {
      if (ok[u]) (is_v[u] ? dst_v : dst_k)[dst_at[u]] = val[u];
    }
  }
}

// Slot pool, one block per KV head (runtime::AssignSlots). Thread t owns
// slots [t * per, (t + 1) * per) and selection entries likewise, so block
// scans over per-thread counts rank freed slots and fresh tokens in
// ascending order, as the reference pairs them.
constexpr int kSlotThreads = 1024;
constexpr int kSlotsPerThread = kAssignSlotsMaxCount / kSlotThreads;
__global__ void __launch_bounds__(kSlotThreads)
    AssignSlotsKernel(int32_t* __restrict__ slot_tok, const int32_t* __restrict__ next, int count,
                      int32_t* __restrict__ miss, unsigned long long* reused) {
  using Scan = cub::BlockScan<int, kSlotThreads>;
  __shared__ typename Scan::TempStorage scan;
  extern __shared__ int32_t smem[];
  int32_t* nx = smem;                                                    // [count] next
  int32_t* freed = smem + count;                                         // [count] by rank
  unsigned char* held = reinterpret_cast<unsigned char*>(freed + count);  // [count]
  const int64_t base = static_cast<int64_t>(blockIdx.x) * count;
  int32_t* st = slot_tok + base;
  int32_t* ms = miss + base;
  for (int i = threadIdx.x; i < count; i += kSlotThreads) {
    nx[i] = next[base + i];
    held[i] = 0;
  }
  __syncthreads();
  // Entries >= 0 come first: the valid prefix ends at the first -1.
  int lo = 0, hi = count;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (nx[mid] >= 0) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  const int n_valid = lo;
  const int per = (count + kSlotThreads - 1) / kSlotThreads;
  const int first = threadIdx.x * per, last = min(count, first + per);
  bool keep[kSlotsPerThread];
  int n_free = 0, n_keep = 0;
#pragma unroll
  for (int k = 0; k < kSlotsPerThread; ++k) {
    const int s = first + k;
    keep[k] = false;
    if (k >= per || s >= last) continue;
    const int32_t u = st[s];
    if (u >= 0) {
      int a = 0, b = n_valid;
      while (a < b) {
        const int mid = (a + b) / 2;
        if (nx[mid] < u) {
          a = mid + 1;
        } else {
          b = mid;
        }
      }
      if (a < n_valid && nx[a] == u) {
        keep[k] = true;
        held[a] = 1;
      }
    }
    ms[s] = -1;
    if (keep[k]) {
      ++n_keep;
    } else {
      st[s] = -1;  // overwritten below when a fresh token takes it
      ++n_free;
    }
  }
  int rank = 0;
  Scan(scan).ExclusiveSum(n_free, rank);
#pragma unroll
  for (int k = 0; k < kSlotsPerThread; ++k) {
    const int s = first + k;
    if (k < per && s < last && !keep[k]) freed[rank++] = s;
  }
  __syncthreads();  // freed and held complete; scan storage free again
  int n_fresh = 0;
  for (int j = first; j < last; ++j) n_fresh += (j < n_valid && !held[j]) ? 1 : 0;
  Scan(scan).ExclusiveSum(n_fresh, rank);
  for (int j = first; j < last; ++j) {
    if (j >= n_valid || held[j]) continue;
    const int s = freed[rank++];
    st[s] = nx[j];
    ms[s] = nx[j];
  }
  if (reused != nullptr) {
    const unsigned sum = __reduce_add_sync(0xffffffffu, static_cast<unsigned>(n_keep));
    if ((threadIdx.x & 31) == 0 && sum > 0) atomicAdd(reused, static_cast<unsigned long long>(sum));
  }
}

// Block (slice of rows, head). Thread = one 8-channel chunk and one row
// lane (lanes = kThreads / cpr rows at a time, or 1 lane looping over chunks
// when cpr > kThreads); it keeps the max in registers (fmaxf drops NaN, so
// NaN elements never count), then lanes merge with shared atomics and the
// block with global atomics, both on the float bits as int: every value
// pushed is >= 0, and among such bit patterns int order is float order (and
// any negative old value compares below them, as in fp32).
__global__ void __launch_bounds__(kThreads)
    MaxAbsKernel(const uint4* __restrict__ k, int64_t head_stride16, int first, int n, int cpr,
                 int rows_per_block, float* __restrict__ max_abs) {
  extern __shared__ int sh_max[];  // [head_dim]; -1: nothing seen
  const int h = blockIdx.y;
  const int head_dim = cpr * 8;
  for (int c = threadIdx.x; c < head_dim; c += kThreads) sh_max[c] = -1;
  __syncthreads();
  const int64_t r0 = static_cast<int64_t>(first) + static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t end = static_cast<int64_t>(first) + n;
  const int64_t r1 = r0 + rows_per_block < end ? r0 + rows_per_block : end;
  int lanes, lane, c_begin, c_step;
  if (cpr <= kThreads) {
    lanes = kThreads / cpr;
    lane = threadIdx.x / cpr;
    c_begin = threadIdx.x % cpr;
    c_step = cpr;  // one chunk per thread
  } else {
    lanes = 1;
    lane = 0;
    c_begin = threadIdx.x;
    c_step = kThreads;
  }
  if (lane < lanes) {
    for (int c = c_begin; c < cpr; c += c_step) {
      float m[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) m[u] = -1.0f;
      const uint4* src = k + h * head_stride16 + c;
#pragma unroll 4
      for (int64_t r = r0 + lane; r < r1; r += lanes) {
        const uint4 val = src[r * cpr];
        const __nv_bfloat16* e = reinterpret_cast<const __nv_bfloat16*>(&val);
#pragma unroll
        for (int u = 0; u < 8; ++u) m[u] = fmaxf(m[u], fabsf(__bfloat162float(e[u])));
      }
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        if (m[u] >= 0.0f) atomicMax(&sh_max[c * 8 + u], __float_as_int(m[u]));
      }
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < head_dim; c += kThreads) {
    const int bits = sh_max[c];
    if (bits >= 0) atomicMax(reinterpret_cast<int*>(max_abs) + h * head_dim + c, bits);
  }
}

__global__ void __launch_bounds__(kThreads)
    AppendTokenKernel(const uint4* __restrict__ src_k, const uint4* __restrict__ src_v,
                      int64_t src_head_stride16, const int32_t* __restrict__ d_pos, int row_offset,
                      int n_kv, int cpr, uint4* __restrict__ dst_k, uint4* __restrict__ dst_v,
                      int64_t dst_head_stride16, int32_t* __restrict__ d_len) {
  const int64_t pos = *d_pos;
  const int64_t row = pos + row_offset;
  if (pos < 0 || row < 0) return;  // outside the contract; write nothing rather than out of bounds
  const int total = n_kv * 2 * cpr;
  for (int item = threadIdx.x; item < total; item += kThreads) {
    const int h = item / (2 * cpr);
    const int c = item - h * 2 * cpr;
    if (c < cpr) {
      dst_k[h * dst_head_stride16 + row * cpr + c] = src_k[h * src_head_stride16 + pos * cpr + c];
    } else {
      dst_v[h * dst_head_stride16 + row * cpr + c - cpr] =
          src_v[h * src_head_stride16 + pos * cpr + c - cpr];
    }
  }
  if (threadIdx.x == 0) *d_len = static_cast<int32_t>(row + 1);
}

}  // namespace

absl::Status LaunchStoreHostRows(const __nv_bfloat16* k, const __nv_bfloat16* v,
                                 int64_t head_stride, int first, int n, int n_kv, int head_dim,
                                 __nv_bfloat16* host, int64_t host_rows, cudaStream_t stream) {
  constexpr const char* kFn = "LaunchStoreHostRows";
  if (absl::Status s = CheckHostRowsCopy(kFn, /*store=*/true, first, n, n_kv, head_dim,
                                         head_stride, host_rows, host, k, v);
      !s.ok() || n == 0) {
    return s;
  }
  const int cpr = head_dim / 8;
  const int64_t total = static_cast<int64_t>(n_kv) * n * 2 * cpr;
  HostRowsKernel<true, kStoreUnroll><<<StrideBlocks(total, kStoreUnroll), kThreads, 0, stream>>>(
      reinterpret_cast<uint4*>(const_cast<__nv_bfloat16*>(k)),
      reinterpret_cast<uint4*>(const_cast<__nv_bfloat16*>(v)), head_stride / 8,
      reinterpret_cast<uint4*>(host), host_rows, first, n, cpr, total);
  CUDA_RETURN_IF_LAUNCH_FAILED("HostRowsKernel<store>");
  return absl::OkStatus();
}

absl::Status LaunchLoadHostRows(const __nv_bfloat16* host, int64_t host_rows, int first, int n,
                                int n_kv, int head_dim, __nv_bfloat16* k, __nv_bfloat16* v,
                                int64_t head_stride, cudaStream_t stream) {
  constexpr const char* kFn = "LaunchLoadHostRows";
  if (absl::Status s = CheckHostRowsCopy(kFn, /*store=*/false, first, n, n_kv, head_dim,
                                         head_stride, host_rows, host, k, v);
      !s.ok() || n == 0) {
    return s;
  }
  const int cpr = head_dim / 8;
  const int64_t total = static_cast<int64_t>(n_kv) * n * 2 * cpr;
  HostRowsKernel<false, kLoadUnroll><<<StrideBlocks(total, kLoadUnroll), kThreads, 0, stream>>>(
      reinterpret_cast<uint4*>(k), reinterpret_cast<uint4*>(v), head_stride / 8,
      reinterpret_cast<uint4*>(const_cast<__nv_bfloat16*>(host)), host_rows, first, n, cpr, total);
  CUDA_RETURN_IF_LAUNCH_FAILED("HostRowsKernel<load>");
  return absl::OkStatus();
}

absl::Status LaunchStoreHostKT(const __nv_bfloat16* k, int64_t head_stride, int first, int n,
                               int n_kv, int head_dim, __nv_bfloat16* kt, int64_t kt_cols,
                               cudaStream_t stream) {
  constexpr const char* kFn = "LaunchStoreHostKT";
  if (absl::Status s = CheckShape(kFn, n_kv, head_dim); !s.ok()) return s;
  if (absl::Status s = CheckRange(kFn, first, n); !s.ok()) return s;
  const int64_t end = static_cast<int64_t>(first) + n;
  if (kt_cols < end) return Bad(kFn, "kt_cols = ", kt_cols, " < first + n = ", end);
  if (absl::Status s = CheckStride(kFn, "head_stride", head_stride, end, head_dim); !s.ok()) return s;
  if (n == 0) return absl::OkStatus();
  if (absl::Status s = CheckPtr(kFn, "k", k); !s.ok()) return s;
  // kt needs only bf16 alignment: unaligned 16-byte chunks fall back to
  // element stores (full speed needs kt 16-byte aligned and kt_cols % 8 == 0).
  if (absl::Status s = CheckPtr(kFn, "kt", kt, /*need_align16=*/false); !s.ok()) return s;
  const int cpr = head_dim / 8;
  const int first_tile = first / kTileTokens;
  const int tiles = static_cast<int>((end - 1) / kTileTokens) - first_tile + 1;
  const dim3 grid(tiles, (head_dim + kTileChannels - 1) / kTileChannels, n_kv);
  StoreKTKernel<<<grid, kThreads, 0, stream>>>(reinterpret_cast<const uint4*>(k), head_stride / 8,
                                               first, n, cpr, reinterpret_cast<uint16_t*>(kt),
                                               kt_cols, first_tile);
  CUDA_RETURN_IF_LAUNCH_FAILED("StoreKTKernel");
  return absl::OkStatus();
}

absl::Status LaunchGatherKvRows(const __nv_bfloat16* host, int64_t host_rows, int64_t src_first,
                                const int32_t* idx, int count, int n_kv, int head_dim,
                                __nv_bfloat16* dst_k, __nv_bfloat16* dst_v, int64_t dst_head_stride,
                                int dst_first, cudaStream_t stream) {
  constexpr const char* kFn = "LaunchGatherKvRows";
  if (absl::Status s = CheckGatherKvRows(kFn, host_rows, src_first, count, n_kv, head_dim,
                                         dst_head_stride, dst_first, host, idx, dst_k, dst_v);
      !s.ok() || count == 0) {
    return s;
  }
  const int cpr = head_dim / 8;
  const int64_t total = static_cast<int64_t>(n_kv) * count * 2 * cpr;
  GatherKvKernel<<<StrideBlocks(total, kLoadUnroll), kThreads, 0, stream>>>(
      reinterpret_cast<const uint4*>(host), host_rows, src_first, idx, count, cpr, total,
      reinterpret_cast<uint4*>(dst_k), reinterpret_cast<uint4*>(dst_v), dst_head_stride / 8,
      dst_first);
  CUDA_RETURN_IF_LAUNCH_FAILED("GatherKvKernel");
  return absl::OkStatus();
}

absl::Status LaunchAssignSlots(int32_t* slot_tok, const int32_t* next, int count, int n_kv,
                               int32_t* miss, unsigned long long* reused, cudaStream_t stream) {
  constexpr const char* kFn = "LaunchAssignSlots";
  if (n_kv < 1) return Bad(kFn, "n_kv = ", n_kv, " < 1");
  if (count < 0 || count > kAssignSlotsMaxCount) {
    return Bad(kFn, "count = ", count, " outside [0, ", kAssignSlotsMaxCount, "]");
  }
  if (count == 0) return absl::OkStatus();
  for (const auto& [p, field] : {std::pair<const void*, const char*>{slot_tok, "slot_tok"},
                                 {next, "next"}, {miss, "miss"}}) {
    if (absl::Status s = CheckPtr(kFn, field, p, /*need_align16=*/false); !s.ok()) return s;
  }
  const size_t smem = static_cast<size_t>(count) * (2 * sizeof(int32_t) + 1);
  // Above 48 KiB a kernel must opt in; once per process is enough.
  static const cudaError_t opt_in = cudaFuncSetAttribute(
      AssignSlotsKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
      static_cast<int>(static_cast<size_t>(kAssignSlotsMaxCount) * (2 * sizeof(int32_t) + 1)));
  CUDA_RETURN_IF_ERROR(opt_in);
  AssignSlotsKernel<<<n_kv, kSlotThreads, smem, stream>>>(slot_tok, next, count, miss, reused);
  CUDA_RETURN_IF_LAUNCH_FAILED("AssignSlotsKernel");
  return absl::OkStatus();
}

absl::Status LaunchMaxAbsUpdate(const __nv_bfloat16* k, int64_t head_stride, int first, int n,
                                int n_kv, int head_dim, float* max_abs, cudaStream_t stream) {
  constexpr const char* kFn = "LaunchMaxAbsUpdate";
  if (absl::Status s = CheckShape(kFn, n_kv, head_dim); !s.ok()) return s;
  if (absl::Status s = CheckRange(kFn, first, n); !s.ok()) return s;
  const int64_t end = static_cast<int64_t>(first) + n;
  if (absl::Status s = CheckStride(kFn, "head_stride", head_stride, end, head_dim); !s.ok()) return s;
  if (n == 0) return absl::OkStatus();
  if (absl::Status s = CheckPtr(kFn, "k", k); !s.ok()) return s;
  if (absl::Status s = CheckPtr(kFn, "max_abs", max_abs, /*need_align16=*/false); !s.ok()) return s;
  if (reinterpret_cast<uintptr_t>(max_abs) % 4 != 0) return Bad(kFn, "max_abs is not 4-byte aligned");
  const int cpr = head_dim / 8;
  const int lanes = cpr <= kThreads ? kThreads / cpr : 1;
  const int rows_per_block = lanes * kMaxAbsRowsPerLane;
  const dim3 grid(static_cast<unsigned>((n + rows_per_block - 1) / rows_per_block), n_kv);
  MaxAbsKernel<<<grid, kThreads, head_dim * sizeof(int), stream>>>(
      reinterpret_cast<const uint4*>(k), head_stride / 8, first, n, cpr, rows_per_block, max_abs);
  CUDA_RETURN_IF_LAUNCH_FAILED("MaxAbsKernel");
  return absl::OkStatus();
}

absl::Status LaunchSparseAppendToken(const __nv_bfloat16* src_k, const __nv_bfloat16* src_v,
                                     int64_t src_head_stride, const int32_t* d_pos,
                                     int row_offset, int n_kv, int head_dim, __nv_bfloat16* dst_k,
                                     __nv_bfloat16* dst_v, int64_t dst_head_stride,
                                     int32_t* d_len, cudaStream_t stream) {
  constexpr const char* kFn = "LaunchSparseAppendToken";
  if (absl::Status s = CheckShape(kFn, n_kv, head_dim); !s.ok()) return s;
  if (absl::Status s = CheckStride(kFn, "src_head_stride", src_head_stride, 1, head_dim); !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckStride(kFn, "dst_head_stride", dst_head_stride, 1, head_dim); !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckPtr(kFn, "src_k", src_k); !s.ok()) return s;
  if (absl::Status s = CheckPtr(kFn, "src_v", src_v); !s.ok()) return s;
  if (absl::Status s = CheckPtr(kFn, "d_pos", d_pos, /*need_align16=*/false); !s.ok()) return s;
  if (absl::Status s = CheckPtr(kFn, "dst_k", dst_k); !s.ok()) return s;
  if (absl::Status s = CheckPtr(kFn, "dst_v", dst_v); !s.ok()) return s;
  if (absl::Status s = CheckPtr(kFn, "d_len", d_len, /*need_align16=*/false); !s.ok()) return s;
  AppendTokenKernel<<<1, kThreads, 0, stream>>>(
      reinterpret_cast<const uint4*>(src_k), reinterpret_cast<const uint4*>(src_v),
      src_head_stride / 8, d_pos, row_offset, n_kv, head_dim / 8, reinterpret_cast<uint4*>(dst_k),
      reinterpret_cast<uint4*>(dst_v), dst_head_stride / 8, d_len);
  CUDA_RETURN_IF_LAUNCH_FAILED("AppendTokenKernel");
  return absl::OkStatus();
}

}  // namespace tailorkv::cuda
