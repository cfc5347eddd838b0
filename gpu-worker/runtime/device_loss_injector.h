// DeviceLossInjector: a Backend that wraps another and, after a given number
// of decode steps, behaves as a device that was lost: every later call
// (decode, prefill, new sequences) fails with the same status marked
// MarkDeviceLost, as a CUDA context does after a sticky error. It lets the
// engine's and the worker's handling of a lost device run on any backend
// (the CPU one in CI); `gpu-worker --inject-device-loss-after N` turns it on.
// Owns the wrapped backend; single-threaded like every backend.
#pragma once

#include <cstdint>
#include <memory>
#include <string_view>

#include "runtime/backend.h"

namespace tailorkv::runtime {

class DeviceLossInjector : public Backend {
 public:
  // Lost once `decode_steps` decode steps (DecodeBatch* calls or decode
  // Forward calls) have run; the step after them is the first to fail.
  DeviceLossInjector(std::unique_ptr<Backend> inner, int64_t decode_steps);

  std::string_view name() const override { return inner_->name(); }
  const model::ModelConfig& config() const override { return inner_->config(); }
  using Backend::NewSequence;
  absl::StatusOr<std::unique_ptr<SequenceState>> NewSequence(int capacity, const KvPlan& plan) override;
  using Backend::Forward;
  absl::Status Forward(SequenceState& seq, absl::Span<const int32_t> tokens, bool all_logits,
                       std::vector<float>* logits, Mode mode) override;
  absl::Status ForwardObserved(SequenceState& seq, absl::Span<const int32_t> tokens, int tap_queries,
                               const LayerObserver& observer) override;
  absl::Status DecodeBatch(absl::Span<SequenceState* const> seqs, absl::Span<const int32_t> tokens,
                           std::vector<float>* logits) override;
  absl::Status DecodeBatchIsolated(absl::Span<SequenceState* const> seqs, absl::Span<const int32_t> tokens,
                                   std::vector<float>* logits, std::vector<absl::Status>* per_seq) override;
  absl::Status DecodeBatchPick(absl::Span<SequenceState* const> seqs, absl::Span<const int32_t> tokens,
                               absl::Span<const GreedyPickRequest> greedy, std::vector<float>* logits,
                               std::vector<int32_t>* picked, std::vector<absl::Status>* per_seq) override;
  int max_interleaved_sequences() const override { return inner_->max_interleaved_sequences(); }
  int preferred_prefill_chunk() const override { return inner_->preferred_prefill_chunk(); }
  int64_t SequenceMemoryBytes(int prompt, int capacity, const KvPlan& plan) const override {
    return inner_->SequenceMemoryBytes(prompt, capacity, plan);
  }
  int64_t AvailableMemoryBytes() const override { return inner_->AvailableMemoryBytes(); }
  absl::Status TakeMemoryPool(int64_t bytes) override { return inner_->TakeMemoryPool(bytes); }

  bool lost() const { return steps_ >= decode_steps_; }

 private:
  // OK while the device works; counts one decode step when `decode`.
  absl::Status Step(bool decode);
  absl::Status LostStatus() const;

  std::unique_ptr<Backend> inner_;
  const int64_t decode_steps_;
  int64_t steps_ = 0;
};

}  // namespace tailorkv::runtime
