#include "runtime/engine.h"

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <thread>

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
                                                       int threads, kvhost::HostKvStore* host_store) {
  if (choice == "cuda" && !cuda_factory) {
    return absl::UnavailableError("backend 'cuda': this build has no CUDA backend");
  }
  if (choice != "cpu" && cuda_factory) {
    auto gpu = cuda_factory(weights);
    if (gpu.ok()) return gpu;
    if (choice == "cuda" || !absl::IsUnavailable(gpu.status())) {
      return gpu.status();  // asked for CUDA, or a device exists but failed
    }
    spdlog::info("no CUDA device ({}); using the CPU backend", std::string(gpu.status().message()));
  }
  CpuBackendOptions cpu;
  cpu.threads = threads;
  cpu.host_store = host_store;
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
  std::unique_ptr<model::GgufFile> tokenizer_file;
  if (is_dir) {
    ASSIGN_OR_RETURN(weights, model::LoadWeightsFromSafetensors(options.model_path));
    ASSIGN_OR_RETURN(tokenizer_file, model::GgufFile::Open(tokenizer_path));
  } else {
    ASSIGN_OR_RETURN(tokenizer_file, model::GgufFile::Open(options.model_path));
    ASSIGN_OR_RETURN(weights, model::LoadWeightsFromGguf(*tokenizer_file));
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
                                                   options.cuda_factory, options.threads, options.host_store));
  engine->prefill_chunk_ = options.prefill_chunk > 0
                              ? options.prefill_chunk
                              : engine->backend_->preferred_prefill_chunk();
  // The CPU backend keeps K/V in fp32; the GPU backends in bf16.
  engine->kv_elem_bytes_ = engine->backend_->name() == "cpu" ? 4 : 2;
  RETURN_IF_ERROR(engine->ProbeKvPlan(plan));
  {
    absl::MutexLock lock(&engine->plan_mu_);
    engine->kv_plan_ = std::make_shared<const KvPlan>(std::move(plan));
  }
  spdlog::info("model loaded in {:.0f} ms: {} layers, hidden {}, backend {}", MsSince(t0),
               engine->config().n_layers, engine->config().hidden, engine->backend_name());
  int64_t per_sequence = 0;
  for (const LayerKvBytes& b : engine->KvBytesPerSequence()) per_sequence += b.total();
  const KvPlan& p = *engine->plan_snapshot();
  spdlog::info("kv plan '{}': {}; {:.1f} MiB of KV per {}-token sequence", p.name, p.Summary(),
               per_sequence / 1048576.0, engine->max_context_);
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

  absl::MutexLock lock(&mu_);
  GenerationResult result;
  result.prompt_tokens = n_prompt;
  // The cache holds the prompt and every generated token but the last, which
  // is never fed back.
  ASSIGN_OR_RETURN(auto seq,
                   backend_->NewSequence(n_prompt + request.max_tokens, *plan_snapshot()));
  LiveSequence live(*this, *seq);
  Sampler sampler(request.sampling);
  tokenizer::StreamingDetokenizer detok(*tokenizer_);
  std::vector<int32_t> history = request.prompt_tokens;
  std::vector<float> logits;
  std::string pending;  // complete UTF-8 not yet streamed (may start a stop string)

  auto t0 = Clock::now();
  const absl::Span<const int32_t> prompt(request.prompt_tokens);
  for (int done = 0; done < n_prompt;) {
    if (request.cancelled && request.cancelled()) {
      result.finish_reason = FinishReason::kCancelled;
      result.prefill_ms = MsSince(t0);
      return result;
    }
    const int n = std::min(prefill_chunk_, n_prompt - done);
    // A prompt's last chunk may be one token: still prefill, not a decode step.
    RETURN_IF_ERROR(
        backend_->Forward(*seq, prompt.subspan(done, n), false, &logits, Backend::Mode::kPrefill));
    done += n;
  }
  result.finish_reason = FinishReason::kLength;
  bool done = false;
  for (int step = 0; step < request.max_tokens && !done; ++step) {
    if (step > 0) {
      RETURN_IF_ERROR(backend_->Forward(*seq, absl::MakeConstSpan(&history.back(), 1), false,
                                        &logits, Backend::Mode::kDecode));
      if (step == 1) live.Refresh(*seq);
    }
    const int32_t token = sampler.Sample(absl::MakeSpan(logits.data(), vocab), history);
    if (step == 0) {
      result.prefill_ms = MsSince(t0);
      t0 = Clock::now();
    }
    history.push_back(token);
    ++result.completion_tokens;
    StreamChunk chunk;
    chunk.token_ids.push_back(token);
    if (!request.ignore_eos && tokenizer_->IsEndOfGeneration(token)) {
      result.finish_reason = FinishReason::kStop;
      done = true;
      pending += detok.Flush();
    } else {
      pending += detok.Push(token);
      if (step + 1 == request.max_tokens) pending += detok.Flush();
    }
    const size_t stop_at = FindStop(pending, request.stop);
    if (stop_at != std::string::npos) {
      pending.resize(stop_at);
      result.finish_reason = FinishReason::kStop;
      done = true;
    }
    const bool last = done || step + 1 == request.max_tokens;
    const size_t emit = last ? pending.size() : pending.size() - HeldBackForStops(pending, request.stop);
    chunk.text = pending.substr(0, emit);
    pending.erase(0, emit);
    if (!on_chunk(chunk)) {
      result.finish_reason = FinishReason::kCancelled;
      break;
    }
  }
  result.decode_ms = MsSince(t0);
  return result;
}

}  // namespace tailorkv::runtime
