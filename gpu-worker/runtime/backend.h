// Backend: the interface every compute backend (CPU now, CUDA next) implements.
//
// A backend owns the model weights in its own memory and creates one
// SequenceState (KV cache and positions) per sequence. Forward() appends a
// run of tokens to a sequence and produces logits. Backends are not required
// to be thread-safe: the engine drives one backend from one thread.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "model/llama_weights.h"
#include "runtime/kv_plan.h"

namespace tailorkv::runtime {

// KV cache and position of one sequence; owned by the caller, created by and
// only usable with the backend that made it (which must outlive it).
class SequenceState {
 public:
  virtual ~SequenceState() = default;
  virtual int length() const = 0;    // tokens already in the cache
  virtual int capacity() const = 0;  // tokens the cache can hold
  // Drops cached tokens after the first n (n <= length()). Layers whose
  // policy cannot forget (quant, window) answer by keeping what they hold;
  // only dense sequences may be truncated and then extended.
  virtual void Truncate(int n) = 0;
  // The plan the sequence was made with.
  virtual const KvPlan& plan() const = 0;
  // KV memory held per layer, by tier (what was allocated for `capacity`).
  virtual std::vector<LayerKvBytes> kv_bytes() const = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string_view name() const = 0;
  virtual const model::ModelConfig& config() const = 0;

  // A sequence whose cache holds up to `capacity` tokens, each layer kept as
  // `plan` says. InvalidArgument when capacity is not in [1,
  // config().max_context] or the plan does not fit the model; Unimplemented
  // for a policy this backend lacks.
  virtual absl::StatusOr<std::unique_ptr<SequenceState>> NewSequence(int capacity,
                                                                     const KvPlan& plan) = 0;
  // The same with every layer dense.
  absl::StatusOr<std::unique_ptr<SequenceState>> NewSequence(int capacity) {
    return NewSequence(capacity, KvPlan::Dense(config().n_layers));
  }

  // What a Forward call is: a prefill chunk (part of the prompt) or a decode
  // step (one token after the prompt). kAuto infers it from the call (one
  // token with length() > 0 is a decode step), which misreads a prompt whose
  // last chunk holds one token: callers that split a prompt pass kPrefill.
  enum class Mode { kAuto, kPrefill, kDecode };

  // Runs `tokens` at positions [seq.length(), seq.length() + n), appending
  // their K/V to `seq`. Writes logits row-major into `logits`: n x vocab when
  // `all_logits`, else only the last token's vocab entries.
  // Non-dense layers: a decode step (quant: append as QuantKvCpu::Append,
  // then fused attention over codes + residual; window: attend over the
  // sink and the recent ring; sparse: ends the prompt at its first step,
  // then Top-K). A prefill chunk (any n, one token too) has its queries
  // attend causally over [history as stored (quant: dequantized + exact
  // residual; window: the kept tokens in position order) | the chunk in
  // full precision], then the store is updated (quant: Pack). So a one-shot
  // prefill attends in full precision; later chunks of a chunked prefill see
  // the compressed history. InvalidArgument for empty input, ids outside the
  // vocabulary, overflowing the sequence's capacity, or kDecode with n != 1
  // or an empty sequence (then `seq` is unchanged).
  virtual absl::Status Forward(SequenceState& seq, absl::Span<const int32_t> tokens,
                               bool all_logits, std::vector<float>* logits, Mode mode) = 0;
  absl::Status Forward(SequenceState& seq, absl::Span<const int32_t> tokens, bool all_logits,
                       std::vector<float>* logits) {
    return Forward(seq, tokens, all_logits, logits, Mode::kAuto);
  }
  // kAuto resolved for `seq` before the call: true for a decode step.
  static bool IsDecode(const SequenceState& seq, absl::Span<const int32_t> tokens, Mode mode) {
    return mode == Mode::kDecode ||
           (mode == Mode::kAuto && tokens.size() == 1 && seq.length() > 0);
  }

  // Forward() that also shows the caller, once per layer right after that
  // layer's attention, its post-RoPE queries of the last `tap_queries` tokens
  // of this call and every cached key and value (the profiler's view,
  // LayerTap below). Only for sequences whose layers are all dense. A
  // non-OK status from `observer` stops the call and is returned; the
  // sequence is then unusable (the caller discards it). Logits are not
  // computed. InvalidArgument as Forward(), or when tap_queries is not in
  // [1, tokens.size()] or a layer is not dense; Unimplemented where the
  // backend has no taps.
  struct LayerTap {
    int layer = 0;
    int n_keys = 0;          // keys and values at positions [0, n_keys)
    int first_query = 0;     // position of query row 0
    int n_queries = 0;       // rows of q: positions [first_query, first_query + n_queries)
    const float* q = nullptr;  // [n_queries][n_heads][head_dim]
    const float* k = nullptr;  // [n_kv_heads][kv_head_stride / head_dim rows][head_dim]
    const float* v = nullptr;  // same layout as k
    int64_t kv_head_stride = 0;  // floats between KV heads in k and v
  };
  using LayerObserver = std::function<absl::Status(const LayerTap&)>;
  virtual absl::Status ForwardObserved(SequenceState& seq, absl::Span<const int32_t> tokens,
                                       int tap_queries, const LayerObserver& observer);

