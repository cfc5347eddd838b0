// Fuzz target: the profiler's request checks (profiler/profiler_service.h,
// profile_runner.h, identify.h) and its GetPlan / ListPlans handlers over a
// plan store in a scratch directory holding three plans.
//
// Input: byte 0 picks the message (0 ProfileRequest, 1 ListPlansRequest,
// 2 GetPlanRequest); the rest is that message serialized (ParseFromArray;
// inputs that do not parse are what gRPC would refuse before the handler).
// Invariants: Profile's checks (SpecFromRequest, ValidateProfileSpec,
// ValidatePlanSettings against SmolLM2's shape) fail only with
// InvalidArgument, never let a model name reach outside the model
// directory, and accepted settings give sane candidate lists; GetPlan and
// ListPlans answer INVALID_ARGUMENT / NOT_FOUND or a consistent result, and
// a next_page_token they hand out is accepted back.
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>

#include "fuzz_util.h"
#include "profiler/identify.h"
#include "profiler/plan_store.h"
#include "profiler/profile_runner.h"
#include "profiler/profiler_service.h"
#include "runtime/kv_plan.h"
#include "tailorkv/v1/profiler.pb.h"

namespace prof = tailorkv::profiler;
namespace v1 = tailorkv::v1;

namespace {

std::string g_dir;
std::unique_ptr<prof::PlanStore> g_store;
std::unique_ptr<prof::ProfilerService> g_service;

tailorkv::model::ModelConfig SmolLM2Shape() {
  tailorkv::model::ModelConfig c;
  c.arch = "llama";
  c.name = "SmolLM2-135M";
  c.n_layers = 30;
  c.n_heads = 9;
  c.n_kv_heads = 3;
  c.head_dim = 64;
  c.hidden = 576;
  c.ffn = 1536;
  c.vocab = 49152;
  c.max_context = 8192;
  return c;
}

void CheckProfile(const v1::ProfileRequest& r, uint8_t calibration_byte) {
  auto spec = prof::SpecFromRequest(r);
  if (!spec.ok()) {
    FUZZ_CHECK(spec.status().code() == absl::StatusCode::kInvalidArgument, "%s",
               spec.status().ToString().c_str());
    return;
  }
  const absl::Status st = prof::ValidateProfileSpec(*spec);
  if (!st.ok()) {
    FUZZ_CHECK(st.code() == absl::StatusCode::kInvalidArgument, "%s", st.ToString().c_str());
    return;
  }
  const std::string& m = spec->model;
  if (m.rfind("synthetic:", 0) != 0) {
    // The runner opens models_dir + "/" + model.
    FUZZ_CHECK(!m.empty() && m.find('/') == std::string::npos && m[0] != '.' &&
                   m.find('\0') == std::string::npos,
               "model name '%s' reaches outside the model directory", m.c_str());
  }
  const auto config = SmolLM2Shape();
  // The calibration's token count the runner would see.
  const int tokens = spec->calibration_ids.empty() ? 64 * (1 + calibration_byte)
                                                   : static_cast<int>(spec->calibration_ids.size());
  const absl::Status settings = prof::ValidatePlanSettings(spec->settings, config, tokens);
  if (!settings.ok()) {
    FUZZ_CHECK(settings.code() == absl::StatusCode::kInvalidArgument, "%s",
               settings.ToString().c_str());
    return;
  }
  for (int c : prof::ChannelCandidates(spec->settings, config.head_dim)) {
    FUZZ_CHECK(c >= 1 && c <= config.head_dim, "channel candidate %d", c);
  }
  for (int b : prof::BitCandidates(spec->settings)) FUZZ_CHECK(b >= 1 && b <= 16, "bits %d", b);
  const auto top_k = prof::TopKCandidates(spec->settings, tokens);
  FUZZ_CHECK(!top_k.empty(), "no Top-K candidate");
  for (size_t i = 0; i < top_k.size(); ++i) {
    FUZZ_CHECK(top_k[i] >= 1 && (i == 0 || top_k[i] > top_k[i - 1]), "Top-K candidates");
  }
}

void CheckList(const v1::ListPlansRequest& r) {
  v1::ListPlansResponse resp;
  const grpc::Status st = g_service->ListPlans(nullptr, &r, &resp);
  if (!st.ok()) {
    FUZZ_CHECK(st.error_code() == grpc::StatusCode::INVALID_ARGUMENT, "%d %s",
               static_cast<int>(st.error_code()), st.error_message().c_str());
    return;
  }
  const int page = r.page_size() == 0 ? 100 : r.page_size();
  FUZZ_CHECK(resp.plans_size() <= page, "%d plans on a page of %d", resp.plans_size(), page);
  for (const auto& p : resp.plans()) {
    FUZZ_CHECK(r.model_digest().empty() || p.model_digest() == r.model_digest(), "filter");
  }
  if (!resp.next_page_token().empty()) {
    v1::ListPlansRequest next = r;
    next.set_page_token(resp.next_page_token());
    v1::ListPlansResponse more;
    const grpc::Status again = g_service->ListPlans(nullptr, &next, &more);
    FUZZ_CHECK(again.ok(), "own next_page_token refused: %s", again.error_message().c_str());
  }
}

void CheckGet(const v1::GetPlanRequest& r) {
  v1::Plan plan;
  const grpc::Status st = g_service->GetPlan(nullptr, &r, &plan);
  if (!st.ok()) {
    FUZZ_CHECK(st.error_code() == grpc::StatusCode::INVALID_ARGUMENT ||
                   st.error_code() == grpc::StatusCode::NOT_FOUND,
               "%d %s", static_cast<int>(st.error_code()), st.error_message().c_str());
    return;
  }
  FUZZ_CHECK(r.plan_id().empty() || plan.plan_id() == r.plan_id(), "another plan answered");
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  std::string tmpl = std::filesystem::temp_directory_path().string() + "/tkv_fuzz_plans_XXXXXX";
  FUZZ_CHECK(::mkdtemp(tmpl.data()) != nullptr, "mkdtemp");
  g_dir = tmpl;
  std::atexit([] {
    g_service.reset();
    g_store.reset();
    std::filesystem::remove_all(g_dir);
  });
  auto store = prof::PlanStore::Open(g_dir);
  FUZZ_CHECK(store.ok(), "%s", store.status().ToString().c_str());
  g_store = *std::move(store);
  const auto config = SmolLM2Shape();
  for (int i = 0; i < 3; ++i) {
    auto plan = tailorkv::runtime::ParseKvPlanSpec(i == 0 ? "dense" : "hybrid:1:128", config);
    FUZZ_CHECK(plan.ok(), "%s", plan.status().ToString().c_str());
    for (auto& l : plan->layers) l.dense_preference = 0.25 * i;
    prof::StoredPlan p;
    p.plan_id = "p" + std::to_string(i);
    p.model_digest = "sha256:" + std::string(64, i == 2 ? 'b' : 'a');
    p.model = "SmolLM2-135M-Instruct.Q4_1.gguf";
    p.summary = plan->Summary();
    p.plan_json = tailorkv::runtime::KvPlanToJson(*plan, config);
    p.checksum = "sha256:" + std::string(64, '0' + i);
    p.plot_png = i == 1 ? std::string("\x89PNG\r\n\x1a\n", 8) : "";
    auto put = g_store->Put(p);
    FUZZ_CHECK(put.ok(), "%s", put.status().ToString().c_str());
  }
  g_service = std::make_unique<prof::ProfilerService>(prof::RunnerOptions{}, g_store.get());
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  tailorkv::fuzz::Reader in(data, size);
  const uint8_t kind = in.Byte();
  const std::string body = in.Rest();
  switch (kind % 3) {
    case 0: {
      v1::ProfileRequest r;
      if (r.ParseFromString(body)) CheckProfile(r, kind);
      break;
    }
    case 1: {
      v1::ListPlansRequest r;
      if (r.ParseFromString(body)) CheckList(r);
      break;
    }
    case 2: {
      v1::GetPlanRequest r;
      if (r.ParseFromString(body)) CheckGet(r);
      break;
    }
  }
  return 0;
}
