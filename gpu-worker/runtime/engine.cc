#include "runtime/engine.h"

#include "runtime/device_loss_injector.h"

#include <algorithm>
#include <exception>
#include <new>
#include <chrono>
#include <filesystem>
#include <optional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/sha256.h"
#include "common/status_macros.h"
#include "model/gguf_file.h"
#include "runtime/cpu_backend.h"
#include "spdlog/spdlog.h"

namespace tailorkv::runtime {
namespace {

using Clock = std::chrono::steady_clock;

double MsSince(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// Length of the longest suffix of `text` that is a proper prefix of a stop
// string: that much must be held back, since the next token may complete it.
size_t HeldBackForStops(std::string_view text, const std::vector<std::string>& stops) {
  size_t hold = 0;
  for (const std::string& stop : stops) {
    const size_t max_len = std::min(text.size(), stop.size() - 1);
    for (size_t len = max_len; len > hold; --len) {
      if (text.substr(text.size() - len) == std::string_view(stop).substr(0, len)) {
        hold = len;
        break;
      }
    }
  }
  return hold;
}

// Hashes the model file on its own thread while the weights load (both read
// the whole file; an 8B GGUF takes seconds). Destroying the task before
// Get() cancels the hash at the next 4 MiB block: Create failed early.
class DigestTask {
 public:
  explicit DigestTask(std::string path) : path_(std::move(path)), thread_([this] { Run(); }) {}
  ~DigestTask() {
    cancel_.store(true);
    if (thread_.joinable()) thread_.join();
  }
  DigestTask(const DigestTask&) = delete;
  DigestTask& operator=(const DigestTask&) = delete;

  absl::StatusOr<std::string> Get() {
    if (thread_.joinable()) thread_.join();
    return result_;
  }

 private:
  void Run() {
    const auto t0 = Clock::now();
    int logged_tenths = 0;
    result_ = common::Sha256File(path_, [&](int64_t done, int64_t total) -> absl::Status {
      if (cancel_.load()) return absl::CancelledError("model digest: cancelled");
      // Progress only where it takes long enough to wonder (>= 1 GiB).
      const int tenths = total > 0 ? static_cast<int>(done * 10 / total) : 10;
      if (total >= (int64_t{1} << 30) && tenths > logged_tenths && tenths < 10) {
        logged_tenths = tenths;
        spdlog::info("model digest: {}% of {:.1f} GiB", tenths * 10, total / 1073741824.0);
      }
      return absl::OkStatus();
    });
    if (result_.ok()) spdlog::info("model digest {} in {:.0f} ms", *result_, MsSince(t0));
  }

  const std::string path_;
  std::atomic<bool> cancel_{false};
  absl::StatusOr<std::string> result_ = absl::UnknownError("model digest: not computed");
  std::thread thread_;  // last: starts once the members above exist
};

// Position of the earliest stop string in `text`, or npos.
size_t FindStop(std::string_view text, const std::vector<std::string>& stops) {
  size_t best = std::string_view::npos;
  for (const std::string& stop : stops) best = std::min(best, text.find(stop));
  return best;
}

}  // namespace

// Keeps a live sequence's KV bytes in the engine's usage totals.
class Engine::LiveSequence {
 public:
  LiveSequence(Engine& engine, const SequenceState& seq)
      : engine_(engine), bytes_(seq.kv_bytes()), capacity_(seq.capacity()) {
    Apply(+1);
  }
  ~LiveSequence() { Apply(-1); }
  // Takes the sequence's current bytes (sparse layers reserve their selected
  // and generated rows when the prompt ends, at the first decode step).
  void Refresh(const SequenceState& seq) {
    std::vector<LayerKvBytes> now = seq.kv_bytes();
    absl::MutexLock lock(&engine_.kv_mu_);
    KvUsage& u = engine_.kv_in_use_;
    for (size_t i = 0; i < now.size() && i < bytes_.size() && i < u.layers.size(); ++i) {
      u.layers[i].device_bytes += now[i].device_bytes - bytes_[i].device_bytes;
      u.layers[i].host_bytes += now[i].host_bytes - bytes_[i].host_bytes;
    }
    bytes_ = std::move(now);
  }
  LiveSequence(const LiveSequence&) = delete;
  LiveSequence& operator=(const LiveSequence&) = delete;

