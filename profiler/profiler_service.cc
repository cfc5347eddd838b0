#include "profiler/profiler_service.h"

#include "common/prometheus.h"

#include <chrono>

#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"
#include "spdlog/spdlog.h"

namespace tailorkv::profiler {
namespace {

using Clock = std::chrono::steady_clock;

// Releases the one-profile-at-a-time slot however the call ends.
class BusyGuard {
 public:
  explicit BusyGuard(std::atomic<bool>& flag) : flag_(flag) {}
  ~BusyGuard() { flag_.store(false); }
  BusyGuard(const BusyGuard&) = delete;
  BusyGuard& operator=(const BusyGuard&) = delete;

 private:
  std::atomic<bool>& flag_;
};

// An optional threshold of the settings: >= 0 (NaN is refused too).
absl::Status NonNegative(const char* field, double v, double* out) {
  if (!(v >= 0)) {
    return absl::InvalidArgumentError(absl::StrCat("settings.", field, ": must be >= 0, got ", v));
  }
  *out = v;
  return absl::OkStatus();
}

absl::Status Negative(const char* field, int64_t v) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": must be >= 0, got ", v));
}

}  // namespace

absl::StatusOr<ProfileSpec> SpecFromRequest(const v1::ProfileRequest& r) {
  ProfileSpec spec;
  spec.model = r.model();
  spec.calibration_text = r.calibration_text();
  spec.calibration_ids.assign(r.calibration_token_ids().begin(), r.calibration_token_ids().end());
  if (r.max_calibration_tokens() < 0) {
    return Negative("max_calibration_tokens", r.max_calibration_tokens());
  }
  if (r.max_calibration_tokens() > 0) spec.max_calibration_tokens = r.max_calibration_tokens();
  const v1::ProfileSettings& s = r.settings();
  PlanSettings& p = spec.settings;
  if (s.has_quant_bits()) p.quant_bits = s.quant_bits();
  if (s.has_quant_group()) p.quant_group = s.quant_group();
  if (s.has_quant_residual()) p.quant_residual = s.quant_residual();
  if (s.has_sink()) p.sink = s.sink();
  if (s.has_recent()) p.recent = s.recent();
  if (s.has_top_k()) p.top_k = s.top_k();
  if (s.has_channels()) p.channels = s.channels();
  if (s.has_index()) p.index = s.index();
  if (s.has_index_bits()) p.index_bits = s.index_bits();
  if (s.has_query()) p.query = s.query();
  if (s.has_threshold()) p.threshold = s.threshold();
  if (s.has_query_rows()) p.query_rows = s.query_rows();
  if (s.has_max_quant_error()) {
    RETURN_IF_ERROR(NonNegative("max_quant_error", s.max_quant_error(), &p.max_quant_error));
  }
  if (s.has_min_index_recall()) {
    RETURN_IF_ERROR(NonNegative("min_index_recall", s.min_index_recall(), &p.min_index_recall));
  }
  if (s.has_max_channels()) p.max_channels = s.max_channels();
  if (s.has_max_sparse_error()) {
    RETURN_IF_ERROR(NonNegative("max_sparse_error", s.max_sparse_error(), &p.max_sparse_error));
  }
  if (s.has_max_top_k()) p.max_top_k = s.max_top_k();
  if (s.has_max_quant_layers()) {
    if (s.max_quant_layers() < 0) return Negative("settings.max_quant_layers", s.max_quant_layers());
    p.max_quant_layers = s.max_quant_layers();
  }
  return spec;
}

std::string PlanIdFor(const std::string& checksum) {
  const std::string hex = checksum.substr(checksum.find(':') + 1);
  return absl::StrCat("p", hex.substr(0, 20));
}

