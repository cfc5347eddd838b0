// CPU references for the sparse (Top-K) layers: token selection and row
// gather. The CUDA kernels in cuda/sparse_kernels.cuh reproduce these exactly
// (same set, same order, same bytes) and their tests compare against them.
//
// Ranking rule (the contract, shared with the GPU): each score maps to a
// 32-bit ordered key, TopKKey(x):
//   NaN (any sign or payload) -> 0, the lowest key of all;
//   otherwise the IEEE bits with the sign bit flipped for x >= +0 and all
//   bits flipped for negative x, so keys order like the floats, with
//   -inf < finite < +inf and -0.0 ranking just below +0.0.
// An element a outranks b when key(a) > key(b), or the keys are equal and
// a's index is smaller. The k best elements by this rule are selected and
// written sorted by ascending index (the order the gather reads host memory
// best in). k >= n selects all n.
#pragma once

#include <cstdint>
#include <cstring>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace tailorkv::runtime {

inline uint32_t TopKKey(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0;  // NaN ranks lowest
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Writes the min(k, n) selected indices of scores[0, n) to out, ascending,
// and returns that count. out must hold min(k, n) entries. Errors: n < 0,
// k < 0, null scores (n > 0) or null out (k > 0 and n > 0).
absl::StatusOr<int> TopKIndices(const float* scores, int n, int k, int32_t* out);

// Plan refine: a Top-K taken over a pool of candidates, mapped back to the
// candidates' own indices, per row r < rows: out[r * k + i] = pool[r * n_pool
// + idx[r * k + i]], or -1 where that idx entry is outside [0, n_pool) (the
// -1 TopK writes past min(k, n)). Ascending pools keep ascending output.
void MapThroughPool(const int32_t* idx, int k, const int32_t* pool, int n_pool, int rows, int32_t* out);

// dst row i = src row idx[i] (row_bytes bytes each, byte copies), for i in
// [0, count). Every index must lie in [0, src_rows); duplicates are fine.
// Errors name the field: negative sizes, null pointers, an index out of
// range (nothing is copied then).
absl::Status GatherRows(const void* src, int64_t src_rows, int64_t row_bytes, const int32_t* idx,
                        int count, void* dst);

// Row reuse between consecutive decode steps of one KV head, as a slot
// pool: the CUDA backend's device tier keeps `count` selected rows, each in
// a slot that stays put; a token selected again keeps its slot and crosses
// no link again, so no row moves on the device (attention does not depend
// on the rows' order). `slot_tok[s]` is the token slot s holds (-1: none);
// `next` is this step's selection (entries >= 0 ascending, then any -1, as
// LaunchTopK writes them). Slots whose token is in `next` keep it; the
// others are freed; the tokens of `next` that no slot holds, in ascending
// order, take the freed slots in ascending order. On return, miss[s] = the
// token slot s must now fetch (-1: keep its row), slot_tok is updated, and
// a freed slot that gets no token holds -1. Returns the number of slots
// kept (rows reused). Errors name the field: count < 0, null pointers
// (count > 0).
absl::StatusOr<int> AssignSlots(int32_t* slot_tok, const int32_t* next, int count, int32_t* miss);

}  // namespace tailorkv::runtime

namespace tailorkv::runtime {

// ---- Selection index references (the sparse policy's scoring; the CPU
// backend runs these, cuda/sparse_index_kernels.cuh reproduces them) ----

// TailorKV's critical channels for one KV head: the min(d, head_dim)
// channels with the largest |q_mean[c]| * max_abs_k[c] (TopKIndices'
// ranking), written ascending to out; returns their count. Errors as
// TopKIndices'.
absl::StatusOr<int> ChooseChannels(const float* q_mean, const float* max_abs_k, int head_dim, int d,
                                   int32_t* out);

// Approximate scores on d channels: out[i] = sum over j = 0..d-1, in that
// order, of q[j] * rows[i * d + j] (fp32 products and sums), i in [0, n).
// q holds the query's values on the chosen channels, rows each key's values
// on the same channels.
void ScoreOnChannels(const float* q, int d, const float* rows, int n, float* out);

// The speculative query of a sparse layer on its chosen channels (InfiniGen /
// TailorKV): for KV head h and j < d, with c = chans[h * d + j] and G =
// n_heads / n_kv_heads query heads per KV head,
//   out[h * d + j] = (1/G) * sum over g < G of RoPE(Wq x)[(h G + g) head_dim + c],
// where Wq is [n_heads * head_dim][hidden] (row r at wq + r * hidden), x the
// normalized input the caller chose (the previous layer's), and RoPE rotates
// channel c with its pair (c ^ 1 for adjacent pairs, c +- head_dim / 2 for
// halves) at `pos`, as ApplyRope does. Each dot product is an fp32 sum in
// input order; the rotation is ApplyRope's arithmetic.
void SpeculativeQueryMean(const float* x, const float* wq, int hidden, int n_heads, int n_kv_heads,
                          int head_dim, const int32_t* chans, int d, int pos, const float* inv_freq,
                          bool adjacent_pairs, float* out);

// A 4-bit index's rounding of one channel over one block of positions
// (SparseParams::index_bits 4, KIVI's key quantization): for the n values
// v[i * stride], z = bf16(min), step = bf16((max - z) / 15), and each value
// becomes z + clamp(round_half_even((v - z) / step), 0, 15) * step (z when
// step is 0 or not finite). NaN values stay NaN.
void RoundIndexBlock4(float* v, int n, int64_t stride);

// The same speculative query per query head instead of its group mean:
// out[q * d + j] for query head q (KV head q / G) and j < d, the channel
// chans[(q / G) * d + j] of RoPE(Wq x) for head q (SpeculativeQueryMean's
// arithmetic before the mean).
void SpeculativeQueryHeads(const float* x, const float* wq, int hidden, int n_heads, int n_kv_heads,
                           int head_dim, const int32_t* chans, int d, int pos, const float* inv_freq,
                           bool adjacent_pairs, float* out);

}  // namespace tailorkv::runtime
