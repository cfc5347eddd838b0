#include "server/generation_service.h"

#include <chrono>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "common/logging.h"

namespace tailorkv::worker {

namespace {

using Clock = std::chrono::steady_clock;

double MillisSince(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

v1::FinishReason ToProto(runtime::FinishReason reason) {
  switch (reason) {
    case runtime::FinishReason::kStop: return v1::FINISH_REASON_STOP;
    case runtime::FinishReason::kLength: return v1::FINISH_REASON_LENGTH;
    case runtime::FinishReason::kCancelled: return v1::FINISH_REASON_CANCELLED;
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

// A call's deadline on the steady clock, taken when it arrives: gRPC gives
// it as a wall-clock time, and a step of the wall clock (NTP, a resumed VM)
// must not turn a client's cancel into a deadline or a deadline into a
// cancel. time_point::max() when the call has none.
Clock::time_point SteadyDeadline(const grpc::ServerContext& context) {
  const auto wall_deadline = context.deadline();
  if (wall_deadline == std::chrono::system_clock::time_point::max()) return Clock::time_point::max();
  const auto left = wall_deadline - std::chrono::system_clock::now();
  if (left > std::chrono::hours(24 * 365)) return Clock::time_point::max();
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(left);
}

// Why a call ended early, as the status the client should see.
absl::Status CallEndedStatus(Clock::time_point deadline) {
  if (Clock::now() >= deadline) {
    return absl::DeadlineExceededError("deadline exceeded; generation stopped");
  }
  return absl::CancelledError("call cancelled by the client; generation stopped");
}

const char* ChatTemplateName(tokenizer::ChatTemplate::Family family) {
  switch (family) {
    case tokenizer::ChatTemplate::Family::kChatML: return "chatml";
    case tokenizer::ChatTemplate::Family::kLlama3: return "llama3";
    case tokenizer::ChatTemplate::Family::kPlain: return "plain";
  }
  return "unknown";
}

void FillKvPlan(const runtime::KvPlan& plan, v1::KvPlanInfo* out) {
  out->set_name(plan.name);
  out->set_summary(plan.Summary());
  for (size_t i = 0; i < plan.layers.size(); ++i) {
    const runtime::LayerKvPolicy& l = plan.layers[i];
    v1::KvLayerPolicy* p = out->add_layers();
    p->set_layer(static_cast<int>(i));
    p->set_policy(std::string(runtime::KvPolicyName(l.kind)));
    p->set_dense_preference(l.dense_preference);
    switch (l.kind) {
      case runtime::KvPolicyKind::kDense:
        break;
      case runtime::KvPolicyKind::kQuant:
        p->set_bits(l.quant.bits);
        p->set_group(l.quant.group);
        p->set_residual(l.quant.residual);
        break;
      case runtime::KvPolicyKind::kWindow:
        p->set_sink(l.window.sink);
        p->set_recent(l.window.recent);
        break;
      case runtime::KvPolicyKind::kSparse:
        p->set_sink(l.sparse.sink);
        p->set_recent(l.sparse.recent);
        p->set_top_k(l.sparse.top_k);
        p->set_channels(l.sparse.channels);
        p->set_index(l.sparse.index);
        break;
    }
  }
}

void FillKvMemory(const std::vector<runtime::LayerKvBytes>& layers, int sequences,
                  int64_t capacity_tokens, v1::KvMemory* out) {
  out->set_sequences(sequences);
  out->set_capacity_tokens(capacity_tokens);
  int64_t device = 0, host = 0;
  for (size_t i = 0; i < layers.size(); ++i) {
    v1::LayerKvMemory* l = out->add_layers();
    l->set_layer(static_cast<int>(i));
    l->set_policy(std::string(runtime::KvPolicyName(layers[i].kind)));
    l->set_device_bytes(layers[i].device_bytes);
    l->set_host_bytes(layers[i].host_bytes);
    device += layers[i].device_bytes;
    host += layers[i].host_bytes;
  }
  out->set_device_bytes(device);
  out->set_host_bytes(host);
  for (const runtime::PolicyKvBytes& p : runtime::SumKvBytesByPolicy(layers)) {
    v1::PolicyKvMemory* m = out->add_policies();
    m->set_policy(std::string(runtime::KvPolicyName(p.kind)));
    m->set_layers(p.layers);
    m->set_device_bytes(p.device_bytes);
    m->set_host_bytes(p.host_bytes);
  }
}

}  // namespace

absl::Status GenerationServiceOptions::Validate() const {
  if (max_queue < 0) {
    return absl::InvalidArgumentError(absl::StrCat("max-queue: must be >= 0, got ", max_queue));
  }
  if (max_running < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max-running: must be >= 1, got ", max_running));
  }
  if (limits.default_max_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrCat("default-max-tokens: must be >= 1, got ",
                                                   limits.default_max_tokens));
  }
  return absl::OkStatus();
}

class GenerationService::AbortRegistration {
 public:
  AbortRegistration(GenerationService& service, std::string id)
      : service_(service), id_(std::move(id)), flag_(std::make_shared<std::atomic<bool>>(false)) {}
  ~AbortRegistration() {
    if (registered_) {
      absl::MutexLock lock(&service_.abort_mu_);
      service_.abort_flags_.erase(id_);
    }
  }
  absl::Status Register() {
    if (id_.empty()) return absl::OkStatus();
    absl::MutexLock lock(&service_.abort_mu_);
    if (!service_.abort_flags_.emplace(id_, flag_).second) {
      return absl::AlreadyExistsError(
          absl::StrCat("request_id: '", id_, "' is already in flight"));
    }
    registered_ = true;
    return absl::OkStatus();
  }
  bool aborted() const { return flag_->load(std::memory_order_relaxed); }

 private:
  GenerationService& service_;
  const std::string id_;
  std::shared_ptr<std::atomic<bool>> flag_;
  bool registered_ = false;
};

GenerationService::GenerationService(runtime::Engine& engine,
                                     const GenerationServiceOptions& options)
    : engine_(engine),
      options_(options),
      validator_(engine, options.limits),
      queue_(options.max_running, options.max_queue) {}

void GenerationService::BeginDrain() { draining_.store(true); }

grpc::Status GenerationService::Generate(grpc::ServerContext* context,
                                         const v1::GenerateRequest* request,
                                         grpc::ServerWriter<v1::GenerateResponse>* writer) {
  static const auto log = common::NamedLogger("generation");
  const Clock::time_point arrived = Clock::now();
  const Clock::time_point deadline = SteadyDeadline(*context);
  if (draining_.load()) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                        "worker is draining; retry on another worker");
  }
  absl::StatusOr<PreparedRequest> prepared = validator_.Prepare(*request);
  if (!prepared.ok()) {
    log->debug("rejected request from {}: {}", context->peer(), prepared.status().ToString());
    return common::ToGrpcStatus(prepared.status());
  }
  AbortRegistration abort(*this, prepared->request_id);
  if (absl::Status s = abort.Register(); !s.ok()) return common::ToGrpcStatus(s);

