// Engine: a loaded model (weights on a backend, tokenizer, chat template)
// that runs generations and streams their text.
//
// Scheduling: Generate() may be called from many threads. One scheduler
// thread drives the backend (backends are single-threaded) in iterations:
// each iteration runs one decode step of every running generation, then one
// prefill chunk of a prompting one (round-robin, so a short prompt's first
// token does not wait for a long prompt's whole prefill). Up to max_running
// generations run at once, admitted in arrival order while the KV they need
// at their capacity fits kv_budget_bytes. Each generation's own Forward
// calls are the same as when it runs alone (same chunks, same steps), so
// its tokens are too. Chunks reach the caller through a bounded outbox
// (stream_outbox.h): a caller that stops reading holds back only its own
// generation, which is cut off after stream_stall_timeout.
#pragma once

#include <atomic>
#include <chrono>
#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "runtime/backend.h"
#include "runtime/sampler.h"
#include "runtime/stream_outbox.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"
#include "store/host_kv_store.h"
#include "store/remote_rows.h"

namespace tailorkv::runtime {

// Makes a GPU backend for the loaded weights; Unavailable when no device
// exists. The runtime library does not depend on CUDA: binaries built with
// the CUDA backend pass tailorkv::cuda's factory here.
using BackendFactory =
    std::function<absl::StatusOr<std::unique_ptr<Backend>>(const model::ModelWeights&)>;

// The backend a choice names: "cuda" (cuda_factory's, its error returned),
// "cpu", or "auto" (CUDA when cuda_factory makes one, the CPU backend when
// it answers Unavailable, i.e. no device; any other failure is returned).
// Without a cuda_factory, "cuda" is Unavailable. `threads`: CPU threads;
// `host_store`: the CPU backend's CpuBackendOptions::host_store (the CUDA
// factory takes its own); `remote_rows`: its remote_rows, which only the CPU
// backend has so far (InvalidArgument for any other choice).
absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(model::ModelWeights weights,
                                                       std::string_view choice,
                                                       const BackendFactory& cuda_factory,
                                                       int threads,
                                                       kvhost::HostKvStore* host_store = nullptr,
                                                       kvhost::RemoteRowStore* remote_rows = nullptr);

// Supplies the plan in place of EngineOptions::kv_plan (e.g. from the
// profiler): called with the loaded model's config and digest
// (Engine::model_digest()).
using KvPlanSource = std::function<absl::StatusOr<KvPlan>(const model::ModelConfig& config,
                                                          const std::string& model_digest)>;

struct EngineOptions {
  std::string model_path;       // a .gguf file or a safetensors directory
  std::string tokenizer_gguf;   // GGUF file to take the tokenizer from; default: model_path
  std::string backend = "auto"; // "auto" (CUDA when a device exists), "cpu", "cuda"
  // A GGUF model's linear weights: "quantized" (kept in their GGUF blocks,
  // model/quant_dot.h; the CPU backend multiplies them as they are, the CUDA
  // backend still takes a float copy made at load) or "float" (dequantized
  // to float32 at load: the CPU backend's exact-weights path, e.g. to compare
  // with Hugging Face). A safetensors model is float either way.
  std::string weights = "quantized";
  BackendFactory cuda_factory;  // empty: this binary has no CUDA backend
  int threads = 0;              // CPU threads; 0 = all cores
  // The sparse layers' host tiers on the CPU backend (CpuBackendOptions::
  // host_store): null = in the process; e.g. kv-host's client store. Not
  // owned. (The CUDA backend gets its store from cuda_factory.)
  kvhost::HostKvStore* host_store = nullptr;
  // Or on a remote kv-host node (CpuBackendOptions::remote_rows; CPU backend
  // only). Not owned.
  kvhost::RemoteRowStore* remote_rows = nullptr;
  int max_context = 0;          // 0 = the model's trained context
  // Prompts are prefilled this many tokens at a time, so a cancelled request
  // stops within one chunk rather than after the whole prompt. 0 = the
  // backend's preferred chunk (CPU 1024, CUDA its max_prefill_chunk).
  int prefill_chunk = 0;
  // How every sequence keeps its KV cache: a ParseKvPlanSpec spec ("dense",
  // "quant:1", "window:4:1020", "tailorkv:1:2", ...) or "@plan.json". Parsed
  // against the loaded model; Create fails with the parser's message when it
  // is bad, with FailedPrecondition when it names another model
  // (CheckPlanModel), and with Unimplemented when the backend cannot run it.
  std::string kv_plan = "dense";
  // When set, replaces kv_plan: called once in Create after the weights
  // load, before the backend takes them; its error fails Create unchanged.
  KvPlanSource kv_plan_source;
  // Generations that run at once (interleaved by the scheduler); more wait
  // in arrival order.
  int max_running = 4;
  // KV bytes the running generations may hold on the backend's own memory
  // (EstimateKvBytes' device tier at each one's capacity: prompt +
  // max_tokens); 0 = no limit. A generation waits until it fits; one that
  // could never fit is refused with ResourceExhausted saying so.
  int64_t kv_budget_bytes = 0;
  // With kv_budget_bytes 0 on a backend with a fixed memory pool (a GPU:
  // Backend::AvailableMemoryBytes), the budget is this fraction of the
  // memory free once the model is loaded, and each generation counts at
  // Backend::SequenceMemoryBytes (its KV and working buffers) instead, so
  // that admitted generations never run the device out of memory. In (0, 1].
  double kv_memory_fraction = 0.9;
  // Chunks a generation may have produced that its caller has not taken.
  int stream_buffer_chunks = 64;
  // A generation whose outbox stays full this long is cut off (its caller
  // stopped reading): it ends Aborted and `GenerationRequest::stalled` runs.
  absl::Duration stream_stall_timeout = absl::Seconds(10);
  // Called once, from the scheduler thread, when the backend reports a lost
  // device (IsDeviceLost, e.g. a sticky CUDA error): by then every
  // generation has ended Unavailable and Generate refuses new ones; the
  // process should stop serving and exit (a lost device does not come back
  // in-process). May be empty. Must not call into the engine.
  std::function<void(const absl::Status&)> on_device_lost;
  // Testing: after this many decode steps the backend behaves as a lost
  // device (DeviceLossInjector). 0: off.
  int64_t inject_device_loss_after_steps = 0;
};

// KV memory held by the sequences alive right now.
struct KvUsage {
  int sequences = 0;
  int64_t capacity_tokens = 0;        // summed over those sequences
  std::vector<LayerKvBytes> layers;   // per layer, summed (kind = the plan's)
};

struct GenerationRequest {
  std::vector<int32_t> prompt_tokens;  // already tokenized (chat template applied by the caller)
  SamplingParams sampling;
  int max_tokens = 128;                // >= 1; prompt + max_tokens <= context
  std::vector<std::string> stop;       // non-empty strings; generation ends before them
  bool ignore_eos = false;             // for benchmarks
  // Polled by the scheduler thread at each of its iterations while the
  // generation waits or runs: returning true stops it (it ends kCancelled;
  // one still waiting has no tokens). Must be
  // quick and must not call into the engine (read-only accessors aside).
  // May be empty.
  std::function<bool()> cancelled;
  // Called from the scheduler thread when the generation is cut off for a
  // caller that stopped reading (e.g. to cancel the RPC). May be empty.
  std::function<void()> stalled;
};

// One streamed piece: new token ids and the complete UTF-8 text they finished.
struct StreamChunk {
  std::vector<int32_t> token_ids;
  std::string text;
};

enum class FinishReason { kStop, kLength, kCancelled };
const char* FinishReasonName(FinishReason r);

struct GenerationResult {
  FinishReason finish_reason = FinishReason::kStop;
  int prompt_tokens = 0;
  int completion_tokens = 0;
  double prefill_ms = 0;  // includes the first token's logits
  double decode_ms = 0;   // the remaining tokens
};

class Engine {
 public:
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const EngineOptions& options);

