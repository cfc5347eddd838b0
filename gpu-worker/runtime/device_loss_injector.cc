#include "runtime/device_loss_injector.h"

#include "absl/strings/str_format.h"

namespace tailorkv::runtime {

DeviceLossInjector::DeviceLossInjector(std::unique_ptr<Backend> inner, int64_t decode_steps)
    : inner_(std::move(inner)), decode_steps_(decode_steps) {}

absl::Status DeviceLossInjector::LostStatus() const {
  return MarkDeviceLost(absl::InternalError(absl::StrFormat(
      "device lost (injected after %d decode steps): an illegal memory access was encountered "
      "(the context is unusable; every later call fails)",
      decode_steps_)));
}

absl::Status DeviceLossInjector::Step(bool decode) {
  if (lost()) return LostStatus();
  if (decode) ++steps_;
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<SequenceState>> DeviceLossInjector::NewSequence(int capacity, const KvPlan& plan) {
  if (lost()) return LostStatus();
  return inner_->NewSequence(capacity, plan);
}

absl::Status DeviceLossInjector::Forward(SequenceState& seq, absl::Span<const int32_t> tokens, bool all_logits,
                                         std::vector<float>* logits, Mode mode) {
  if (absl::Status s = Step(IsDecode(seq, tokens, mode)); !s.ok()) return s;
  return inner_->Forward(seq, tokens, all_logits, logits, mode);
}

absl::Status DeviceLossInjector::ForwardObserved(SequenceState& seq, absl::Span<const int32_t> tokens,
                                                 int tap_queries, const LayerObserver& observer) {
  if (absl::Status s = Step(false); !s.ok()) return s;
  return inner_->ForwardObserved(seq, tokens, tap_queries, observer);
}

absl::Status DeviceLossInjector::DecodeBatch(absl::Span<SequenceState* const> seqs,
                                             absl::Span<const int32_t> tokens, std::vector<float>* logits) {
  if (absl::Status s = Step(true); !s.ok()) return s;
  return inner_->DecodeBatch(seqs, tokens, logits);
}

absl::Status DeviceLossInjector::DecodeBatchIsolated(absl::Span<SequenceState* const> seqs,
                                                     absl::Span<const int32_t> tokens, std::vector<float>* logits,
                                                     std::vector<absl::Status>* per_seq) {
  if (absl::Status s = Step(true); !s.ok()) return s;
  return inner_->DecodeBatchIsolated(seqs, tokens, logits, per_seq);
}

absl::Status DeviceLossInjector::DecodeBatchPick(absl::Span<SequenceState* const> seqs,
                                                 absl::Span<const int32_t> tokens,
                                                 absl::Span<const GreedyPickRequest> greedy,
                                                 std::vector<float>* logits, std::vector<int32_t>* picked,
                                                 std::vector<absl::Status>* per_seq) {
  if (absl::Status s = Step(true); !s.ok()) return s;
  return inner_->DecodeBatchPick(seqs, tokens, greedy, logits, picked, per_seq);
}

}  // namespace tailorkv::runtime