 private:
  void Apply(int sign) {
    absl::MutexLock lock(&engine_.kv_mu_);
    KvUsage& u = engine_.kv_in_use_;
    u.sequences += sign;
    u.capacity_tokens += sign * static_cast<int64_t>(capacity_);
    if (u.layers.size() < bytes_.size()) u.layers.resize(bytes_.size());
    for (size_t i = 0; i < bytes_.size(); ++i) {
      u.layers[i].kind = bytes_[i].kind;
      u.layers[i].device_bytes += sign * bytes_[i].device_bytes;
      u.layers[i].host_bytes += sign * bytes_[i].host_bytes;
    }
  }
  Engine& engine_;
  std::vector<LayerKvBytes> bytes_;
  const int capacity_;
};

const char* FinishReasonName(FinishReason r) {
  switch (r) {
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kCancelled: return "cancelled";
  }
  return "unknown";
}

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(model::ModelWeights weights,
                                                       std::string_view choice,
                                                       const BackendFactory& cuda_factory,
                                                       int threads, kvhost::HostKvStore* host_store,
                                                       kvhost::RemoteRowStore* remote_rows) {
  if (remote_rows != nullptr && choice != "cpu") {
    return absl::InvalidArgumentError(absl::StrCat(
        "backend '", std::string(choice), "': a remote host tier runs on the CPU backend only so far (backend cpu)"));
  }
  if (choice == "cuda" && !cuda_factory) {
    return absl::UnavailableError("backend 'cuda': this build has no CUDA backend");
  }
  if (choice != "cpu" && cuda_factory) {
    // The CUDA backend uploads float weights (bf16 on the device): a float
    // copy of the quantized tensors for it, made only when it is tried.
    absl::StatusOr<std::unique_ptr<Backend>> gpu;
    if (weights.QuantizedTensors() > 0) {
      model::ModelWeights floats = weights;
      RETURN_IF_ERROR(floats.Dequantize());
      gpu = cuda_factory(floats);
    } else {
      gpu = cuda_factory(weights);
    }
    if (gpu.ok()) return gpu;
    if (choice == "cuda" || !absl::IsUnavailable(gpu.status())) {
      return gpu.status();  // asked for CUDA, or a device exists but failed
    }
    spdlog::info("no CUDA device ({}); using the CPU backend", std::string(gpu.status().message()));
  }
  CpuBackendOptions cpu;
  cpu.threads = threads;
  cpu.host_store = host_store;
  cpu.remote_rows = remote_rows;
  return CreateCpuBackend(std::move(weights), cpu);
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const EngineOptions& options) {
  if (options.backend != "auto" && options.backend != "cpu" && options.backend != "cuda") {
    return absl::InvalidArgumentError(
        absl::StrFormat("backend must be auto, cpu or cuda, got '%s'", options.backend));
  }
  if (options.backend == "cuda" && !options.cuda_factory) {
    return absl::UnavailableError("backend 'cuda': this build has no CUDA backend");
  }
  std::error_code ec;
  const bool is_dir = std::filesystem::is_directory(options.model_path, ec);
  const std::string tokenizer_path =
      options.tokenizer_gguf.empty() ? options.model_path : options.tokenizer_gguf;
  if (is_dir && options.tokenizer_gguf.empty()) {
    return absl::InvalidArgumentError(
        "tokenizer_gguf: a safetensors model directory needs a GGUF file to take the tokenizer from");
  }

  auto engine = std::unique_ptr<Engine>(new Engine());
  const auto t0 = Clock::now();
  std::unique_ptr<DigestTask> digest;
  if (!is_dir) digest = std::make_unique<DigestTask>(options.model_path);
  spdlog::info("loading model {}", options.model_path);
  model::ModelWeights weights;
  if (options.weights != "float" && options.weights != "quantized") {
    return absl::InvalidArgumentError(
        absl::StrFormat("weights must be float or quantized, got '%s'", options.weights));
  }
  std::shared_ptr<model::GgufFile> tokenizer_file;
  if (is_dir) {
    ASSIGN_OR_RETURN(weights, model::LoadWeightsFromSafetensors(options.model_path));
    ASSIGN_OR_RETURN(tokenizer_file, model::GgufFile::Open(tokenizer_path));
  } else {
    ASSIGN_OR_RETURN(tokenizer_file, model::GgufFile::Open(options.model_path));
    ASSIGN_OR_RETURN(weights, model::LoadWeightsFromGguf(tokenizer_file,
                                                         {.keep_quantized = options.weights == "quantized"}));
    if (options.weights == "quantized") {
      spdlog::info("weights: {} tensors kept quantized (GGUF blocks), the rest float32", weights.QuantizedTensors());
    }
  }
  ASSIGN_OR_RETURN(auto spec, tokenizer::TokenizerSpecFromGguf(*tokenizer_file));
  const std::string chat_source = spec.chat_template;
  ASSIGN_OR_RETURN(engine->tokenizer_, tokenizer::Tokenizer::Create(std::move(spec)));
  ASSIGN_OR_RETURN(engine->chat_template_, tokenizer::ChatTemplate::FromSource(chat_source));
  if (engine->tokenizer_->vocab_size() > weights.config.vocab) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: tokenizer has %d tokens but the model's vocabulary is %d", tokenizer_path,
        engine->tokenizer_->vocab_size(), weights.config.vocab));
  }
  const int trained = weights.config.max_context;
  if (options.max_context < 0 || options.max_context > trained) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "max_context must be in [0, %d] (0 = trained context), got %d", trained, options.max_context));
  }
  engine->max_context_ = options.max_context > 0 ? options.max_context : trained;
  if (options.prefill_chunk < 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "prefill_chunk must be >= 0 (0 = the backend's choice), got %d", options.prefill_chunk));
  }
  // The plan is checked before the backend takes the weights: a typo fails fast.
  KvPlan plan;
  if (!options.kv_plan_source) {
    ASSIGN_OR_RETURN(plan, ParseKvPlanSpec(options.kv_plan, weights.config));
  }
  if (digest != nullptr) {
    ASSIGN_OR_RETURN(engine->model_digest_, digest->Get());
  } else {
    spdlog::info("no model digest: {} is a directory (plans naming a model cannot be used)",
                 options.model_path);
  }
  if (options.kv_plan_source) {
    ASSIGN_OR_RETURN(plan, options.kv_plan_source(weights.config, engine->model_digest_));
  }
  RETURN_IF_ERROR(CheckPlanModel(plan, engine->model_digest_));
  ASSIGN_OR_RETURN(engine->backend_, CreateBackend(std::move(weights), options.backend,
                                                   options.cuda_factory, options.threads, options.host_store,
                                                   options.remote_rows));
  if (options.inject_device_loss_after_steps < 0) {
    return absl::InvalidArgumentError(absl::StrFormat("inject_device_loss_after_steps must be >= 0, got %d",
                                                      options.inject_device_loss_after_steps));
  }
  if (options.inject_device_loss_after_steps > 0) {
    spdlog::warn("testing: the backend will behave as a lost device after {} decode steps",
                 options.inject_device_loss_after_steps);
    engine->backend_ =
        std::make_unique<DeviceLossInjector>(std::move(engine->backend_), options.inject_device_loss_after_steps);
  }
  engine->on_device_lost_ = options.on_device_lost;
  if (options.max_running < 1) {
    return absl::InvalidArgumentError(absl::StrFormat("max_running must be >= 1, got %d", options.max_running));
  }
  if (options.kv_budget_bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("kv_budget_bytes must be >= 0 (0 = no limit), got %d", options.kv_budget_bytes));
  }
  if (options.stream_buffer_chunks < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("stream_buffer_chunks must be >= 1, got %d", options.stream_buffer_chunks));
  }
  if (options.stream_stall_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("stream_stall_timeout must be > 0");
  }
  if (!(options.kv_memory_fraction > 0 && options.kv_memory_fraction <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("kv_memory_fraction must be in (0, 1], got %g", options.kv_memory_fraction));
  }
  engine->max_running_ = options.max_running;
  engine->kv_budget_bytes_ = options.kv_budget_bytes;
  engine->stream_buffer_chunks_ = options.stream_buffer_chunks;
  engine->stream_stall_timeout_ = options.stream_stall_timeout;
  engine->prefill_chunk_ = options.prefill_chunk > 0
                              ? options.prefill_chunk
                              : engine->backend_->preferred_prefill_chunk();
  // The CPU backend keeps K/V in fp32; the GPU backends in bf16.
  engine->kv_elem_bytes_ = engine->backend_->name() == "cpu" ? 4 : 2;
  RETURN_IF_ERROR(engine->ProbeKvPlan(plan));
  if (engine->kv_budget_bytes_ == 0) {
    const int64_t available = engine->backend_->AvailableMemoryBytes();
    if (available > 0) {
      engine->kv_budget_bytes_ = static_cast<int64_t>(options.kv_memory_fraction * available);
      spdlog::info("KV budget: {:.0f}% of the {:.1f} GiB of {} memory free after loading",
                   100 * options.kv_memory_fraction, available / 1073741824.0, engine->backend_->name());
    }
  }
  if (engine->kv_budget_bytes_ > 0) {
    // The budget's memory, taken now (a GPU: the sequences' pool).
    if (absl::Status s = engine->backend_->TakeMemoryPool(engine->kv_budget_bytes_); !s.ok()) {
      if (absl::IsResourceExhausted(s)) {
        return absl::Status(s.code(), absl::StrFormat("KV budget of %.1f MiB: %s",
                                                      engine->kv_budget_bytes_ / 1048576.0, s.message()));
      }
      // A driver without memory pools: sequences allocate as they start
      // (the budget still bounds them).
      spdlog::warn("KV budget: no memory pool ({}); sequences allocate as they start", s.ToString());
    }
  }
  {
    absl::MutexLock lock(&engine->plan_mu_);
    engine->kv_plan_ = std::make_shared<const KvPlan>(std::move(plan));
  }
  spdlog::info("model loaded in {:.0f} ms: {} layers, hidden {}, backend {}", MsSince(t0),
               engine->config().n_layers, engine->config().hidden, engine->backend_name());
  if (const model::RopeScaling& rs = engine->config().rope_scaling;
      rs.type != model::RopeScaling::Type::kNone || !rs.freq_factors.empty()) {
    spdlog::info("RoPE scaling: {}{}", rs.freq_factors.empty() ? "" : "per-frequency factors (rope_freqs.weight)",
                 rs.type == model::RopeScaling::Type::kLinear   ? absl::StrCat(" linear x", rs.factor)
                 : rs.type == model::RopeScaling::Type::kLlama3 ? absl::StrCat("llama3 x", rs.factor)
                                                                : std::string());
  }
  int64_t per_sequence = 0;
  for (const LayerKvBytes& b : engine->KvBytesPerSequence()) per_sequence += b.total();
  const KvPlan& p = *engine->plan_snapshot();
  spdlog::info("kv plan '{}': {}; {:.1f} MiB of KV per {}-token sequence", p.name, p.Summary(),
               per_sequence / 1048576.0, engine->max_context_);
  if (engine->backend_->max_interleaved_sequences() < engine->max_running_) {
    engine->max_running_ = engine->backend_->max_interleaved_sequences();
    spdlog::warn("scheduler: the {} backend steps at most {} sequence(s) in turn: max_running {} -> {}",
                 engine->backend_->name(), engine->max_running_, options.max_running, engine->max_running_);
  }
  spdlog::info("scheduler: up to {} generations at once, KV budget {}", engine->max_running_,
               engine->kv_budget_bytes_ > 0 ? absl::StrFormat("%.1f MiB", engine->kv_budget_bytes_ / 1048576.0)
                                            : std::string("unlimited"));
  Engine* e = engine.get();
  engine->scheduler_ = std::thread([e] { e->SchedulerLoop(); });
  return engine;
}