  // One decode step of each of `seqs` (distinct sequences, each past its
  // prompt) with tokens[b]; logits row b (vocab floats) is seqs[b]'s. A
  // sequence's logits do not depend on the others in the batch nor on its
  // size (so a generation's tokens are the same alone or batched), but may
  // differ in the last bits from Forward()'s decode step. Checks as
  // Forward(kDecode) per sequence (InvalidArgument naming it) before any
  // work. Default: Forward() for each in turn; the CPU backend runs the
  // linear layers once over the batch (one pass over the weights).
  virtual absl::Status DecodeBatch(absl::Span<SequenceState* const> seqs, absl::Span<const int32_t> tokens,
                                   std::vector<float>* logits);
  // DecodeBatch that keeps one sequence's failure from failing the others
  // (a remote host tier's node going away affects its own sequences):
  // per_seq[b] is seqs[b]'s status, and only rows whose status is OK hold
  // logits. The returned status is for the batch as a whole (bad input).
  // Default: DecodeBatch, its status copied to every sequence.
  virtual absl::Status DecodeBatchIsolated(absl::Span<SequenceState* const> seqs, absl::Span<const int32_t> tokens,
                                           std::vector<float>* logits, std::vector<absl::Status>* per_seq);

  // What DecodeBatchPick may choose on the backend's own device for one
  // sequence: its greedy token (runtime::GreedyPick: the repetition penalty
  // over `history`, the tokens seen so far, then the largest logit).
  struct GreedyPickRequest {
    bool pick = false;  // false: the caller samples from the logits row
    float repetition_penalty = 1.0f;
    absl::Span<const int32_t> history;
  };
  // DecodeBatchIsolated that also picks the greedy tokens, so that a
  // backend with a device picks them there and only token ids come back:
  // (*picked)[b] = GreedyPick of seqs[b]'s logits where greedy[b].pick and
  // per_seq[b] is OK, else -1; logits row b is filled where picked[b] is -1
  // (it may be left unfilled where a token was picked). Statuses as
  // DecodeBatchIsolated's; greedy.size() must equal seqs.size()
  // (InvalidArgument naming it). Default: DecodeBatchIsolated, then
  // GreedyPick on the host.
  virtual absl::Status DecodeBatchPick(absl::Span<SequenceState* const> seqs, absl::Span<const int32_t> tokens,
                                       absl::Span<const GreedyPickRequest> greedy, std::vector<float>* logits,
                                       std::vector<int32_t>* picked, std::vector<absl::Status>* per_seq);

  // How many sequences the engine may step in turn (their calls
  // interleaved); the engine runs at most this many generations at once.
  virtual int max_interleaved_sequences() const { return 1 << 20; }

  // Tokens per Forward call that keep prefill efficient on this backend
  // while bounding the time between cancellation checks.
  virtual int preferred_prefill_chunk() const { return 1024; }

  // The most memory of the backend's own (device memory on a GPU) that a
  // sequence of `capacity` tokens, `prompt` of them its prompt, takes under
  // `plan` at any point of its life: its KV and its working buffers (an
  // upper bound; the engine admits generations while these fit its budget).
  // Default: EstimateKvBytes' device tier at 4 bytes a value (the CPU
  // backend's fp32 cache, which has no other per-sequence buffers).
  virtual int64_t SequenceMemoryBytes(int prompt, int capacity, const KvPlan& plan) const;
  // Memory the backend could still give to sequences now (free device
  // memory on a GPU); 0 = no fixed pool (the CPU backend's host memory).
  virtual int64_t AvailableMemoryBytes() const { return 0; }
  // Whether NewSequence, and destroying a sequence, may run on another
  // thread while this backend steps other sequences (the engine then
  // reserves and frees a sequence's memory, e.g. its host tier in kv-host,
  // off the scheduler thread, so a slow or frozen kv-host does not pause the
  // generations running). Default: no.
  virtual bool ConcurrentSequenceLifetime() const { return false; }
  // Takes `bytes` of that memory once, for the sequences made from now on,
  // so that nothing else on the device can take what the engine's budget
  // promises (a GPU: a pool of device memory that sequences are carved
  // from; a sequence then fails with ResourceExhausted when the pool has no
  // room, never by growing it). Default: nothing to take (OK).
  // ResourceExhausted when that much is not free; FailedPrecondition when
  // already taken.
  virtual absl::Status TakeMemoryPool(int64_t /*bytes*/) { return absl::OkStatus(); }
};

// A lost device: the backend's device can no longer run anything (a sticky
// CUDA error such as an illegal address or an uncorrectable ECC error
// corrupts the context: every later call fails the same way). Any backend
// call may return such a status; the engine then fails every generation
// with Unavailable, refuses new ones and reports it
// (EngineOptions::on_device_lost), and the worker goes NOT_SERVING and exits
// for its supervisor to restart it, rather than answering SERVING with a
// device that fails every request. The mark is a payload on the status, so
// the code and message stay what the backend chose.
absl::Status MarkDeviceLost(absl::Status status);
bool IsDeviceLost(const absl::Status& status);

// The checks every Backend::Forward makes before touching `seq`: non-empty
// input, ids inside the vocabulary, room left in the sequence, and for
// kDecode one token after the prompt.
absl::Status ValidateForwardInput(const model::ModelConfig& config, const SequenceState& seq,
                                  absl::Span<const int32_t> tokens,
                                  Backend::Mode mode = Backend::Mode::kAuto);
// ValidateForwardInput plus ForwardObserved's own checks (tap_queries in
// range, every layer dense).
absl::Status ValidateObservedForward(const model::ModelConfig& config, const SequenceState& seq,
                                     absl::Span<const int32_t> tokens, int tap_queries);

}  // namespace tailorkv::runtime