  auto stop_reason = [&]() -> absl::Status {
    if (context->IsCancelled()) return CallEndedStatus(deadline);
    if (abort.aborted()) return absl::CancelledError("aborted");
    return absl::OkStatus();
  };

  v1::GenerateResponse response;
  v1::GenerateFinal* final = response.mutable_final();
  absl::StatusOr<AdmissionQueue::Slot> slot = queue_.Acquire(stop_reason, options_.queue_poll);
  const double queue_ms = MillisSince(arrived);
  if (!slot.ok()) {
    if (abort.aborted() && !context->IsCancelled()) {
      // Aborted while queued: the stream still ends with a final message.
      final->set_finish_reason(v1::FINISH_REASON_CANCELLED);
      final->mutable_usage()->set_prompt_tokens(
          static_cast<int>(prepared->engine_request.prompt_tokens.size()));
      final->mutable_timings()->set_queue_ms(queue_ms);
      finished_abort_.fetch_add(1);
      writer->Write(response);
      return grpc::Status::OK;
    }
    return common::ToGrpcStatus(slot.status());
  }

  bool client_gone = false;
  v1::GenerateResponse chunk_response;
  auto on_chunk = [&](const runtime::StreamChunk& chunk) {
    if (context->IsCancelled() || abort.aborted()) return false;
    v1::GenerateChunk* out = chunk_response.mutable_chunk();
    out->mutable_token_ids()->Assign(chunk.token_ids.begin(), chunk.token_ids.end());
    out->set_text(chunk.text);
    if (!writer->Write(chunk_response)) {
      client_gone = true;
      return false;
    }
    return true;
  };
  prepared->engine_request.cancelled = [&] { return context->IsCancelled() || abort.aborted(); };
  // A client that stopped reading: end its call so the blocked Write returns.
  prepared->engine_request.stalled = [context] { context->TryCancel(); };
  absl::StatusOr<runtime::GenerationResult> result =
      engine_.Generate(prepared->engine_request, on_chunk);
  slot->Release();

