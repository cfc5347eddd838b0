#include "runtime/backend.h"

#include "absl/strings/cord.h"

#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "runtime/sampler.h"

namespace tailorkv::runtime {

namespace {
constexpr char kDeviceLostPayload[] = "type.tailorkv.dev/device-lost";
}  // namespace

absl::Status MarkDeviceLost(absl::Status status) {
  if (!status.ok()) status.SetPayload(kDeviceLostPayload, absl::Cord("1"));
  return status;
}

bool IsDeviceLost(const absl::Status& status) {
  return !status.ok() && status.GetPayload(kDeviceLostPayload).has_value();
}

absl::Status ValidateForwardInput(const model::ModelConfig& config, const SequenceState& seq,
                                  absl::Span<const int32_t> tokens, Backend::Mode mode) {
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n == 0) return absl::InvalidArgumentError("tokens must not be empty");
  if (mode == Backend::Mode::kDecode && (n != 1 || seq.length() == 0)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "mode: a decode step takes one token after the prompt, got %d tokens at length %d", n,
        seq.length()));
  }
  if (n > seq.capacity() - seq.length()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("tokens: %d more tokens overflow the sequence (%d of %d used)", n,
                        seq.length(), seq.capacity()));
  }
  for (int64_t i = 0; i < n; ++i) {
    if (tokens[i] < 0 || tokens[i] >= config.vocab) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "tokens[%d] = %d is outside the vocabulary [0, %d)", i, tokens[i], config.vocab));
    }
  }
  return absl::OkStatus();
}

int64_t Backend::SequenceMemoryBytes(int /*prompt*/, int capacity, const KvPlan& plan) const {
  int64_t bytes = 0;
  for (const LayerKvBytes& b : EstimateKvBytes(plan, config(), capacity, 4)) bytes += b.device_bytes;
  return bytes;
}

absl::Status Backend::DecodeBatchPick(absl::Span<SequenceState* const> seqs, absl::Span<const int32_t> tokens,
                                      absl::Span<const GreedyPickRequest> greedy, std::vector<float>* logits,
                                      std::vector<int32_t>* picked, std::vector<absl::Status>* per_seq) {
  if (greedy.size() != seqs.size()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("greedy: %d requests for %d sequences (one each)", greedy.size(), seqs.size()));
  }
  RETURN_IF_ERROR(DecodeBatchIsolated(seqs, tokens, logits, per_seq));
  const size_t vocab = static_cast<size_t>(config().vocab);
  picked->assign(seqs.size(), -1);
  for (size_t b = 0; b < seqs.size(); ++b) {
    if (!greedy[b].pick || !(*per_seq)[b].ok()) continue;
    (*picked)[b] = GreedyPick(absl::MakeConstSpan(logits->data() + b * vocab, vocab),
                              greedy[b].repetition_penalty, greedy[b].history);
  }
  return absl::OkStatus();
}

absl::Status Backend::DecodeBatchIsolated(absl::Span<SequenceState* const> seqs, absl::Span<const int32_t> tokens,
                                          std::vector<float>* logits, std::vector<absl::Status>* per_seq) {
  const absl::Status st = DecodeBatch(seqs, tokens, logits);
  per_seq->assign(seqs.size(), st);
  return absl::OkStatus();
}

absl::Status Backend::DecodeBatch(absl::Span<SequenceState* const> seqs, absl::Span<const int32_t> tokens,
                                  std::vector<float>* logits) {
  if (seqs.empty() || seqs.size() != tokens.size()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("tokens: %d for %d sequences (one each, at least one)", tokens.size(), seqs.size()));
  }
  for (size_t b = 0; b < seqs.size(); ++b) {
    if (auto st = ValidateForwardInput(config(), *seqs[b], tokens.subspan(b, 1), Mode::kDecode); !st.ok()) {
      return absl::Status(st.code(), absl::StrFormat("sequence %d: %s", b, st.message()));
    }
  }
  const size_t vocab = static_cast<size_t>(config().vocab);
  logits->resize(seqs.size() * vocab);
  std::vector<float> one;
  for (size_t b = 0; b < seqs.size(); ++b) {
    if (auto st = Forward(*seqs[b], tokens.subspan(b, 1), false, &one, Mode::kDecode); !st.ok()) {
      return absl::Status(st.code(), absl::StrFormat("sequence %d: %s", b, st.message()));
    }
    std::copy(one.begin(), one.end(), logits->begin() + b * vocab);
  }
  return absl::OkStatus();
}

absl::Status Backend::ForwardObserved(SequenceState&, absl::Span<const int32_t>, int,
                                      const LayerObserver&) {
  return absl::UnimplementedError(
      absl::StrFormat("the %s backend has no per-layer taps (profiling)", name()));
}

absl::Status ValidateObservedForward(const model::ModelConfig& config, const SequenceState& seq,
                                     absl::Span<const int32_t> tokens, int tap_queries) {
  if (auto st = ValidateForwardInput(config, seq, tokens); !st.ok()) return st;
  if (tap_queries < 1 || tap_queries > static_cast<int64_t>(tokens.size())) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "tap_queries: must be in [1, %d] (the tokens of this call), got %d", tokens.size(),
        tap_queries));
  }
  for (int l = 0; l < static_cast<int>(seq.plan().layers.size()); ++l) {
    if (seq.plan().layers[l].kind != KvPolicyKind::kDense) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "plan.layers[%d]: taps need every layer dense, this one is %s", l,
          KvPolicyName(seq.plan().layers[l].kind)));
    }
  }
  return absl::OkStatus();
}

}  // namespace tailorkv::runtime
