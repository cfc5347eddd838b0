#include "runtime/sampler.h"

#include <algorithm>
#include <cmath>
#include <unordered_set>

#include "absl/strings/str_format.h"

namespace tailorkv::runtime {

absl::Status SamplingParams::Validate(int vocab_size) const {
  // !(x >= lo) style comparisons reject NaN as well as out-of-range values.
  if (!(temperature >= 0.0f && temperature <= 100.0f)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("temperature must be in [0, 100], got %g", temperature));
  }
  if (!(top_p > 0.0f && top_p <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrFormat("top_p must be in (0, 1], got %g", top_p));
  }
  if (top_k < 0 || top_k > vocab_size) {
    return absl::InvalidArgumentError(
        absl::StrFormat("top_k must be in [0, %d] (0 = off), got %d", vocab_size, top_k));
  }
  if (!(repetition_penalty > 0.0f && repetition_penalty <= 10.0f)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "repetition_penalty must be in (0, 10], got %g", repetition_penalty));
  }
  return absl::OkStatus();
}

int32_t GreedyPick(absl::Span<const float> logits, float repetition_penalty,
                   absl::Span<const int32_t> history) {
  const int vocab = static_cast<int>(logits.size());
  if (vocab == 0) return 0;
  std::vector<bool> seen;
  if (repetition_penalty != 1.0f) {
    seen.assign(vocab, false);
    for (int32_t t : history) {
      if (t >= 0 && t < vocab) seen[t] = true;
    }
  }
  auto value = [&](int i) {
    const float l = logits[i];
    if (seen.empty() || !seen[i]) return l;
    return l > 0 ? l / repetition_penalty : l * repetition_penalty;
  };
  int32_t best = 0;
  float best_v = value(0);
  for (int i = 1; i < vocab; ++i) {
    const float v = value(i);
    if (v > best_v) {  // strict: ties keep the lowest id
      best = i;
      best_v = v;
    }
  }
  return best;
}

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}

int32_t Sampler::Sample(absl::Span<float> logits, absl::Span<const int32_t> history) {
  const int vocab = static_cast<int>(logits.size());
  if (params_.temperature == 0.0f) return GreedyPick(logits, params_.repetition_penalty, history);
  if (params_.repetition_penalty != 1.0f) {
    // Applied once per distinct token, as Hugging Face does.
    std::unordered_set<int32_t> seen(history.begin(), history.end());
    for (int32_t t : seen) {
      if (t < 0 || t >= vocab) continue;
      float& l = logits[t];
      l = l > 0 ? l / params_.repetition_penalty : l * params_.repetition_penalty;
    }
  }
  candidates_.clear();
  candidates_.reserve(vocab);
  for (int i = 0; i < vocab; ++i) candidates_.emplace_back(logits[i] / params_.temperature, i);
  // Order by logit descending, id ascending, so the result does not depend on
  // the sort's handling of ties.
  auto better = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  size_t keep = candidates_.size();
  if (params_.top_k > 0 && static_cast<size_t>(params_.top_k) < keep) {
    keep = params_.top_k;
    std::partial_sort(candidates_.begin(), candidates_.begin() + keep, candidates_.end(), better);
    candidates_.resize(keep);
  } else {
    std::sort(candidates_.begin(), candidates_.end(), better);
  }
  const float max_logit = candidates_.front().first;
  double total = 0;
  for (auto& c : candidates_) {
    c.first = std::exp(c.first - max_logit);
    total += c.first;
  }
  if (params_.top_p < 1.0f) {
    // Keep the smallest prefix whose mass reaches top_p (at least one token).
    double cum = 0;
    size_t n = 0;
    while (n < candidates_.size()) {
      cum += candidates_[n].first / total;
      ++n;
      if (cum >= params_.top_p) break;
    }
    candidates_.resize(n);
    total = 0;
    for (auto& c : candidates_) total += c.first;
  }
  // 53 random bits -> uniform double in [0, 1); independent of the library's
  // distribution implementations, so a seed means the same text everywhere.
  const double u = static_cast<double>(rng_() >> 11) * (1.0 / 9007199254740992.0);
  double target = u * total;
  for (const auto& c : candidates_) {
    target -= c.first;
    if (target < 0) return c.second;
  }
  return candidates_.back().second;
}

}  // namespace tailorkv::runtime