absl::StatusOr<v1::Plan> PlanToProto(const StoredPlan& stored, bool with_plot) {
  v1::Plan plan;
  plan.set_plan_id(stored.plan_id);
  plan.set_model_digest(stored.model_digest);
  plan.set_model(stored.model);
  plan.set_summary(stored.summary);
  plan.set_checksum(stored.checksum);
  plan.set_created_at(stored.created_at);
  plan.set_plan_json(stored.plan_json);
  if (with_plot) plan.set_plot_png(stored.plot_png);
  const auto doc = nlohmann::json::parse(stored.plan_json, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded() || !doc.contains("layers") || !doc["layers"].is_array()) {
    return absl::DataLossError(absl::StrCat("stored plan ", stored.plan_id, " is not a plan"));
  }
  plan.set_n_layers(static_cast<int>(doc["layers"].size()));
  for (const auto& l : doc["layers"]) {
    v1::LayerScore* s = plan.add_layers();
    s->set_layer(l.value("layer", 0));
    s->set_policy(l.value("policy", ""));
    s->set_dense_preference(l.value("dense_preference", -1.0));
    s->set_sparse_error(l.value("sparse_error", -1.0));
    s->set_quant_error(l.value("quant_error", -1.0));
  }
  return plan;
}

ProfilerService::ProfilerService(RunnerOptions options, PlanStore* store)
    : options_(std::move(options)), store_(store) {}

grpc::Status ProfilerService::Profile(grpc::ServerContext* context,
                                      const v1::ProfileRequest* request,
                                      grpc::ServerWriter<v1::ProfileProgress>* writer) {
  auto spec = SpecFromRequest(*request);
  if (!spec.ok()) return common::ToGrpcStatus(spec.status());
  if (auto st = ValidateProfileSpec(*spec); !st.ok()) return common::ToGrpcStatus(st);
  bool expected = false;
  if (!busy_.compare_exchange_strong(expected, true)) {
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                        "a profile is already running on this profiler; retry when it ends");
  }
  BusyGuard guard(busy_);
  const auto deadline = context->deadline();
  std::string last_stage;
  Clock::time_point last_write{};
  auto progress = [&](const Progress& p) -> absl::Status {
    if (std::chrono::system_clock::now() >= deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat("the call's deadline passed during stage \"", p.stage, "\""));
    }
    if (context->IsCancelled()) {
      return absl::CancelledError(absl::StrCat("cancelled during stage \"", p.stage, "\""));
    }
    const auto now = Clock::now();
    const bool stage_end = p.total > 0 && p.done == p.total;
    if (p.stage != last_stage || stage_end || now - last_write >= std::chrono::milliseconds(200)) {
      v1::ProfileProgress msg;
      msg.set_stage(p.stage);
      msg.set_done(p.done);
      msg.set_total(p.total);
      if (p.stage != "done" && !writer->Write(msg)) {
        return absl::CancelledError("the client stopped reading progress");
      }
      last_stage = p.stage;
      last_write = now;
    }
    return absl::OkStatus();
  };
  spdlog::info("profile of {} requested by {}", spec->model, context->peer());
  auto out = RunProfile(options_, *spec, progress);
  if (!out.ok()) {
    profiles_failed_.fetch_add(1);
    spdlog::info("profile of {} ended: {}", spec->model, out.status().ToString());
    return common::ToGrpcStatus(out.status());
  }
  if (auto st = progress({.stage = "storing"}); !st.ok()) return common::ToGrpcStatus(st);
  StoredPlan record{.model_digest = out->model_digest,
                    .model = spec->model,
                    .summary = out->plan.Summary(),
                    .plan_json = out->plan_json,
                    .plot_png = out->plot_png};
  const auto doc = nlohmann::json::parse(out->plan_json);
  record.checksum = doc.value("checksum", "");
  record.plan_id = PlanIdFor(record.checksum);
  auto stored = store_->Put(std::move(record));
  if (!stored.ok()) {
    spdlog::error("profile of {}: the plan could not be stored: {}", spec->model,
                  stored.status().ToString());
    // The store's code says what the caller should do: UNAVAILABLE for a
    // full disk (retry later), INTERNAL for a read-only or unwritable one.
    return common::ToGrpcStatus(absl::Status(
        stored.status().code(), absl::StrCat("the plan could not be stored: ", stored.status().message())));
  }
  auto plan = PlanToProto(*stored, /*with_plot=*/true);
  if (!plan.ok()) return common::ToGrpcStatus(plan.status());
  v1::ProfileProgress last;
  last.set_stage("done");
  last.set_done(1);
  last.set_total(1);
  *last.mutable_plan() = *std::move(plan);
  writer->Write(last);
  profiles_done_.fetch_add(1);
  last_profile_seconds_.store(out->seconds);
  spdlog::info("plan {} stored for {} ({:.1f} s): {}", stored->plan_id, spec->model, out->seconds,
               stored->summary);
  return grpc::Status::OK;
}

