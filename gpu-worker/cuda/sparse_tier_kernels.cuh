// Sparse-layer data movement between the tiers (runtime/cpu_backend.h has
// the policy's semantics; cuda_backend.cc uses these).
//
// Host tier layout ("host rows"): per KV head, `host_rows` rows of
// 2 * head_dim bf16, K then V, so one selected token of one head is one
// contiguous row (512 B at head_dim 128; bench/NOTES-sparse.md has the
// measurement behind this choice). `host` is a device pointer to host memory
// (cudaHostRegister'd, unified addressing) or device memory.
// Scratch / device-tier layout: K and V arrays [n_kv][stride][head_dim] bf16
// (the backend's full-precision scratch and a sparse layer's device tier).
//
// Every launch: InvalidArgument naming the field for null pointers,
// non-positive n_kv or head_dim (head_dim must be a multiple of 8), negative
// counts or rows out of range; n == 0 (or count == 0) enqueues nothing.
// The kernels move 16-byte chunks: the bf16 arrays (k, v, host, dst_*,
// src_*; not kt) must be 16-byte aligned and every head stride a multiple of
// 8 elements holding the rows addressed (InvalidArgument otherwise).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"

namespace tailorkv::cuda {

// host row (first + i) of head h = [k | v] row (first + i) of head h, for
// i < n. Rows [first, first + n) must lie inside both layouts.
absl::Status LaunchStoreHostRows(const __nv_bfloat16* k, const __nv_bfloat16* v,
                                 int64_t head_stride, int first, int n, int n_kv, int head_dim,
                                 __nv_bfloat16* host, int64_t host_rows, cudaStream_t stream);

// The inverse: k / v row (first + i) of head h = host row (first + i).
absl::Status LaunchLoadHostRows(const __nv_bfloat16* host, int64_t host_rows, int first, int n,
                                int n_kv, int head_dim, __nv_bfloat16* k, __nv_bfloat16* v,
                                int64_t head_stride, cudaStream_t stream);

// Transposed keys (the faithful index reads one channel of every token):
// kt[(h * head_dim + c) * kt_cols + first + i] = k row (first + i) of head h,
// channel c. first + n <= kt_cols.
absl::Status LaunchStoreHostKT(const __nv_bfloat16* k, int64_t head_stride, int first, int n,
                               int n_kv, int head_dim, __nv_bfloat16* kt, int64_t kt_cols,
                               cudaStream_t stream);

// Zero-copy gather of selected tokens, split into K and V: for h < n_kv,
// i < count, with p = idx[h * count + i] + src_first: when 0 <= idx and
// p < host_rows, dst_k / dst_v row (dst_first + i) of head h = the K / V
// halves of host row p of head h; otherwise (the -1 that LaunchTopK writes
// past min(k, n)) that destination row is left untouched.
absl::Status LaunchGatherKvRows(const __nv_bfloat16* host, int64_t host_rows, int64_t src_first,
                                const int32_t* idx, int count, int n_kv, int head_dim,
                                __nv_bfloat16* dst_k, __nv_bfloat16* dst_v, int64_t dst_head_stride,
                                int dst_first, cudaStream_t stream);

// Largest count LaunchAssignSlots takes (its block keeps a head's
// selection in shared memory).
inline constexpr int kAssignSlotsMaxCount = 8192;

// Row reuse between decode steps as a slot pool (runtime::AssignSlots per KV
// head): slot_tok and next are [n_kv][count]; per head, slots whose token is
// selected again keep it, the tokens of `next` that no slot holds take the
// freed slots (both ascending), miss[h * count + s] = the token slot s must
// fetch (-1: keep), and slot_tok is updated (-1 for a freed slot left
// over). LaunchGatherKvRows(..., idx = miss, ...) then fetches only the new
// rows into their slots, and no row moves on the device. When `reused` is
// not null, the slots kept are added to it (statistics). miss must not
// alias slot_tok or next. One block per head; graph-capturable.
// Errors: n_kv < 1, count outside [0, kAssignSlotsMaxCount], null pointers.
absl::Status LaunchAssignSlots(int32_t* slot_tok, const int32_t* next, int count, int n_kv,
                               int32_t* miss, unsigned long long* reused, cudaStream_t stream);

// max_abs[h * head_dim + c] = max(max_abs[...], |k row r of head h, channel
// c|) over r in [first, first + n) (fp32; NaN elements are ignored, as in
// std::max(m, NaN) == m). No alignment needed for max_abs beyond float's.
absl::Status LaunchMaxAbsUpdate(const __nv_bfloat16* k, int64_t head_stride, int first, int n,
                                int n_kv, int head_dim, float* max_abs, cudaStream_t stream);

// The decode token into a sparse layer's device tier: with pos = *d_pos and
// row = pos + row_offset, dst_k / dst_v row `row` of head h = src_k / src_v
// row pos of head h (the scratch, where RoPE + append put the token), and
// *d_len = row + 1 (the rows the attention then reads). Graph-capturable:
// pos is read on the device. The caller guarantees 0 <= row < dst rows.
absl::Status LaunchSparseAppendToken(const __nv_bfloat16* src_k, const __nv_bfloat16* src_v,
                                     int64_t src_head_stride, const int32_t* d_pos,
                                     int row_offset, int n_kv, int head_dim, __nv_bfloat16* dst_k,
                                     __nv_bfloat16* dst_v, int64_t dst_head_stride,
                                     int32_t* d_len, cudaStream_t stream);

}  // namespace tailorkv::cuda