std::shared_ptr<const KvPlan> Engine::plan_snapshot() const {
  absl::MutexLock lock(&plan_mu_);
  return kv_plan_;
}

KvPlan Engine::kv_plan() const { return *plan_snapshot(); }

absl::Status Engine::SetKvPlan(KvPlan plan) {
  RETURN_IF_ERROR(plan.Validate(config()));
  RETURN_IF_ERROR(CheckPlanModel(plan, model_digest_));
  absl::MutexLock lock(&mu_);  // the backend is single-threaded; also waits out a generation
  RETURN_IF_ERROR(ProbeKvPlan(plan));
  absl::MutexLock plan_lock(&plan_mu_);
  kv_plan_ = std::make_shared<const KvPlan>(std::move(plan));
  return absl::OkStatus();
}

absl::Status Engine::ProbeKvPlan(const KvPlan& plan) {
  // A one-token sequence proves the backend can run the plan before any
  // request arrives, and is cheap whatever the plan.
  auto probe = backend_->NewSequence(1, plan);
  if (!probe.ok() && absl::IsResourceExhausted(probe.status())) {
    // The plan runs here; memory (e.g. kv-host's budget, held by other
    // workers) is short right now: requests wait for it or are refused then.
    spdlog::warn("kv plan '{}': no memory for a probe sequence now ({}); accepted", plan.name,
                 std::string(probe.status().message()));
    return absl::OkStatus();
  }
  if (!probe.ok()) {
    return absl::Status(
        probe.status().code(),
        absl::StrFormat("kv plan '%s' (%s): the %s backend cannot run it: %s", plan.name,
                        plan.Summary(), backend_->name(), probe.status().message()));
  }
  // The estimate must describe what the backend allocates; a mismatch is a
  // bug in one of them, worth a warning rather than a refusal to serve.
  const std::vector<LayerKvBytes> held = (*probe)->kv_bytes();
  const std::vector<LayerKvBytes> estimate = EstimateKvBytes(plan, config(), 1, kv_elem_bytes_);
  for (size_t i = 0; i < held.size() && i < estimate.size(); ++i) {
    if (held[i].device_bytes != estimate[i].device_bytes ||
        held[i].host_bytes != estimate[i].host_bytes) {
      spdlog::warn("kv bytes of layer {} ({}): backend holds {}+{}, estimate says {}+{}", i,
                   KvPolicyName(held[i].kind), held[i].device_bytes, held[i].host_bytes,
                   estimate[i].device_bytes, estimate[i].host_bytes);
      break;
    }
  }
  return absl::OkStatus();
}