  if (context->IsCancelled() || (client_gone && !abort.aborted())) {
    const absl::Status ended = CallEndedStatus(deadline);
    log->info("request '{}' ended early: {}", prepared->request_id, ended.ToString());
    finished_abort_.fetch_add(1);
    return common::ToGrpcStatus(ended);
  }
  if (!result.ok()) {
    failed_.fetch_add(1);
    log->error("request '{}' failed: {}", prepared->request_id, result.status().ToString());
    return common::ToGrpcStatus(result.status());
  }

  final->set_finish_reason(ToProto(result->finish_reason));
  final->mutable_usage()->set_prompt_tokens(result->prompt_tokens);
  final->mutable_usage()->set_completion_tokens(result->completion_tokens);
  v1::Timings* timings = final->mutable_timings();
  timings->set_queue_ms(queue_ms);
  timings->set_prefill_ms(result->prefill_ms);
  timings->set_decode_ms(result->decode_ms);
  // The first token comes out of prefill; decode_ms covers the others.
  const int decoded = result->completion_tokens - 1;
  timings->set_decode_tokens_per_second(
      decoded > 0 && result->decode_ms > 0 ? decoded * 1000.0 / result->decode_ms : 0.0);
  ttft_.Observe((queue_ms + result->prefill_ms) / 1000.0);
  if (decoded > 0) tpot_.Observe(result->decode_ms / 1000.0 / decoded);
  e2e_.Observe((queue_ms + result->prefill_ms + result->decode_ms) / 1000.0);
  queue_time_.Observe(queue_ms / 1000.0);
  prompt_tokens_.fetch_add(result->prompt_tokens);
  generation_tokens_.fetch_add(result->completion_tokens);
  (result->finish_reason == runtime::FinishReason::kLength   ? finished_length_
   : result->finish_reason == runtime::FinishReason::kCancelled ? finished_abort_
                                                                : finished_stop_)
      .fetch_add(1);
  log->info("request '{}': {} prompt + {} completion tokens, {} ({:.1f} ms queue, {:.1f} ms "
            "prefill, {:.1f} tok/s)",
            prepared->request_id, result->prompt_tokens, result->completion_tokens,
            runtime::FinishReasonName(result->finish_reason), queue_ms, result->prefill_ms,
            timings->decode_tokens_per_second());
  if (!writer->Write(response)) return common::ToGrpcStatus(CallEndedStatus(deadline));
  return grpc::Status::OK;
}

grpc::Status GenerationService::Abort(grpc::ServerContext* context,
                                      const v1::AbortRequest* request,
                                      v1::AbortResponse* response) {
  const std::string& id = request->request_id();
  if (id.empty()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "request_id: required");
  }
  if (absl::Status s = ValidateRequestId(id, options_.limits.max_request_id_bytes); !s.ok()) {
    return common::ToGrpcStatus(s);
  }
  absl::MutexLock lock(&abort_mu_);
  auto it = abort_flags_.find(id);
  if (it == abort_flags_.end()) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND,
                        absl::StrCat("request_id: no request '", id, "' in flight"));
  }
  it->second->store(true);
  return grpc::Status::OK;
}

