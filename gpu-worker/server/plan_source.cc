#include "server/plan_source.h"

#include "common/grpc_deadline.h"

#include <fstream>
#include <sstream>

#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>

#include "absl/strings/str_cat.h"
#include "common/atomic_file.h"
#include "common/status_macros.h"
#include "spdlog/spdlog.h"

namespace tailorkv::worker {
namespace {

absl::StatusOr<std::string> ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError("cannot open it");
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return absl::DataLossError("read error");
  return ss.str();
}

}  // namespace

absl::Status PlanSourceOptions::Validate() const {
  if (kv_plan.empty()) {
    return absl::InvalidArgumentError(
        "kv-plan: must not be empty (\"dense\" keeps every layer dense)");
  }
  if (from_profiler()) {
    if (profiler_address.empty()) {
      return absl::InvalidArgumentError(
          "profiler: required with --kv-plan profiler (HOST:PORT of the profiler service)");
    }
    if (profiler_timeout_ms < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("profiler-timeout-ms: must be >= 1, got ", profiler_timeout_ms));
    }
    return absl::OkStatus();
  }
  if (!profiler_address.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "profiler: used only with --kv-plan profiler, but --kv-plan is \"", kv_plan, "\""));
  }
  if (!plan_cache.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "plan-cache: used only with --kv-plan profiler, but --kv-plan is \"", kv_plan, "\""));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> FetchProfilerPlanJson(v1::Profiler::Stub& stub,
                                                  const std::string& address,
                                                  const std::string& model_digest,
                                                  absl::Duration timeout) {
  grpc::ClientContext context;
  common::SetCallTimeout(context, timeout);
  v1::GetPlanRequest request;
  request.set_model_digest(model_digest);
  v1::Plan plan;
  const grpc::Status s = stub.GetPlan(&context, request, &plan);
  if (!s.ok()) {
    // The two enums share their numbering.
    return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                        absl::StrCat("profiler ", address, ": GetPlan: ", s.error_message()));
  }
  if (plan.model_digest() != model_digest) {
    return absl::FailedPreconditionError(absl::StrCat(
        "profiler ", address, ": GetPlan for model ", model_digest, " answered plan '",
        plan.plan_id(), "' of model \"", plan.model_digest(), "\""));
  }
  return plan.plan_json();
}

absl::StatusOr<runtime::KvPlan> ParsePlanForModel(std::string_view json,
                                                  const model::ModelConfig& config,
                                                  const std::string& model_digest) {
  ASSIGN_OR_RETURN(runtime::KvPlan plan, runtime::ParseKvPlanJson(json, config));
  if (plan.model_digest.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "model.digest: missing; a profiled plan must name its model (this one is ", model_digest,
        ")"));
  }
  RETURN_IF_ERROR(runtime::CheckPlanModel(plan, model_digest));
  return plan;
}

PlanSource::PlanSource(PlanSourceOptions options) : options_(std::move(options)) {}

absl::StatusOr<runtime::KvPlan> PlanSource::Resolve(const model::ModelConfig& config,
                                                    const std::string& model_digest,
                                                    bool use_cache) {
  absl::MutexLock lock(&mu_);
  uncommitted_json_.clear();
  if (options_.from_profiler()) return FromProfiler(config, model_digest, use_cache);
  ASSIGN_OR_RETURN(runtime::KvPlan plan, runtime::ParseKvPlanSpec(options_.kv_plan, config));
  RETURN_IF_ERROR(runtime::CheckPlanModel(plan, model_digest));
  return plan;
}

absl::StatusOr<runtime::KvPlan> PlanSource::FromProfiler(const model::ModelConfig& config,
                                                         const std::string& model_digest,
                                                         bool use_cache) {
  const std::string& address = options_.profiler_address;
  if (model_digest.empty()) {
    return absl::FailedPreconditionError(
        "kv-plan profiler: the model has no digest (a safetensors directory), and the "
        "profiler keys its plans by the model file's digest");
  }
  if (stub_ == nullptr) {
    stub_ = v1::Profiler::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  }
  absl::Status why;
  absl::StatusOr<std::string> json = FetchProfilerPlanJson(
      *stub_, address, model_digest, absl::Milliseconds(options_.profiler_timeout_ms));
  if (json.ok()) {
    absl::StatusOr<runtime::KvPlan> plan = ParsePlanForModel(*json, config, model_digest);
    if (plan.ok()) {
      spdlog::info("kv plan from the profiler {} for model {}: '{}' ({})", address, model_digest,
                   plan->name, plan->Summary());
      uncommitted_json_ = *std::move(json);
      return plan;
    }
    why = absl::Status(plan.status().code(), absl::StrCat("profiler ", address,
                                                          ": plan refused: ",
                                                          plan.status().message()));
  } else {
    why = json.status();
  }
  if (!use_cache) return why;
  const std::string& cache = options_.plan_cache;
  if (cache.empty()) {
    return absl::Status(why.code(),
                        absl::StrCat(why.message(), "; no plan cache to fall back on (--plan-cache)"));
  }
  absl::StatusOr<runtime::KvPlan> cached = [&]() -> absl::StatusOr<runtime::KvPlan> {
    ASSIGN_OR_RETURN(std::string text, ReadWholeFile(cache));
    return ParsePlanForModel(text, config, model_digest);
  }();
  if (!cached.ok()) {
    return absl::Status(why.code(), absl::StrCat(why.message(), "; plan cache ", cache,
                                                 " not used: ", cached.status().message()));
  }
  spdlog::warn("{}; using the last good plan, cached in {}: '{}' ({})",
               std::string(why.message()), cache, cached->name, cached->Summary());
  return cached;
}

runtime::KvPlanSource PlanSource::AsEngineSource() {
  return [this](const model::ModelConfig& config,
                const std::string& model_digest) -> absl::StatusOr<runtime::KvPlan> {
    absl::StatusOr<runtime::KvPlan> plan = Resolve(config, model_digest);
    if (!plan.ok()) {
      absl::MutexLock lock(&mu_);
      if (last_error_.ok()) last_error_ = plan.status();
    }
    return plan;
  };
}

absl::Status PlanSource::last_error() const {
  absl::MutexLock lock(&mu_);
  return last_error_;
}

absl::Status PlanSource::CommitToCache() {
  absl::MutexLock lock(&mu_);
  if (uncommitted_json_.empty() || options_.plan_cache.empty()) return absl::OkStatus();
  const std::string json = std::move(uncommitted_json_);
  uncommitted_json_.clear();
  RETURN_IF_ERROR(common::WriteFileAtomically(options_.plan_cache, json));
  spdlog::info("kv plan cached in {}", options_.plan_cache);
  return absl::OkStatus();
}

absl::Status PlanSource::Reload(runtime::Engine& engine) {
  ASSIGN_OR_RETURN(runtime::KvPlan plan,
                   Resolve(engine.config(), engine.model_digest(), /*use_cache=*/false));
  const std::string summary = plan.Summary();
  if (absl::Status s = engine.SetKvPlan(std::move(plan)); !s.ok()) {
    absl::MutexLock lock(&mu_);
    uncommitted_json_.clear();  // the engine refused it: not a good plan to go back to
    return s;
  }
  spdlog::info("kv plan reloaded: {}", summary);
  if (absl::Status s = CommitToCache(); !s.ok()) {
    spdlog::warn("kv plan in use but not cached: {}", s.ToString());
  }
  return absl::OkStatus();
}

}  // namespace tailorkv::worker
