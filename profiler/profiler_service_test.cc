// tailorkv.v1.Profiler over a real socket with the real model: profile,
// store, fetch, list; every bad input and fault gets its status.
#include "profiler/profiler_service.h"

#include <gtest/gtest.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>

#include <unistd.h>

#include <filesystem>
#include <string>
#include <thread>

#include "common/grpc_server.h"
#include "common/test_child_process.h"
#include "profiler/test_support.h"
#include "runtime/kv_plan.h"

namespace tailorkv::profiler {
namespace {

using testing::kModel;
using testing::ModelDir;
using testing::Prose;

class ProfilerServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!std::filesystem::exists(ModelDir() + "/" + kModel)) {
      GTEST_SKIP() << ModelDir() << "/" << kModel << " is missing (scripts/fetch_model.sh)";
    }
    // One directory per test and process: ctest runs the tests in parallel.
    dir_ = std::filesystem::path(::testing::TempDir()) /
           (std::string("profiler_service_test_") +
            ::testing::UnitTest::GetInstance()->current_test_info()->name() + "_" +
            std::to_string(::getpid()));
    std::filesystem::remove_all(dir_);
    store_ = *PlanStore::Open(dir_.string());
    RunnerOptions options{.models_dir = ModelDir(), .backend = "cpu", .threads = 2};
    service_ = std::make_unique<ProfilerService>(options, store_.get());
    common::ServerOptions server;
    server.listen_address = "127.0.0.1:0";
    auto started = common::GrpcServer::Start(
        server, {{v1::Profiler::service_full_name(), service_.get()}});
    ASSERT_TRUE(started.ok()) << started.status();
    server_ = *std::move(started);
    stub_ = v1::Profiler::NewStub(
        grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials()));
  }
  void TearDown() override {
    if (server_) server_->Drain();
    std::filesystem::remove_all(dir_);
  }

  static v1::ProfileRequest Request() {
    v1::ProfileRequest r;
    r.set_model(kModel);
    r.set_calibration_text(Prose(6000));
    r.set_max_calibration_tokens(600);
    r.mutable_settings()->set_top_k(64);
    return r;
  }
  // Runs a Profile call to its end; progress messages in `seen`. The default
  // deadline stretches under a sanitizer: under TSan one profile takes 45-86 s
  // alone and passed 120 s on a shared machine (CancelledExpired..., the last
  // profile, DEADLINE_EXCEEDED during stage "layers").
  grpc::Status Profile(const v1::ProfileRequest& r, std::vector<v1::ProfileProgress>* seen,
                       int deadline_ms = 120000 * common::testing::kSanitizerSlowdown) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(deadline_ms));
    auto reader = stub_->Profile(&ctx, r);
    v1::ProfileProgress msg;
    while (reader->Read(&msg)) {
      if (seen != nullptr) seen->push_back(msg);
    }
    return reader->Finish();
  }
  int StoredPlans() {
    v1::ListPlansRequest req;
    v1::ListPlansResponse resp;
    grpc::ClientContext ctx;
    EXPECT_TRUE(stub_->ListPlans(&ctx, req, &resp).ok());
    return resp.plans_size();
  }
  // The service takes one profile at a time; after a cancelled call it frees
  // the slot at its next progress point.
  void WaitUntilIdle() {
    for (int i = 0; i < 300; ++i) {
      v1::ProfileRequest r = Request();
      r.set_model("no-such-model.gguf");  // refused only after taking the slot
      grpc::ClientContext ctx;
      auto reader = stub_->Profile(&ctx, r);
      v1::ProfileProgress msg;
      while (reader->Read(&msg)) {
      }
      if (reader->Finish().error_code() != grpc::StatusCode::RESOURCE_EXHAUSTED) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    FAIL() << "the profiler stayed busy";
  }

  std::filesystem::path dir_;
  std::unique_ptr<PlanStore> store_;
  std::unique_ptr<ProfilerService> service_;
  std::unique_ptr<common::GrpcServer> server_;
  std::unique_ptr<v1::Profiler::Stub> stub_;
};