grpc::Status ProfilerService::GetPlan(grpc::ServerContext*, const v1::GetPlanRequest* request,
                                      v1::Plan* response) {
  const bool by_id = !request->plan_id().empty(), by_digest = !request->model_digest().empty();
  if (by_id == by_digest) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "plan_id, model_digest: set exactly one of them");
  }
  auto stored = by_id ? store_->Get(request->plan_id(), request->include_plot())
                      : store_->NewestFor(request->model_digest(), request->include_plot());
  if (!stored.ok()) return common::ToGrpcStatus(stored.status());
  auto plan = PlanToProto(*stored, request->include_plot());
  if (!plan.ok()) return common::ToGrpcStatus(plan.status());
  *response = *std::move(plan);
  return grpc::Status::OK;
}

grpc::Status ProfilerService::ListPlans(grpc::ServerContext*, const v1::ListPlansRequest* request,
                                        v1::ListPlansResponse* response) {
  if (request->page_size() < 0 || request->page_size() > 1000) {
    return grpc::Status(
        grpc::StatusCode::INVALID_ARGUMENT,
        absl::StrCat("page_size: must be in [0, 1000] (0 = 100), got ", request->page_size()));
  }
  auto page = store_->List(request->model_digest(),
                           request->page_size() == 0 ? 100 : request->page_size(),
                           request->page_token());
  if (!page.ok()) return common::ToGrpcStatus(page.status());
  for (const StoredPlan& p : page->plans) {
    v1::PlanSummary* s = response->add_plans();
    s->set_plan_id(p.plan_id);
    s->set_model_digest(p.model_digest);
    s->set_model(p.model);
    s->set_summary(p.summary);
    s->set_created_at(p.created_at);
  }
  response->set_next_page_token(page->next_page_token);
  return grpc::Status::OK;
}

std::string ProfilerService::PrometheusText() const {
  std::string out;
  common::AppendHeader(&out, "tailorkv:profiler_running", "gauge", "1 while a profile runs.");
  common::AppendSample(&out, "tailorkv:profiler_running", "", busy_.load() ? 1 : 0);
  common::AppendHeader(&out, "tailorkv:profiler_profiles_total", "counter", "Profiles by outcome.");
  common::AppendSample(&out, "tailorkv:profiler_profiles_total", "outcome=\"stored\"", profiles_done_.load());
  common::AppendSample(&out, "tailorkv:profiler_profiles_total", "outcome=\"failed\"", profiles_failed_.load());
  common::AppendHeader(&out, "tailorkv:profiler_last_profile_seconds", "gauge", "The last stored profile's run time.");
  common::AppendSample(&out, "tailorkv:profiler_last_profile_seconds", "", last_profile_seconds_.load());
  // Plans kept: counted page by page (the store lists summaries only).
  int64_t plans = 0;
  std::string token;
  do {
    auto page = store_->List("", 1000, token);
    if (!page.ok()) break;
    plans += static_cast<int64_t>(page->plans.size());
    token = page->next_page_token;
  } while (!token.empty());
  common::AppendHeader(&out, "tailorkv:profiler_plans", "gauge", "Plans in the store.");
  common::AppendSample(&out, "tailorkv:profiler_plans", "", static_cast<double>(plans));
  return out;
}

}  // namespace tailorkv::profiler