std::vector<LayerKvBytes> Engine::KvBytesPerSequence() const {
  return EstimateKvBytes(*plan_snapshot(), config(), max_context_, kv_elem_bytes_);
}

KvUsage Engine::KvInUse() const {
  KvUsage u;
  {
    absl::MutexLock lock(&kv_mu_);
    u = kv_in_use_;
  }
  if (u.layers.empty()) {
    const std::shared_ptr<const KvPlan> plan = plan_snapshot();
    u.layers.resize(plan->layers.size());
    for (size_t i = 0; i < u.layers.size(); ++i) u.layers[i].kind = plan->layers[i].kind;
  }
  return u;
}

// One generation, from submission to its outcome. The scheduler thread owns
// everything but the outbox and `stop` (the consumer's side).
struct Engine::Job {
  Job(const GenerationRequest& r, int outbox_chunks, std::function<void()> wake, const tokenizer::Tokenizer& tok)
      : request(r), outbox(outbox_chunks, std::move(wake)), sampler(r.sampling), detok(tok), history(r.prompt_tokens) {}
  const GenerationRequest request;
  StreamOutbox<StreamChunk, absl::StatusOr<GenerationResult>> outbox;
  std::atomic<bool> stop{false};  // the consumer's on_chunk said stop

  // Scheduler thread only.
  int64_t kv_bytes = 0;  // counted in admitted_bytes_ while running
  std::shared_ptr<const KvPlan> plan;
  std::unique_ptr<SequenceState> seq;
  std::unique_ptr<LiveSequence> live;
  Sampler sampler;
  tokenizer::StreamingDetokenizer detok;
  std::vector<int32_t> history;
  std::vector<float> logits;
  std::string pending;  // complete UTF-8 not yet streamed (may start a stop string)
  int prefilled = 0;    // prompt tokens in the cache
  int step = 0;         // tokens generated
  bool done = false;
  GenerationResult result;
  Clock::time_point t0;
};