TEST_F(ProfilerServiceTest, ProfilesStoresAndServesThePlan) {
  std::vector<v1::ProfileProgress> seen;
  const grpc::Status st = Profile(Request(), &seen);
  ASSERT_TRUE(st.ok()) << st.error_message();
  ASSERT_FALSE(seen.empty());
  const v1::Plan& plan = seen.back().plan();
  EXPECT_EQ(seen.back().stage(), "done");
  EXPECT_EQ(plan.n_layers(), 30);
  EXPECT_EQ(plan.layers_size(), 30);
  EXPECT_EQ(plan.model(), kModel);
  EXPECT_EQ(plan.plot_png().substr(1, 3), "PNG");
  EXPECT_FALSE(plan.created_at().empty());
  EXPECT_EQ(plan.plan_id(), PlanIdFor(plan.checksum()));
  bool saw_layers = false, saw_prefill = false;
  for (const auto& m : seen) {
    saw_layers |= m.stage() == "layers" && m.done() == 30 && m.total() == 30;
    saw_prefill |= m.stage() == "prefill";
    if (&m != &seen.back()) EXPECT_FALSE(m.has_plan());
  }
  EXPECT_TRUE(saw_layers && saw_prefill);

  // Fetch by digest and by id: the same bytes; the JSON is a valid plan.
  v1::GetPlanRequest get;
  get.set_model_digest(plan.model_digest());
  v1::Plan by_digest;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(stub_->GetPlan(&ctx, get, &by_digest).ok());
  }
  EXPECT_EQ(by_digest.plan_json(), plan.plan_json());
  EXPECT_TRUE(by_digest.plot_png().empty()) << "the plot only when asked";
  get.Clear();
  get.set_plan_id(plan.plan_id());
  get.set_include_plot(true);
  v1::Plan by_id;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(stub_->GetPlan(&ctx, get, &by_id).ok());
  }
  EXPECT_EQ(by_id.plot_png(), plan.plot_png());
  EXPECT_EQ(by_id.layers(3).quant_error(), plan.layers(3).quant_error());
  EXPECT_GT(by_id.layers(3).quant_error(), 0);

  // The same inputs again: the same plan id, still one record.
  std::vector<v1::ProfileProgress> again;
  ASSERT_TRUE(Profile(Request(), &again).ok());
  EXPECT_EQ(again.back().plan().plan_id(), plan.plan_id());
  EXPECT_EQ(StoredPlans(), 1);
  // Different settings: a second plan.
  v1::ProfileRequest two = Request();
  two.mutable_settings()->set_quant_bits(1);
  ASSERT_TRUE(Profile(two, nullptr).ok());
  EXPECT_EQ(StoredPlans(), 2);
}

