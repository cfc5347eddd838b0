// The harness end to end on the real model (CPU backend), at a small scale.
#include "eval/harness.h"

#include <gtest/gtest.h>

#include <filesystem>

#include "runtime/engine.h"

namespace tailorkv::eval {
namespace {

const char* kModel = TAILORKV_MODEL_DIR "/SmolLM2-135M-Instruct.Q4_1.gguf";

class HarnessModelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!std::filesystem::exists(kModel)) return;
    runtime::EngineOptions options;
    options.model_path = kModel;
    options.backend = "cpu";
    options.threads = 2;
    auto e = runtime::Engine::Create(options);
    ASSERT_TRUE(e.ok()) << e.status();
    engine_ = e->release();
  }
  static void TearDownTestSuite() {
    delete engine_;
    engine_ = nullptr;
  }
  void SetUp() override {
    if (!std::filesystem::exists(kModel)) {
      GTEST_SKIP() << kModel << " is missing: run scripts/fetch_model.sh";
    }
    ASSERT_NE(engine_, nullptr);
  }
  static HarnessModel Model() {
    return {&engine_->backend(), &engine_->tokenizer(), &engine_->chat_template(), kModel};
  }
  static HarnessOptions SmallOptions() {
    HarnessOptions o;
    o.plans = {{"dense", runtime::KvPlan::Dense(engine_->config().n_layers)}};
    o.lengths = {512};
    o.depths = {0.25, 0.75};
    o.trials = 1;
    o.seed = 5;
    auto prose = ReadTextFile(std::string(TAILORKV_SOURCE_DIR) + "/eval/data/prose.txt");
    EXPECT_TRUE(prose.ok()) << prose.status();
    o.needle_filler_text = prose.ok() ? *prose : "";
    o.needle_filler_name = "prose.txt";
    o.agreement_text = o.needle_filler_text;
    o.agreement_text_name = "prose.txt";
    o.agreement_prefix = 384;
    o.agreement_tokens = 12;
    o.kv_capacity = 1000;
    return o;
  }
  static runtime::Engine* engine_;
};
runtime::Engine* HarnessModelTest::engine_ = nullptr;

TEST_F(HarnessModelTest, DenseRetrievesThePasskeyAndReportsEveryField) {
  HarnessOptions o = SmallOptions();
  auto cases = ParsePromptCases(
      "{\"name\": \"france\", \"prompt\": \"The capital of France is\", \"expect\": [\"Paris\"], "
      "\"max_tokens\": 6}\n",
      "inline.jsonl");
  ASSERT_TRUE(cases.ok()) << cases.status();
  o.prompt_cases = *cases;
  std::vector<std::string> progress;
  o.progress = [&](const std::string& line) { progress.push_back(line); };
  auto report = RunHarness(Model(), o);
  ASSERT_TRUE(report.ok()) << report.status();
  const nlohmann::json& r = *report;
  ASSERT_EQ(r["plans"].size(), 1u);
  const nlohmann::json& dense = r["plans"][0];
  EXPECT_EQ(dense["status"], "ok");
  EXPECT_EQ(dense["spec"], "dense");

  const nlohmann::json& pk = dense["passkey"];
  EXPECT_EQ(pk["total"], 2);
  EXPECT_EQ(pk["correct"], 2) << pk.dump(1);
  EXPECT_DOUBLE_EQ(pk["accuracy"].get<double>(), 1.0);
  ASSERT_EQ(pk["cells"].size(), 2u);
  EXPECT_EQ(pk["cells"][0]["length"], 512);
  EXPECT_EQ(pk["cells"][0]["answers"][0]["expected"].get<std::string>().size(), 5u);
  ASSERT_EQ(pk["by_length"].size(), 1u);
  ASSERT_EQ(pk["by_depth"].size(), 2u);

  const nlohmann::json& nd = dense["needle"];
  EXPECT_EQ(nd["total"], 2);
  EXPECT_TRUE(nd["accuracy"].is_number());
  EXPECT_EQ(nd["cells"][1]["answers"][0]["expected"].get<std::string>().size(), 7u);

  const nlohmann::json& ag = dense["agreement"];
  EXPECT_EQ(ag["prefix_tokens"], 384);
  EXPECT_EQ(ag["steps"], 12);
  EXPECT_DOUBLE_EQ(ag["agreement"].get<double>(), 1.0);
  EXPECT_DOUBLE_EQ(ag["ppl_diff"].get<double>(), 0.0);
  // Natural English under a trained model: far below the vocabulary's uniform ppl.
  EXPECT_GT(ag["ppl"].get<double>(), 1.0);
  EXPECT_LT(ag["ppl"].get<double>(), 200.0);

  const nlohmann::json& kv = dense["kv_bytes"];
  const auto& c = engine_->config();
  EXPECT_EQ(kv["capacity"], 1000);
  EXPECT_EQ(kv["device"].get<int64_t>(),
            int64_t{2} * c.n_layers * c.n_kv_heads * 1000 * c.head_dim * sizeof(float));
  EXPECT_EQ(kv["host"], 0);
  EXPECT_DOUBLE_EQ(kv["compression_vs_dense"].get<double>(), 1.0);
  ASSERT_EQ(kv["per_layer"].size(), static_cast<size_t>(c.n_layers));

  const nlohmann::json& pr = dense["prompts"];
  EXPECT_EQ(pr["total"], 1);
  EXPECT_EQ(pr["passed"], 1) << pr.dump(1);
  EXPECT_EQ(pr["cases"][0]["same_as_dense"], true);

  for (const char* key : {"tool", "model", "backend", "settings", "elapsed_s"}) {
    EXPECT_TRUE(r.contains(key)) << key;
  }
  EXPECT_EQ(r["settings"]["lengths"], nlohmann::json({512}));
  EXPECT_FALSE(progress.empty());

  const std::string md = RenderMarkdown(r);
  EXPECT_EQ(pk["exact_correct"], 2);
  EXPECT_NE(md.find("| dense | passkey | 100.0% | 2/2 correct (2 with the exact number first) |"),
            std::string::npos)
      << md;
  EXPECT_NE(md.find("| dense | agreement | 100.0% |"), std::string::npos) << md;
  EXPECT_NE(md.find("| dense | KV bytes | 1.00x |"), std::string::npos) << md;
  EXPECT_NE(md.find("passkey accuracy by length"), std::string::npos) << md;
}

