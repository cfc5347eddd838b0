// Token sampling: greedy, temperature, top-k, top-p and repetition penalty,
// driven by a seeded generator so that the same seed gives the same text.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace tailorkv::runtime {

struct SamplingParams {
  float temperature = 0.0f;         // 0 = greedy; otherwise in (0, 100]
  float top_p = 1.0f;               // in (0, 1]
  int top_k = 0;                    // 0 = off; otherwise in [1, vocab]
  float repetition_penalty = 1.0f;  // in (0, 10]; 1 = off (CTRL-style, as HF)
  uint64_t seed = 0;

  // InvalidArgument naming the field and its limit (NaN rejected everywhere).
  absl::Status Validate(int vocab_size) const;
};

// Greedy choice (temperature 0): logits with the repetition penalty applied
// once to each distinct token of `history` (CTRL-style: positive logits
// divided by it, others multiplied; ids outside [0, vocab) ignored), then
// the largest, ties to the lowest id; a NaN never wins, except at id 0 when
// nothing compares greater (a sequential scan from id 0). `logits` is not
// changed. The reference of the CUDA backend's on-device pick
// (cuda/sampling_kernels.cuh); Sampler::Sample's greedy path.
int32_t GreedyPick(absl::Span<const float> logits, float repetition_penalty,
                   absl::Span<const int32_t> history);

// Not thread-safe; one per generation.
class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);
  // Picks the next token from `logits` (greedy: GreedyPick, logits
  // untouched; otherwise modified in place: penalties, temperature).
  // `history` holds the tokens seen so far (prompt + output), to which the
  // repetition penalty applies. Ties in greedy pick the lowest id.
  int32_t Sample(absl::Span<float> logits, absl::Span<const int32_t> history);
  const SamplingParams& params() const { return params_; }

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> candidates_;
};

}  // namespace tailorkv::runtime