  const model::ModelConfig& config() const { return backend_->config(); }
  const tokenizer::Tokenizer& tokenizer() const { return *tokenizer_; }
  const tokenizer::ChatTemplate& chat_template() const { return chat_template_; }
  std::string_view backend_name() const { return backend_->name(); }
  int max_context() const { return max_context_; }
  // "sha256:<hex>" of the model file (common/sha256.h), hashed at Create on
  // a thread of its own while the weights load; "" for a safetensors
  // directory. Plans that name a model are checked against it.
  const std::string& model_digest() const { return model_digest_; }

  // The plan that sequences starting now are made with (validated for this
  // model and backend). A copy: SetKvPlan may replace it at any time.
  KvPlan kv_plan() const;
  // Replaces the plan for generations submitted after it returns (queued
  // and running ones keep the plan they were submitted with). The plan is checked
  // first as at Create (Validate, CheckPlanModel, a one-token sequence on
  // the backend); on any error the current plan stays. Thread-safe.
  absl::Status SetKvPlan(KvPlan plan);
  // Bytes of one full-precision KV element on this backend: 4 (fp32) on the
  // CPU, 2 (bf16) on the GPU.
  int kv_elem_bytes() const { return kv_elem_bytes_; }
  // KV memory per layer that one sequence of max_context() tokens holds
  // under kv_plan(), computed (EstimateKvBytes), not allocated.
  std::vector<LayerKvBytes> KvBytesPerSequence() const;
  // KV memory of the running generations (SequenceState::kv_bytes()).
  // Thread-safe; may be called while Generate() runs.
  KvUsage KvInUse() const;

