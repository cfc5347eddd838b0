#include "profiler/profile_runner.h"

#include <gtest/gtest.h>

#include <filesystem>

#include "common/sha256.h"
#include "nlohmann/json.hpp"
#include "profiler/test_support.h"

namespace tailorkv::profiler {
namespace {

using testing::kModel;
using testing::ModelDir;
using testing::Prose;

class ProfileRunnerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!std::filesystem::exists(ModelDir() + "/" + kModel)) {
      GTEST_SKIP() << ModelDir() << "/" << kModel << " is missing (scripts/fetch_model.sh)";
    }
    options_.models_dir = ModelDir();
    options_.backend = "cpu";
    options_.threads = 2;
  }
  ProfileSpec Spec() const {
    ProfileSpec spec;
    spec.model = kModel;
    spec.calibration_text = Prose(6000);  // ~1,300 tokens
    spec.max_calibration_tokens = 600;
    spec.settings.sink = 8;  // a budget that 600 tokens can measure
    spec.settings.recent = 56;
    spec.settings.top_k = 64;
    return spec;
  }
  RunnerOptions options_;
};

TEST_F(ProfileRunnerTest, ProfilesTheRealModelIntoAVerifiablePlan) {
  std::vector<Progress> seen;
  auto out = RunProfile(options_, Spec(), [&](const Progress& p) {
    seen.push_back(p);
    return absl::OkStatus();
  });
  ASSERT_TRUE(out.ok()) << out.status();
  const auto& c = out->config;
  ASSERT_EQ(c.n_layers, 30);
  EXPECT_EQ(out->model_digest, *common::Sha256File(ModelDir() + "/" + kModel));
  EXPECT_EQ(out->tokens_used, 600);
  EXPECT_GT(out->tokens_given, 600);
  // What is served parses back, checksum and all, into the same plan.
  auto back = runtime::ParseKvPlanJson(out->plan_json, c);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, out->plan);
  EXPECT_TRUE(runtime::CheckPlanModel(*back, out->model_digest).ok());
  int quant = 0;
  for (int l = 0; l < c.n_layers; ++l) {
    const auto& p = back->layers[l];
    EXPECT_GE(p.dense_preference, 0.0);
    EXPECT_LE(p.dense_preference, 1.0);
    EXPECT_GT(p.sparse_error, 0.0) << l;  // Top-64 of 568 prompt tokens drops something
    EXPECT_GT(p.quant_error, 0.0) << l;
    EXPECT_EQ(p.kind == runtime::KvPolicyKind::kQuant, p.dense_preference > 0.2) << l;
    quant += p.kind == runtime::KvPolicyKind::kQuant;
    if (p.kind == runtime::KvPolicyKind::kSparse) EXPECT_EQ(p.sparse.top_k, 64);
  }
  EXPECT_LT(quant, c.n_layers) << "a real model has sparsity-friendly layers";
  const auto profile = nlohmann::json::parse(back->profile_json);
  EXPECT_EQ(profile["calibration"]["tokens_used"], 600);
  EXPECT_EQ(profile["layers"].size(), 30u);
  EXPECT_EQ(profile["layers"][7]["head_preference"].size(), 9u);
  EXPECT_EQ(out->plot_png.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
  // Stages in order; every layer reported once.
  std::vector<std::string> stages;
  int layers_reported = 0;
  for (const Progress& p : seen) {
    if (stages.empty() || stages.back() != p.stage) stages.push_back(p.stage);
    if (p.stage == "layers") EXPECT_EQ(p.done, ++layers_reported);
  }
  EXPECT_EQ(stages, (std::vector<std::string>{"digest", "loading", "tokenizing", "prefill",
                                              "layers", "plot", "done"}));
  EXPECT_EQ(layers_reported, 30);

  // Deterministic: the same inputs give the same bytes.
  auto again = RunProfile(options_, Spec(), nullptr);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->plan_json, out->plan_json);
}

TEST_F(ProfileRunnerTest, BadInputGetsAClearError) {
  struct Case {
    std::function<void(ProfileSpec&)> edit;
    absl::StatusCode code;
    std::string text;
  };
  const Case cases[] = {
      {[](ProfileSpec& s) { s.model = "no-such-model.gguf"; }, absl::StatusCode::kNotFound,
       "model: \"no-such-model.gguf\" is not a model of this profiler"},
      {[](ProfileSpec& s) { s.model = "../models/x.gguf"; }, absl::StatusCode::kInvalidArgument,
       "model: must be a model name"},
      {[](ProfileSpec& s) { s.model = ""; }, absl::StatusCode::kInvalidArgument, "model: "},
      {[](ProfileSpec& s) { s.model = "synthetic:llama-3.1-8b"; },
       absl::StatusCode::kFailedPrecondition, "has no CUDA backend"},
      {[](ProfileSpec& s) { s.model = "synthetic:gpt-5"; }, absl::StatusCode::kNotFound,
       "no model shape named \"gpt-5\""},
      {[](ProfileSpec& s) { s.calibration_text.clear(); }, absl::StatusCode::kInvalidArgument,
       "calibration_text: empty"},
      {[](ProfileSpec& s) { s.calibration_text = "Too short to measure anything."; },
       absl::StatusCode::kInvalidArgument, "calibration_text: "},
      {[](ProfileSpec& s) { s.calibration_text = "bad \xff utf8"; },
       absl::StatusCode::kInvalidArgument, "calibration_text: not valid UTF-8"},
      {[](ProfileSpec& s) { s.calibration_ids = {1, 2, 3}; }, absl::StatusCode::kInvalidArgument,
       "calibration_token_ids: give either"},
      {[](ProfileSpec& s) {
         s.calibration_text.clear();
         s.calibration_ids.assign(400, 5);
         s.calibration_ids[17] = 49152;
       },
       absl::StatusCode::kInvalidArgument, "calibration_token_ids[17]: 49152 is outside"},
      {[](ProfileSpec& s) { s.settings.top_k = 100000; }, absl::StatusCode::kInvalidArgument,
       "settings.top_k: the sparse budget sink + recent + top_k = 100064"},
      {[](ProfileSpec& s) { s.max_calibration_tokens = 0; }, absl::StatusCode::kInvalidArgument,
       "max_calibration_tokens: must be in [1, "},
      {[](ProfileSpec& s) { s.settings.index = "cpu"; }, absl::StatusCode::kInvalidArgument,
       "settings.index"},
  };
  for (const Case& tc : cases) {
    ProfileSpec spec = Spec();
    tc.edit(spec);
    auto out = RunProfile(options_, spec, nullptr);
    ASSERT_FALSE(out.ok()) << tc.text;
    EXPECT_EQ(out.status().code(), tc.code) << out.status();
    EXPECT_NE(out.status().message().find(tc.text), std::string_view::npos) << out.status();
  }
}

TEST_F(ProfileRunnerTest, ProgressErrorStopsBetweenLayers) {
  int layers = 0;
  auto out = RunProfile(options_, Spec(), [&](const Progress& p) {
    if (p.stage == "layers" && ++layers == 5) return absl::CancelledError("client went away");
    return absl::OkStatus();
  });
  EXPECT_EQ(out.status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(layers, 5);
  auto early = RunProfile(options_, Spec(), [&](const Progress& p) {
    return p.stage == "prefill" ? absl::DeadlineExceededError("deadline") : absl::OkStatus();
  });
  EXPECT_EQ(early.status().code(), absl::StatusCode::kDeadlineExceeded);
}

}  // namespace
}  // namespace tailorkv::profiler