int64_t Engine::JobKvBytes(int prompt, int capacity, const KvPlan& plan) const {
  return backend_->SequenceMemoryBytes(prompt, capacity, plan);
}

Engine::SchedulerLoad Engine::scheduler_load() const {
  absl::MutexLock lock(&sched_mu_);
  return {.running = running_count_,
          .waiting = static_cast<int>(waiting_.size()),
          .kv_budget_bytes = kv_budget_bytes_,
          .kv_admitted_bytes = admitted_bytes_};
}

void Engine::Wake() {
  absl::MutexLock lock(&sched_mu_);
  wake_ = true;
  sched_cv_.Signal();
}

Engine::~Engine() {
  {
    absl::MutexLock lock(&sched_mu_);
    stopping_ = true;
    sched_cv_.Signal();
  }
  if (scheduler_.joinable()) scheduler_.join();
}

absl::StatusOr<GenerationResult> Engine::Generate(
    const GenerationRequest& request, const std::function<bool(const StreamChunk&)>& on_chunk) {
  const int vocab = config().vocab;
  const int n_prompt = static_cast<int>(request.prompt_tokens.size());
  if (n_prompt == 0) return absl::InvalidArgumentError("prompt: must not be empty");
  for (int i = 0; i < n_prompt; ++i) {
    const int32_t t = request.prompt_tokens[i];
    if (t < 0 || t >= vocab) {
      return absl::InvalidArgumentError(
          absl::StrFormat("prompt token %d: id %d is outside the vocabulary [0, %d)", i, t, vocab));
    }
  }
  if (request.max_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("max_tokens must be >= 1, got %d", request.max_tokens));
  }
  if (n_prompt >= max_context_ || request.max_tokens > max_context_ - n_prompt) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "prompt tokens (%d) + max_tokens (%d) exceed the context of %d tokens", n_prompt,
        request.max_tokens, max_context_));
  }
  for (size_t i = 0; i < request.stop.size(); ++i) {
    if (request.stop[i].empty()) {
      return absl::InvalidArgumentError(absl::StrFormat("stop[%d] must not be empty", i));
    }
  }
  RETURN_IF_ERROR(request.sampling.Validate(vocab));

  auto job = std::make_shared<Job>(request, stream_buffer_chunks_, [this] { Wake(); }, *tokenizer_);
  job->plan = plan_snapshot();
  // The cache holds the prompt and every generated token but the last, which
  // is never fed back.
  const int capacity = n_prompt + request.max_tokens;
  job->kv_bytes = JobKvBytes(n_prompt, capacity, *job->plan);
  if (kv_budget_bytes_ > 0 && job->kv_bytes > kv_budget_bytes_) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "kv budget: this request needs %.1f MiB of KV at its capacity of %d tokens (prompt %d + max_tokens %d) "
        "under plan '%s', more than the whole KV budget of %.1f MiB: it can never run here; shorten it",
        job->kv_bytes / 1048576.0, capacity, n_prompt, request.max_tokens, job->plan->name,
        kv_budget_bytes_ / 1048576.0));
  }
  {
    absl::MutexLock lock(&sched_mu_);
    if (stopping_) return absl::UnavailableError("engine shutting down");
    if (!device_lost_.ok()) {
      return absl::UnavailableError(absl::StrCat("the worker's device is lost (", device_lost_.message(),
                                                 "); it is stopping: retry on another worker"));
    }
    waiting_.push_back(job);
    wake_ = true;
    sched_cv_.Signal();
  }
  // Chunks go to the caller here, off the scheduler thread.
  int delivered = 0;  // tokens handed to on_chunk
  while (std::optional<StreamChunk> chunk = job->outbox.Pop()) {
    if (job->stop.load()) continue;  // drain what the scheduler made before it saw the stop
    delivered += static_cast<int>(chunk->token_ids.size());
    if (!on_chunk(*chunk)) {
      job->stop.store(true);
      Wake();
    }
  }
  absl::StatusOr<GenerationResult> outcome = job->outbox.outcome();
  if (job->stop.load() && outcome.ok()) {
    // The caller stopped: it is told about (and billed for) what it received.
    outcome->finish_reason = FinishReason::kCancelled;
    outcome->completion_tokens = delivered;
  }
  return outcome;
}

void Engine::Finish(Job& job, absl::StatusOr<GenerationResult> outcome) {
  job.done = true;
  job.live.reset();
  if (job.seq != nullptr) {
    ReleaseSequence(std::move(job.seq));  // its KV (and host-tier session), not when the caller returns
    absl::MutexLock lock(&sched_mu_);
    admitted_bytes_ -= job.kv_bytes;
    --running_count_;
  }
  // Last: the caller may return (and look at the load) as soon as this is set.
  job.outbox.Finish(std::move(outcome));
}