grpc::Status GenerationService::GetModelInfo(grpc::ServerContext* context,
                                             const v1::GetModelInfoRequest* request,
                                             v1::ModelInfo* response) {
  const model::ModelConfig& config = engine_.config();
  response->set_arch(config.arch);
  response->set_name(config.name);
  response->set_n_layers(config.n_layers);
  response->set_hidden(config.hidden);
  response->set_n_heads(config.n_heads);
  response->set_n_kv_heads(config.n_kv_heads);
  response->set_head_dim(config.head_dim);
  response->set_vocab_size(config.vocab);
  response->set_max_context(engine_.max_context());
  response->set_trained_context(config.max_context);
  response->set_backend(std::string(engine_.backend_name()));
  response->set_model_path(options_.model_path);
  response->set_model_digest(engine_.model_digest());
  response->set_chat_template(ChatTemplateName(engine_.chat_template().family()));
  FillKvPlan(engine_.kv_plan(), response->mutable_kv_plan());
  FillKvMemory(engine_.KvBytesPerSequence(), 1, engine_.max_context(),
               response->mutable_kv_per_sequence());
  return grpc::Status::OK;
}

grpc::Status GenerationService::GetLoad(grpc::ServerContext* context,
                                        const v1::GetLoadRequest* request, v1::Load* response) {
  response->set_queued_requests(queue_.waiting());
  response->set_active_requests(queue_.running());
  response->set_max_queue(queue_.max_waiting());
  response->set_draining(draining_.load());
  const runtime::KvUsage kv = engine_.KvInUse();
  FillKvMemory(kv.layers, kv.sequences, kv.capacity_tokens, response->mutable_kv_in_use());
  const runtime::Engine::SchedulerLoad s = engine_.scheduler_load();
  response->set_max_running(options_.max_running);
  response->set_engine_running(s.running);
  response->set_engine_waiting(s.waiting);
  response->set_kv_budget_bytes(s.kv_budget_bytes);
  response->set_kv_admitted_bytes(s.kv_admitted_bytes);
  return grpc::Status::OK;
}