  // Validates `request` (InvalidArgument naming the field; ResourceExhausted
  // when its KV at capacity exceeds the whole kv_budget_bytes), then queues
  // it and streams its chunks. `on_chunk` is called from the calling thread;
  // returning false cancels (the result then says kCancelled). Text in
  // chunks never splits a UTF-8 character and never contains a stop string.
  absl::StatusOr<GenerationResult> Generate(
      const GenerationRequest& request,
      const std::function<bool(const StreamChunk&)>& on_chunk);

  // Generations running and waiting in the scheduler now.
  struct SchedulerLoad {
    int running = 0;
    int waiting = 0;
    int64_t kv_budget_bytes = 0;
    int64_t kv_admitted_bytes = 0;  // the running generations' estimate
  };
  SchedulerLoad scheduler_load() const;
  // Generations run at once: EngineOptions::max_running, or fewer where the
  // backend steps fewer sequences in turn (Backend::max_interleaved_sequences).
  int max_running() const { return max_running_; }

  // OK while the backend's device works; once it is lost, the status that
  // said so (IsDeviceLost), and the engine serves nothing more.
  absl::Status device_status() const;

  // Stops the scheduler; generations still queued or running end
  // Unavailable ("engine shutting down").
  ~Engine();

  // Exposed for tests and benchmarks; not for use while Generate() runs.
  Backend& backend() { return *backend_; }