void Engine::ReleaseSequence(std::unique_ptr<SequenceState> seq) {
  if (!backend_->ConcurrentSequenceLifetime()) {
    seq.reset();
    return;
  }
  // Freeing the host tier closes its kv-host session (an RPC that waits up
  // to its deadline on a frozen kv-host): not on the scheduler thread.
  releases_.erase(std::remove_if(releases_.begin(), releases_.end(),
                                 [](const std::future<void>& f) {
                                   return f.wait_for(std::chrono::seconds(0)) == std::future_status::ready;
                                 }),
                  releases_.end());
  try {
    releases_.push_back(std::async(std::launch::async, [s = std::move(seq)]() mutable { s.reset(); }));
  } catch (const std::exception&) {
    seq.reset();  // no thread to be had: freed here (a no-op if the lambda took it)
  }
}

// The process's memory is exhausted (RLIMIT_AS, or overcommit off): the C++
// library throws std::bad_alloc, which must not reach the scheduler thread's
// end (std::terminate would take every generation down). (A cgroup's limit
// does not throw: the kernel's OOM killer ends the process.)
template <typename... Args>
absl::Status Engine::HostMemoryExhausted(const absl::FormatSpec<Args...>& what, const Args&... args) {
  return absl::ResourceExhaustedError(absl::StrCat(
      "host memory exhausted: the worker could not allocate memory for ", absl::StrFormat(what, args...),
      "; retry later, or ask for fewer tokens"));
}

absl::StatusOr<std::unique_ptr<SequenceState>> Engine::NewSequenceOrExhausted(int capacity, const Job& job) {
  try {
    return backend_->NewSequence(capacity, *job.plan);
  } catch (const std::bad_alloc&) {
    return HostMemoryExhausted("a sequence of %d tokens (%.1f MiB of KV under plan '%s')", capacity,
                               job.kv_bytes / 1048576.0, job.plan->name);
  }
}

absl::Status Engine::device_status() const {
  absl::MutexLock lock(&sched_mu_);
  return device_lost_;
}

absl::Status Engine::BackendFailure(const absl::Status& s) {
  if (!IsDeviceLost(s)) return s;
  if (pending_device_loss_.ok()) pending_device_loss_ = s;
  return absl::UnavailableError(absl::StrCat("the worker's device is lost (", s.message(),
                                             "); the worker stops for its supervisor to restart it: retry on "
                                             "another worker"));
}

void Engine::FailAllAfterDeviceLoss(std::vector<std::shared_ptr<Job>>& running) {
  device_loss_handled_ = true;
  spdlog::error("the backend's device is lost: {}; failing every generation and refusing new ones",
                pending_device_loss_.ToString());
  std::vector<std::shared_ptr<Job>> left = std::move(running);
  running.clear();
  {
    absl::MutexLock lock(&sched_mu_);
    device_lost_ = pending_device_loss_;
    for (auto& j : waiting_) left.push_back(j);
    waiting_.clear();
  }
  const absl::Status ended = BackendFailure(pending_device_loss_);
  for (auto& j : left) {
    if (!j->done) Finish(*j, ended);
  }
  if (on_device_lost_) on_device_lost_(pending_device_loss_);
}