std::string GenerationService::PrometheusText() const {
  using common::AppendHeader;
  using common::AppendSample;
  std::string out;
  AppendHeader(&out, "tailorkv:time_to_first_token_seconds", "histogram", "Time to first token (queue + prefill).");
  out += ttft_.Render("tailorkv:time_to_first_token_seconds");
  AppendHeader(&out, "tailorkv:time_per_output_token_seconds", "histogram", "Mean time per output token after the first.");
  out += tpot_.Render("tailorkv:time_per_output_token_seconds");
  AppendHeader(&out, "tailorkv:e2e_request_latency_seconds", "histogram", "Request latency, arrival to last token.");
  out += e2e_.Render("tailorkv:e2e_request_latency_seconds");
  AppendHeader(&out, "tailorkv:request_queue_time_seconds", "histogram", "Time waiting for the engine.");
  out += queue_time_.Render("tailorkv:request_queue_time_seconds");
  AppendHeader(&out, "tailorkv:prompt_tokens_total", "counter", "Prompt tokens of finished requests.");
  AppendSample(&out, "tailorkv:prompt_tokens_total", "", static_cast<double>(prompt_tokens_.load()));
  AppendHeader(&out, "tailorkv:generation_tokens_total", "counter", "Generated tokens of finished requests.");
  AppendSample(&out, "tailorkv:generation_tokens_total", "", static_cast<double>(generation_tokens_.load()));
  AppendHeader(&out, "tailorkv:request_success_total", "counter", "Finished requests by finish reason.");
  AppendSample(&out, "tailorkv:request_success_total", "finished_reason=\"stop\"", finished_stop_.load());
  AppendSample(&out, "tailorkv:request_success_total", "finished_reason=\"length\"", finished_length_.load());
  AppendSample(&out, "tailorkv:request_success_total", "finished_reason=\"abort\"", finished_abort_.load());
  AppendHeader(&out, "tailorkv:request_failure_total", "counter", "Requests that failed in the engine.");
  AppendSample(&out, "tailorkv:request_failure_total", "", failed_.load());
  const runtime::Engine::SchedulerLoad s = engine_.scheduler_load();
  AppendHeader(&out, "tailorkv:num_requests_running", "gauge", "Generations the engine runs now.");
  AppendSample(&out, "tailorkv:num_requests_running", "", s.running);
  AppendHeader(&out, "tailorkv:num_requests_waiting", "gauge", "Requests waiting (admission queue and KV memory).");
  AppendSample(&out, "tailorkv:num_requests_waiting", "", queue_.waiting() + s.waiting);
  AppendHeader(&out, "tailorkv:kv_budget_bytes", "gauge", "KV budget of the running generations (0: none).");
  AppendSample(&out, "tailorkv:kv_budget_bytes", "", static_cast<double>(s.kv_budget_bytes));
  AppendHeader(&out, "tailorkv:kv_admitted_bytes", "gauge", "Memory the running generations hold at their capacity.");
  AppendSample(&out, "tailorkv:kv_admitted_bytes", "", static_cast<double>(s.kv_admitted_bytes));
  AppendHeader(&out, "tailorkv:gpu_cache_usage_perc", "gauge", "Share of the KV budget in use (0 to 1; 0 without a budget).");
  AppendSample(&out, "tailorkv:gpu_cache_usage_perc", "",
               s.kv_budget_bytes > 0 ? static_cast<double>(s.kv_admitted_bytes) / s.kv_budget_bytes : 0.0);
  // KV bytes of the running sequences per policy and tier.
  const runtime::KvUsage kv = engine_.KvInUse();
  const runtime::KvPlan plan = engine_.kv_plan();
  std::map<std::string, std::pair<double, double>> per_policy;
  for (const runtime::LayerKvPolicy& p : plan.layers) per_policy[std::string(runtime::KvPolicyName(p.kind))];
  for (const runtime::LayerKvBytes& b : kv.layers) {
    auto& v = per_policy[std::string(runtime::KvPolicyName(b.kind))];
    v.first += static_cast<double>(b.device_bytes);
    v.second += static_cast<double>(b.host_bytes);
  }
  AppendHeader(&out, "tailorkv:kv_cache_bytes", "gauge", "KV bytes the running sequences hold, by policy and tier.");
  for (const auto& [policy, bytes] : per_policy) {
    AppendSample(&out, "tailorkv:kv_cache_bytes", absl::StrCat("policy=\"", policy, "\",tier=\"device\""), bytes.first);
    AppendSample(&out, "tailorkv:kv_cache_bytes", absl::StrCat("policy=\"", policy, "\",tier=\"host\""), bytes.second);
  }
  AppendHeader(&out, "tailorkv:kv_sequences", "gauge", "Sequences holding KV now.");
  AppendSample(&out, "tailorkv:kv_sequences", "", kv.sequences);
  // The plan's id as the profiler names it: "p" + the first 20 hex digits
  // of its checksum (the same for a plan fetched from the profiler).
  std::string plan_id;
  {
    const nlohmann::json doc =
        nlohmann::json::parse(runtime::KvPlanToJson(plan, engine_.config()), nullptr, false);
    const std::string checksum = doc.is_discarded() ? "" : doc.value("checksum", "");
    const std::string hex = checksum.substr(checksum.find(':') + 1);
    if (!hex.empty()) plan_id = absl::StrCat("p", hex.substr(0, 20));
  }
  AppendHeader(&out, "tailorkv:kv_plan_info", "gauge", "The KV plan in use (labels), always 1.");
  AppendSample(&out, "tailorkv:kv_plan_info",
               absl::StrCat("plan_id=\"", plan_id, "\",plan=\"", common::LabelValue(plan.name), "\",summary=\"",
                            common::LabelValue(plan.Summary()), "\",backend=\"", std::string(engine_.backend_name()), "\""),
               1);
  return out;
}

}  // namespace tailorkv::worker