 private:
  Engine() = default;
  class LiveSequence;  // adds a sequence's KV to kv_in_use_ for its lifetime
  struct Job;          // one generation: its request, sequence, decoding state and outbox
  void SchedulerLoop();
  // One iteration over the running jobs; false when none could move (all
  // held back by full outboxes). Runs on the scheduler thread, under mu_.
  bool Iterate(std::vector<std::shared_ptr<Job>>& running) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Starts what fits, in arrival order. Under mu_.
  void Admit(std::vector<std::shared_ptr<Job>>& running) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Samples the token the last Forward's logits give, streams it; marks the
  // job finished when it ends.
  // `picked` >= 0: the token the backend picked (greedy); else sampled
  // from job.logits.
  void EmitToken(Job& job, int32_t picked = -1);
  void Finish(Job& job, absl::StatusOr<GenerationResult> outcome);
  // Frees a finished generation's sequence: on another thread where the
  // backend allows it (Backend::ConcurrentSequenceLifetime), else here.
  void ReleaseSequence(std::unique_ptr<SequenceState> seq);
  // A failed backend call's status as the generation should end with: a
  // lost device is recorded (the scheduler then ends everything) and ends
  // it Unavailable; any other status unchanged. Scheduler thread.
  absl::Status BackendFailure(const absl::Status& s);
  // ResourceExhausted "host memory exhausted: ... <what>" for a backend call
  // that threw std::bad_alloc.
  template <typename... Args>
  static absl::Status HostMemoryExhausted(const absl::FormatSpec<Args...>& what, const Args&... args);
  // Backend::NewSequence, with std::bad_alloc as ResourceExhausted (so the
  // scheduler waits for memory while others run, or refuses the request).
  absl::StatusOr<std::unique_ptr<SequenceState>> NewSequenceOrExhausted(int capacity, const Job& job);
  // After a lost device: ends every running and waiting generation and
  // tells EngineOptions::on_device_lost. Scheduler thread, once.
  void FailAllAfterDeviceLoss(std::vector<std::shared_ptr<Job>>& running) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Wake();
  int64_t JobKvBytes(int prompt, int capacity, const KvPlan& plan) const;
  // Makes a capacity-1 sequence with `plan`: fails when the backend cannot
  // run it. Callers hold mu_ (or own the engine alone, in Create).
  absl::Status ProbeKvPlan(const KvPlan& plan);
  std::shared_ptr<const KvPlan> plan_snapshot() const;

  absl::Mutex mu_;  // the backend is single-threaded: the scheduler's steps and plan probes
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<tokenizer::Tokenizer> tokenizer_;
  tokenizer::ChatTemplate chat_template_;
  int max_context_ = 0;
  int prefill_chunk_ = 1024;
  std::string model_digest_;
  int kv_elem_bytes_ = 4;

  // Its own mutex: readers (GetModelInfo) must not wait for a generation.
  mutable absl::Mutex plan_mu_;
  std::shared_ptr<const KvPlan> kv_plan_ ABSL_GUARDED_BY(plan_mu_);

  mutable absl::Mutex kv_mu_;  // separate from mu_: GetLoad must not wait for a generation
  KvUsage kv_in_use_ ABSL_GUARDED_BY(kv_mu_);

  int max_running_ = 4;
  int64_t kv_budget_bytes_ = 0;
  int stream_buffer_chunks_ = 64;
  absl::Duration stream_stall_timeout_ = absl::Seconds(10);
  mutable absl::Mutex sched_mu_;
  absl::CondVar sched_cv_;
  std::deque<std::shared_ptr<Job>> waiting_ ABSL_GUARDED_BY(sched_mu_);
  bool wake_ ABSL_GUARDED_BY(sched_mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(sched_mu_) = false;
  int running_count_ ABSL_GUARDED_BY(sched_mu_) = 0;
  absl::Status device_lost_ ABSL_GUARDED_BY(sched_mu_);  // OK until the device is lost
  // Scheduler thread only: the lost device's status, until handled.
  absl::Status pending_device_loss_;
  bool device_loss_handled_ = false;
  std::function<void(const absl::Status&)> on_device_lost_;
  int64_t admitted_bytes_ ABSL_GUARDED_BY(sched_mu_) = 0;
  // Scheduler thread only: after a ResourceExhausted NewSequence with this
  // many running, Admit waits for fewer or for the time (0: not blocked).
  int admit_blocked_running_ = 0;
  std::vector<float> batch_logits_;  // a decode batch's logits, reused across steps
  std::chrono::steady_clock::time_point admit_retry_after_{};
  // Scheduler thread only: an admission whose NewSequence runs on another
  // thread (Backend::ConcurrentSequenceLifetime): its job, still waiting_'s
  // front, and the sequence to come. The thread wakes the scheduler.
  std::shared_ptr<Job> admitting_;
  std::future<absl::StatusOr<std::unique_ptr<SequenceState>>> admitting_seq_;
  // Scheduler thread only: sequences being freed on other threads
  // (ReleaseSequence), waited for at shutdown.
  std::vector<std::future<void>> releases_;
  std::thread scheduler_;  // last: started at the end of Create
};

}  // namespace tailorkv::runtime