void Engine::Admit(std::vector<std::shared_ptr<Job>>& running) {
  // Waiting generations whose caller left (or whose deadline passed) end here.
  std::vector<std::shared_ptr<Job>> gone;
  {
    absl::MutexLock lock(&sched_mu_);
    for (auto it = waiting_.begin(); it != waiting_.end();) {
      Job& j = **it;
      if (*it == admitting_) {  // its reservation is in flight: handled when it lands
        ++it;
        continue;
      }
      if (j.stop.load() || (j.request.cancelled && j.request.cancelled())) {
        gone.push_back(*it);
        it = waiting_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto& j : gone) {
    j->result.prompt_tokens = static_cast<int>(j->request.prompt_tokens.size());
    j->result.finish_reason = FinishReason::kCancelled;
    Finish(*j, j->result);
  }
  // After kv-host refused memory, ask again only when a generation has
  // ended or 50 ms have passed (not a Reserve RPC every iteration).
  if (static_cast<int>(running.size()) >= admit_blocked_running_ && Clock::now() < admit_retry_after_) return;
  admit_blocked_running_ = 0;
  while (static_cast<int>(running.size()) < max_running_) {
    std::shared_ptr<Job> job;
    absl::StatusOr<std::unique_ptr<SequenceState>> seq = absl::UnknownError("not reserved");
    if (admitting_ != nullptr) {
      // A reservation off this thread: the others step on until it lands.
      if (admitting_seq_.wait_for(std::chrono::seconds(0)) != std::future_status::ready) return;
      job = std::move(admitting_);
      admitting_ = nullptr;
      seq = admitting_seq_.get();
      if (job->done) continue;  // ended meanwhile (the device was lost): the sequence is freed here
    } else {
      {
        absl::MutexLock lock(&sched_mu_);
        if (waiting_.empty()) return;
        job = waiting_.front();
        // Arrival order: the oldest waits for room rather than being overtaken.
        if (kv_budget_bytes_ > 0 && admitted_bytes_ + job->kv_bytes > kv_budget_bytes_) return;
      }
      const int capacity = static_cast<int>(job->request.prompt_tokens.size()) + job->request.max_tokens;
      if (backend_->ConcurrentSequenceLifetime() && !running.empty()) {
        // Reserving may wait on kv-host (up to its call deadline): not here,
        // where it would pause every running generation.
        try {
          admitting_seq_ = std::async(std::launch::async, [this, capacity, job] {
            auto result = NewSequenceOrExhausted(capacity, *job);
            absl::MutexLock lock(&sched_mu_);
            wake_ = true;
            sched_cv_.SignalAll();
            return result;
          });
          admitting_ = job;
          return;
        } catch (const std::exception&) {
          // No thread to be had (std::system_error: memory or thread limits;
          // std::bad_alloc for its state): reserve here.
        }
      }
      seq = NewSequenceOrExhausted(capacity, *job);
    }
    if (!seq.ok() && absl::IsResourceExhausted(seq.status()) && !running.empty()) {
      // e.g. kv-host's budget: wait for a running generation to end
      admit_blocked_running_ = static_cast<int>(running.size());
      admit_retry_after_ = Clock::now() + std::chrono::milliseconds(50);
      return;
    }
    {
      absl::MutexLock lock(&sched_mu_);
      waiting_.pop_front();
      if (seq.ok()) {
        admitted_bytes_ += job->kv_bytes;
        ++running_count_;
      }
    }
    if (!seq.ok()) {
      Finish(*job, BackendFailure(seq.status()));
      if (!pending_device_loss_.ok()) return;
      continue;
    }
    job->seq = std::move(*seq);
    job->live = std::make_unique<LiveSequence>(*this, *job->seq);
    job->result.prompt_tokens = static_cast<int>(job->request.prompt_tokens.size());
    job->result.finish_reason = FinishReason::kLength;
    job->t0 = Clock::now();
    running.push_back(std::move(job));
  }
}

void Engine::EmitToken(Job& job, int32_t picked) {
  const GenerationRequest& request = job.request;
  const int32_t token =
      picked >= 0 ? picked : job.sampler.Sample(absl::MakeSpan(job.logits.data(), config().vocab), job.history);
  if (job.step == 0) {
    job.result.prefill_ms = MsSince(job.t0);
    job.t0 = Clock::now();
  }
  ++job.step;
  job.history.push_back(token);
  ++job.result.completion_tokens;
  StreamChunk chunk;
  chunk.token_ids.push_back(token);
  bool end = false;
  if (!request.ignore_eos && tokenizer_->IsEndOfGeneration(token)) {
    job.result.finish_reason = FinishReason::kStop;
    end = true;
    job.pending += job.detok.Flush();
  } else {
    job.pending += job.detok.Push(token);
    if (job.step == request.max_tokens) job.pending += job.detok.Flush();
  }
  const size_t stop_at = FindStop(job.pending, request.stop);
  if (stop_at != std::string::npos) {
    job.pending.resize(stop_at);
    job.result.finish_reason = FinishReason::kStop;
    end = true;
  }
  const bool last = end || job.step == request.max_tokens;
  const size_t emit = last ? job.pending.size() : job.pending.size() - HeldBackForStops(job.pending, request.stop);
  chunk.text = job.pending.substr(0, emit);
  job.pending.erase(0, emit);
  job.outbox.Push(std::move(chunk));
  if (last) {
    job.result.decode_ms = MsSince(job.t0);
    Finish(job, job.result);
  }
}

bool Engine::Iterate(std::vector<std::shared_ptr<Job>>& running) {
  bool moved = false;
  // The steady clock: a wall-clock step must not cut readers off (or keep
  // stalled ones) for its size.
  const Clock::time_point now = Clock::now();
  const auto stall_limit = absl::ToChronoNanoseconds(stream_stall_timeout_);
  auto fail = [&](Job& job, const absl::Status& s) {
    Finish(job, s);
    moved = true;
  };
  // Cancellation, deadlines (through `cancelled`) and stalled readers first.
  for (const std::shared_ptr<Job>& j : running) {
    Job& job = *j;
    if (job.stop.load() || (job.request.cancelled && job.request.cancelled())) {
      job.result.finish_reason = FinishReason::kCancelled;
      if (job.step == 0) {
        job.result.prefill_ms = MsSince(job.t0);
      } else {
        job.result.decode_ms = MsSince(job.t0);
      }
      Finish(job, job.result);
      moved = true;
    } else if (const Clock::time_point full = job.outbox.full_since();
               full != Clock::time_point::max() && now - full > stall_limit) {
      spdlog::warn("generation cut off after {} tokens: its caller took no chunk for {}", job.step,
                   absl::FormatDuration(stream_stall_timeout_));
      if (job.request.stalled) job.request.stalled();
      fail(job, absl::AbortedError(absl::StrFormat(
                    "stream: the caller took no chunk for %s (%d chunks waiting); generation cut off",
                    absl::FormatDuration(stream_stall_timeout_), stream_buffer_chunks_)));
    }
  }
  // One decode step for every generation past its prompt whose caller
  // keeps up, in one batch (always DecodeBatch, even for one: a
  // generation's logits then do not depend on what runs beside it).
  std::vector<Job*> batch;
  std::vector<SequenceState*> seqs;
  std::vector<int32_t> last;
  // Greedy generations' tokens are picked where the logits are (on a GPU,
  // only the ids come back); the others sample from their logits row here.
  std::vector<Backend::GreedyPickRequest> greedy;
  for (const std::shared_ptr<Job>& j : running) {
    Job& job = *j;
    if (job.done || job.prefilled < static_cast<int>(job.request.prompt_tokens.size()) || job.outbox.full()) continue;
    batch.push_back(&job);
    seqs.push_back(job.seq.get());
    last.push_back(job.history.back());
    const SamplingParams& sp = job.sampler.params();
    greedy.push_back({sp.temperature == 0.0f, sp.repetition_penalty, job.history});
  }
  if (!batch.empty()) {
    std::vector<float>& logits = batch_logits_;
    std::vector<absl::Status> per_seq;
    std::vector<int32_t> picked;
    absl::Status s;
    try {
      s = backend_->DecodeBatchPick(seqs, last, greedy, &logits, &picked, &per_seq);
    } catch (const std::bad_alloc&) {
      s = HostMemoryExhausted("a decode step of %d sequences", static_cast<int>(seqs.size()));
    }
    const size_t vocab = static_cast<size_t>(config().vocab);
    for (size_t b = 0; b < batch.size(); ++b) {
      Job& job = *batch[b];
      if (!s.ok() || !per_seq[b].ok()) {
        fail(job, BackendFailure(s.ok() ? per_seq[b] : s));
        continue;
      }
      if (picked[b] < 0) job.logits.assign(logits.begin() + b * vocab, logits.begin() + (b + 1) * vocab);
      if (job.step == 1) job.live->Refresh(*job.seq);
      EmitToken(job, picked[b]);
      moved = true;
    }
  }
  // One prefill chunk, for the prompting generation next in turn: the one
  // that prefilled least recently goes first (rotate after).
  for (size_t k = 0; k < running.size(); ++k) {
    Job& job = *running[k];
    const int n_prompt = static_cast<int>(job.request.prompt_tokens.size());
    if (job.done || job.prefilled >= n_prompt || job.outbox.full()) continue;
    const int n = std::min(prefill_chunk_, n_prompt - job.prefilled);
    // A prompt's last chunk may be one token: still prefill, not a decode step.
    absl::Status s;
    try {
      s = backend_->Forward(*job.seq, absl::MakeConstSpan(job.request.prompt_tokens).subspan(job.prefilled, n),
                            false, &job.logits, Backend::Mode::kPrefill);
    } catch (const std::bad_alloc&) {
      s = HostMemoryExhausted("a prefill chunk of %d tokens", n);
    }
    moved = true;
    if (!s.ok()) {
      fail(job, BackendFailure(s));
    } else {
      job.prefilled += n;
      if (job.prefilled == n_prompt) EmitToken(job);  // the first token comes out of the prefill
    }
    std::rotate(running.begin() + k, running.begin() + k + 1, running.end());
    break;
  }
  // Finished generations leave (Finish returned their KV budget).
  running.erase(std::remove_if(running.begin(), running.end(), [](const auto& j) { return j->done; }),
                running.end());
  return moved;
}

void Engine::SchedulerLoop() {
  std::vector<std::shared_ptr<Job>> running;
  while (true) {
    {
      absl::MutexLock lock(&sched_mu_);
      // Sleep when nothing can move: no work, or every running generation
      // is held back by its caller (a Pop wakes us; the stall bound is
      // checked at least every 50 ms).
      while (!stopping_ && !wake_ && waiting_.empty() && running.empty()) sched_cv_.Wait(&sched_mu_);
      if (stopping_) break;
      wake_ = false;
    }
    bool moved;
    {
      absl::MutexLock lock(&mu_);
      Admit(running);
      moved = pending_device_loss_.ok() && Iterate(running);
      if (!pending_device_loss_.ok() && !device_loss_handled_) {
        FailAllAfterDeviceLoss(running);
        moved = true;
      }
    }
    if (!moved && (!running.empty() || admitting_ != nullptr)) {
      absl::MutexLock lock(&sched_mu_);
      if (!wake_ && !stopping_) sched_cv_.WaitWithTimeout(&sched_mu_, absl::Milliseconds(50));
    }
  }
  // A reservation still in flight: its thread uses the backend, so wait
  // for it, and free its sequence (if any) now, before the backend goes.
  if (admitting_seq_.valid()) (void)admitting_seq_.get();
  std::vector<std::shared_ptr<Job>> left = std::move(running);
  {
    absl::MutexLock lock(&sched_mu_);
    for (auto& j : waiting_) left.push_back(j);
    waiting_.clear();
  }
  for (auto& j : left) {
    if (!j->done) Finish(*j, absl::UnavailableError("engine shutting down"));
  }
  for (std::future<void>& f : releases_) f.wait();  // they use the backend
  releases_.clear();
}

}  // namespace tailorkv::runtime
