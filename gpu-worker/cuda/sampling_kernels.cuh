// Token picking on the GPU, so that a decode step returns token ids instead
// of logits (runtime::Backend::DecodeBatchPick). CPU reference (exact):
// runtime::GreedyPick (runtime/sampler.h); tests: sampling_kernels_test.cc.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"

namespace tailorkv::cuda {

// Rows one LaunchGreedyPick takes (a decode pass's batch).
inline constexpr int kMaxPickRows = 64;

// Per row: the repetition penalty (1: none) and the row's seen-token bitmap
// (bit t of word t / 32 set for every token of the history; null: none).
struct GreedyPickRows {
  const uint32_t* seen[kMaxPickRows] = {};
  float penalty[kMaxPickRows] = {};
};

// out[b] = runtime::GreedyPick(logits row b, rows.penalty[b], the tokens
// set in rows.seen[b]) for b < n_rows, bit for bit: the penalty divides a
// positive logit (IEEE division) and multiplies the others, the largest
// value wins with ties to the lowest id, a NaN never wins except at id 0.
// Row b is logits[b * row_stride, b * row_stride + vocab). One block per
// row; graph-capturable.
// Errors: n_rows outside [1, kMaxPickRows], vocab < 1, row_stride < vocab,
// null logits / out.
absl::Status LaunchGreedyPick(const float* logits, int64_t row_stride, int n_rows, int vocab,
                              const GreedyPickRows& rows, int32_t* out, cudaStream_t stream);

// Sets the bits of tokens[0, n) in `seen` ((vocab + 31) / 32 words); tokens
// outside [0, vocab) are ignored. Errors: n < 0, vocab < 1, null pointers
// (n > 0).
absl::Status LaunchMarkSeen(const int32_t* tokens, int n, int vocab, uint32_t* seen,
                            cudaStream_t stream);

}  // namespace tailorkv::cuda