// The real backend, except that it refuses plans with a sparse layer, as a
// backend lacking a policy does (both backends run every policy now).
class RefusesSparse final : public runtime::Backend {
 public:
  explicit RefusesSparse(runtime::Backend& inner) : inner_(inner) {}
  std::string_view name() const override { return inner_.name(); }
  const model::ModelConfig& config() const override { return inner_.config(); }
  using runtime::Backend::NewSequence;
  absl::StatusOr<std::unique_ptr<runtime::SequenceState>> NewSequence(
      int capacity, const runtime::KvPlan& plan) override {
    for (const auto& l : plan.layers) {
      if (l.kind == runtime::KvPolicyKind::kSparse) {
        return absl::UnimplementedError("sparse policy: not in this backend");
      }
    }
    return inner_.NewSequence(capacity, plan);
  }
  using runtime::Backend::Forward;
  absl::Status Forward(runtime::SequenceState& seq, absl::Span<const int32_t> tokens,
                       bool all_logits, std::vector<float>* logits, Mode mode) override {
    return inner_.Forward(seq, tokens, all_logits, logits, mode);
  }
  int preferred_prefill_chunk() const override { return inner_.preferred_prefill_chunk(); }

 private:
  runtime::Backend& inner_;
};

TEST_F(HarnessModelTest, AFailingPlanIsAnErrorEntryAndOthersStillRun) {
  RefusesSparse refusing(engine_->backend());
  HarnessModel model = Model();
  model.backend = &refusing;
  HarnessOptions o = SmallOptions();
  o.run_needle = false;
  o.run_agreement = false;
  o.lengths = {200};
  o.depths = {0.5};
  // A plan the backend refuses (Unimplemented from NewSequence).
  runtime::LayerKvPolicy sparse;
  sparse.kind = runtime::KvPolicyKind::kSparse;
  o.plans.push_back({"all-sparse", runtime::KvPlan::Uniform(engine_->config().n_layers, sparse,
                                                            "all-sparse")});
  o.plans.push_back({"dense-again", runtime::KvPlan::Dense(engine_->config().n_layers)});
  std::vector<size_t> partial_sizes;
  o.on_plan_done = [&](const nlohmann::json& partial) {
    EXPECT_EQ(partial["complete"], false);
    partial_sizes.push_back(partial["plans"].size());
  };
  auto report = RunHarness(model, o);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(partial_sizes, (std::vector<size_t>{1, 2, 3}));
  EXPECT_EQ((*report)["complete"], true);
  const nlohmann::json& plans = (*report)["plans"];
  ASSERT_EQ(plans.size(), 3u);
  EXPECT_EQ(plans[1]["status"], "error");
  EXPECT_NE(plans[1]["error"].get<std::string>().find("UNIMPLEMENTED"), std::string::npos)
      << plans[1]["error"];
  EXPECT_EQ(plans[2]["status"], "ok");
  EXPECT_EQ(plans[2]["passkey"]["correct"], plans[0]["passkey"]["correct"]);
  EXPECT_NE(RenderMarkdown(*report).find("| all-sparse | error |"), std::string::npos);
}

TEST_F(HarnessModelTest, RejectsBadOptionsNamingThem) {
  HarnessOptions o = SmallOptions();
  o.depths = {0.5, 1.5};
  auto r = RunHarness(Model(), o);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("depths"), std::string::npos) << r.status();

  o = SmallOptions();
  o.lengths = {10};  // shorter than the intro + needle + question
  r = RunHarness(Model(), o);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("lengths"), std::string::npos) << r.status();

  o = SmallOptions();
  runtime::LayerKvPolicy quant;
  quant.kind = runtime::KvPolicyKind::kQuant;
  o.plans.front() = {"q", runtime::KvPlan::Uniform(engine_->config().n_layers, quant, "q")};
  r = RunHarness(Model(), o);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("must be dense"), std::string::npos) << r.status();

  o = SmallOptions();
  o.agreement_tokens = 100000;
  r = RunHarness(Model(), o);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("agreement-tokens"), std::string::npos) << r.status();
}

}  // namespace
}  // namespace tailorkv::eval

namespace tailorkv::eval {
namespace {

// Regression: a 1-bit plan's completion held a lone continuation byte and the
// JSON write aborted the whole run (H100, 2026-11-22).
TEST(DumpReportTest, InvalidUtf8InACompletionIsReplacedNotFatal) {
  nlohmann::json report = {{"completion", std::string("ok \xe2\x82 then \x80 end")}};
  std::string out;
  ASSERT_NO_THROW(out = DumpReport(report));
  EXPECT_NE(out.find("ok \xef\xbf\xbd"), std::string::npos) << out;
  EXPECT_NE(out.find(" end"), std::string::npos) << out;
  EXPECT_EQ(nlohmann::json::parse(out)["completion"].get<std::string>().find('\x80'),
            std::string::npos);
}

}  // namespace
}  // namespace tailorkv::eval