TEST_F(ProfilerServiceTest, BadInputGetsItsStatusNamingTheField) {
  struct Case {
    std::function<void(v1::ProfileRequest&)> edit;
    grpc::StatusCode code;
    std::string text;
  };
  const Case cases[] = {
      {[](v1::ProfileRequest& r) { r.set_model("llama-70b.gguf"); }, grpc::StatusCode::NOT_FOUND,
       "model: \"llama-70b.gguf\" is not a model of this profiler (models: "},
      {[](v1::ProfileRequest& r) { r.set_model("/etc/passwd"); },
       grpc::StatusCode::INVALID_ARGUMENT, "model: must be a model name"},
      {[](v1::ProfileRequest& r) { r.clear_calibration_text(); },
       grpc::StatusCode::INVALID_ARGUMENT, "calibration_text: empty"},
      {[](v1::ProfileRequest& r) { r.set_calibration_text("Short text."); },
       grpc::StatusCode::INVALID_ARGUMENT, "calibration_text: "},
      {[](v1::ProfileRequest& r) { r.mutable_settings()->set_top_k(5000); },
       grpc::StatusCode::INVALID_ARGUMENT, "settings.top_k: the sparse budget"},
      {[](v1::ProfileRequest& r) { r.mutable_settings()->set_max_quant_layers(-2); },
       grpc::StatusCode::INVALID_ARGUMENT, "settings.max_quant_layers: must be >= 0"},
      {[](v1::ProfileRequest& r) { r.mutable_settings()->set_quant_bits(3); },
       grpc::StatusCode::INVALID_ARGUMENT, "settings.quant_bits"},
      {[](v1::ProfileRequest& r) { r.set_max_calibration_tokens(-1); },
       grpc::StatusCode::INVALID_ARGUMENT, "max_calibration_tokens: must be >= 0"},
      {[](v1::ProfileRequest& r) { r.set_calibration_text("caf\xc3"); },
       grpc::StatusCode::INVALID_ARGUMENT, "calibration_text: not valid UTF-8"},
  };
  for (const Case& tc : cases) {
    v1::ProfileRequest r = Request();
    tc.edit(r);
    const grpc::Status st = Profile(r, nullptr);
    EXPECT_EQ(st.error_code(), tc.code) << tc.text << " -> " << st.error_message();
    EXPECT_NE(st.error_message().find(tc.text), std::string::npos) << st.error_message();
  }
  EXPECT_EQ(StoredPlans(), 0);

  v1::GetPlanRequest get;
  v1::Plan plan;
  {
    grpc::ClientContext ctx;
    EXPECT_EQ(stub_->GetPlan(&ctx, get, &plan).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  get.set_plan_id("p0123");
  {
    grpc::ClientContext ctx;
    EXPECT_EQ(stub_->GetPlan(&ctx, get, &plan).error_code(), grpc::StatusCode::NOT_FOUND);
  }
  get.set_model_digest("sha256:00");
  {
    grpc::ClientContext ctx;
    EXPECT_EQ(stub_->GetPlan(&ctx, get, &plan).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  v1::ListPlansRequest list;
  v1::ListPlansResponse resp;
  list.set_page_size(1001);
  {
    grpc::ClientContext ctx;
    const auto st = stub_->ListPlans(&ctx, list, &resp);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(st.error_message().find("page_size"), std::string::npos);
  }
  list.set_page_size(5);
  list.set_page_token("not-a-token");
  {
    grpc::ClientContext ctx;
    EXPECT_EQ(stub_->ListPlans(&ctx, list, &resp).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
}

TEST_F(ProfilerServiceTest, CancelledExpiredAndConcurrentCallsStoreNothing) {
  // Cancelled after the first progress message.
  {
    grpc::ClientContext ctx;
    auto reader = stub_->Profile(&ctx, Request());
    v1::ProfileProgress msg;
    ASSERT_TRUE(reader->Read(&msg));
    // Meanwhile a second caller is turned away.
    std::vector<v1::ProfileProgress> none;
    const grpc::Status busy = Profile(Request(), &none);
    EXPECT_EQ(busy.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << busy.error_message();
    ctx.TryCancel();
    while (reader->Read(&msg)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  WaitUntilIdle();
  // A deadline far shorter than the profile.
  const grpc::Status expired = Profile(Request(), nullptr, /*deadline_ms=*/400);
  EXPECT_EQ(expired.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << expired.error_message();
  WaitUntilIdle();
  EXPECT_EQ(StoredPlans(), 0);
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir_, ec)) {
    EXPECT_EQ(e.path().filename().string().rfind(".tmp", 0), std::string::npos) << e.path();
  }
  // The service is whole afterwards.
  EXPECT_TRUE(Profile(Request(), nullptr).ok());
  EXPECT_EQ(StoredPlans(), 1);
}

}  // namespace
}  // namespace tailorkv::profiler
