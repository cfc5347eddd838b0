// PlanSource against an in-process fake Profiler: what is accepted, what is
// refused and why, when the plan cache is written and when it is used. A
// synthetic model config; no model file needed.
#include "server/plan_source.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/sha256.h"
#include "server/fake_profiler_test_util.h"

namespace tailorkv::worker {
namespace {

using ::testing::HasSubstr;
using testing::FakeProfilerServer;
using testing::MakePlanMessage;
using testing::UnusedLoopbackPort;

model::ModelConfig Config() {
  model::ModelConfig c;
  c.arch = "llama";
  c.name = "test-model";
  c.n_layers = 5;
  c.n_kv_heads = 3;
  c.n_heads = 9;
  c.head_dim = 64;
  c.hidden = c.n_heads * c.head_dim;
  c.ffn = 2 * c.hidden;
  c.vocab = 101;
  c.max_context = 2048;
  return c;
}

const std::string kDigest = common::Sha256Tag("model A");
const std::string kOtherDigest = common::Sha256Tag("model B");

// Layer 0 quantized, layer 3 sparse, the rest dense; made for `digest`.
runtime::KvPlan ProfiledPlan(const std::string& digest, int top_k = 96) {
  runtime::KvPlan plan = runtime::KvPlan::Dense(5);
  plan.name = "profiled";
  plan.model_digest = digest;
  plan.layers[0].kind = runtime::KvPolicyKind::kQuant;
  plan.layers[0].quant.bits = 2;
  plan.layers[0].dense_preference = 0.375;
  plan.layers[3].kind = runtime::KvPolicyKind::kSparse;
  plan.layers[3].sparse.top_k = top_k;
  plan.layers[3].sparse_error = 0.0625;
  return plan;
}

std::string ReadFile(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteFile(const std::filesystem::path& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

class PlanSourceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("tkv_plan_source_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
    cache_ = dir_ / "plan-cache.json";
    profiler_.Start();
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  PlanSourceOptions ProfilerOptions(bool with_cache = true) const {
    PlanSourceOptions o;
    o.kv_plan = "profiler";
    o.profiler_address = profiler_.address();
    o.profiler_timeout_ms = 5000;
    if (with_cache) o.plan_cache = cache_.string();
    return o;
  }

  // Entries of the temp dir (no stray temporaries may remain).
  std::vector<std::string> DirEntries() const {
    std::vector<std::string> names;
    for (const auto& e : std::filesystem::directory_iterator(dir_)) {
      names.push_back(e.path().filename().string());
    }
    std::sort(names.begin(), names.end());
    return names;
  }

  const model::ModelConfig config_ = Config();
  std::filesystem::path dir_;
  std::filesystem::path cache_;
  FakeProfilerServer profiler_;
};

TEST_F(PlanSourceTest, FetchesTheProfilersPlanAndCachesItOnlyOnCommit) {
  const runtime::KvPlan expected = ProfiledPlan(kDigest);
  const v1::Plan message = MakePlanMessage(expected, config_);
  profiler_.service.SetPlan(message);
  PlanSource source(ProfilerOptions());
  auto plan = source.Resolve(config_, kDigest);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(*plan, expected);
  EXPECT_EQ(plan->Summary(), "quant(2b g64 r128) x1, dense x3, sparse(8+56 k96 d8 gpu) x1");
  EXPECT_EQ(profiler_.service.calls(), 1);
  EXPECT_EQ(profiler_.service.last_digest(), kDigest);
  // Accepted by the source, not yet taken by an engine: nothing on disk.
  EXPECT_FALSE(std::filesystem::exists(cache_));
  ASSERT_TRUE(source.CommitToCache().ok());
  ASSERT_TRUE(std::filesystem::exists(cache_));
  EXPECT_EQ(ReadFile(cache_), message.plan_json());
  EXPECT_EQ(DirEntries(), std::vector<std::string>{"plan-cache.json"});
  // Once: a second commit without a new plan leaves the file alone.
  WriteFile(cache_, "sentinel");
  ASSERT_TRUE(source.CommitToCache().ok());
  EXPECT_EQ(ReadFile(cache_), "sentinel");
}

TEST_F(PlanSourceTest, RefusesAnotherModelsPlanWithCheckPlanModelsText) {
  // The response claims our digest; the plan document names another model.
  v1::Plan message = MakePlanMessage(ProfiledPlan(kOtherDigest), config_);
  message.set_model_digest(kDigest);
  profiler_.service.SetPlan(message);
  PlanSource source(ProfilerOptions(/*with_cache=*/false));
  auto plan = source.Resolve(config_, kDigest);
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kFailedPrecondition) << plan.status();
  EXPECT_THAT(std::string(plan.status().message()),
              HasSubstr("plan refused: kv plan \"profiled\" was made for model " + kOtherDigest +
                        ", this model is " + kDigest));
  EXPECT_THAT(std::string(plan.status().message()), HasSubstr("no plan cache to fall back on"));
  EXPECT_TRUE(source.CommitToCache().ok());
  EXPECT_TRUE(DirEntries().empty()) << "a refused plan must not be cached";
}

TEST_F(PlanSourceTest, RefusesAResponseForAnotherDigest) {
  profiler_.service.SetPlan(MakePlanMessage(ProfiledPlan(kOtherDigest), config_));
  PlanSource source(ProfilerOptions(/*with_cache=*/false));
  auto plan = source.Resolve(config_, kDigest);
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kFailedPrecondition) << plan.status();
  EXPECT_THAT(std::string(plan.status().message()),
              HasSubstr("GetPlan for model " + kDigest + " answered plan 'plan-1' of model \"" +
                        kOtherDigest + "\""));
}

TEST_F(PlanSourceTest, RefusesAPlanThatNamesNoModel) {
  v1::Plan message = MakePlanMessage(ProfiledPlan(""), config_);
  message.set_model_digest(kDigest);
  profiler_.service.SetPlan(message);
  PlanSource source(ProfilerOptions(/*with_cache=*/false));
  auto plan = source.Resolve(config_, kDigest);
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kFailedPrecondition) << plan.status();
  EXPECT_THAT(std::string(plan.status().message()), HasSubstr("model.digest: missing"));
}

TEST_F(PlanSourceTest, ChecksumBrokenPlanIsRefusedAndTheCacheServesUnchanged) {
  // A good plan first: accepted and cached.
  const runtime::KvPlan good = ProfiledPlan(kDigest, /*top_k=*/96);
  const v1::Plan good_message = MakePlanMessage(good, config_);
  profiler_.service.SetPlan(good_message);
  {
    PlanSource source(ProfilerOptions());
    ASSERT_TRUE(source.Resolve(config_, kDigest).ok());
    ASSERT_TRUE(source.CommitToCache().ok());
  }
  // Then a plan whose content changed after its checksum was taken.
  v1::Plan broken = MakePlanMessage(ProfiledPlan(kDigest, /*top_k=*/200), config_);
  std::string json = broken.plan_json();
  const size_t at = json.find("\"top_k\":200");
  ASSERT_NE(at, std::string::npos) << json;
  json.replace(at, 11, "\"top_k\":201");
  broken.set_plan_json(json);
  profiler_.service.SetPlan(broken);

  PlanSource no_cache(ProfilerOptions(/*with_cache=*/false));
  auto refused = no_cache.Resolve(config_, kDigest);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << refused.status();
  EXPECT_THAT(std::string(refused.status().message()),
              HasSubstr("plan refused: checksum: \"sha256:"));
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("was changed or damaged"));

  PlanSource source(ProfilerOptions());
  auto plan = source.Resolve(config_, kDigest);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(*plan, good) << "the last good plan, from the cache";
  ASSERT_TRUE(source.CommitToCache().ok());
  EXPECT_EQ(ReadFile(cache_), good_message.plan_json()) << "the cache keeps the good plan";
}

TEST_F(PlanSourceTest, ProfilerDownUsesAValidCacheAndFailsWithoutOne) {
  PlanSourceOptions options = ProfilerOptions();
  options.profiler_address = "127.0.0.1:" + std::to_string(UnusedLoopbackPort());
  {
    PlanSource source(options);
    auto plan = source.Resolve(config_, kDigest);
    ASSERT_FALSE(plan.ok());
    EXPECT_EQ(plan.status().code(), absl::StatusCode::kUnavailable) << plan.status();
    const std::string message(plan.status().message());
    EXPECT_THAT(message, HasSubstr("profiler " + options.profiler_address + ": GetPlan: "));
    EXPECT_THAT(message, HasSubstr("; plan cache " + cache_.string() + " not used: cannot open it"));
    EXPECT_FALSE(std::filesystem::exists(cache_));
  }
  const runtime::KvPlan cached = ProfiledPlan(kDigest);
  const std::string cached_json = runtime::KvPlanToJson(cached, config_);
  WriteFile(cache_, cached_json);
  PlanSource source(options);
  auto plan = source.Resolve(config_, kDigest);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(*plan, cached);
  ASSERT_TRUE(source.CommitToCache().ok());
  EXPECT_EQ(ReadFile(cache_), cached_json);
  // A reload does not go back to the cache: the current plan is newer or equal.
  auto reload = source.Resolve(config_, kDigest, /*use_cache=*/false);
  EXPECT_EQ(reload.status().code(), absl::StatusCode::kUnavailable) << reload.status();
}

TEST_F(PlanSourceTest, NotFoundUsesTheCacheOnlyWhenItFitsThisModel) {
  profiler_.service.SetError(grpc::Status(grpc::StatusCode::NOT_FOUND, "no plan for that model"));
  // A cache made for another model is not used.
  WriteFile(cache_, runtime::KvPlanToJson(ProfiledPlan(kOtherDigest), config_));
  {
    PlanSource source(ProfilerOptions());
    auto plan = source.Resolve(config_, kDigest);
    ASSERT_FALSE(plan.ok());
    EXPECT_EQ(plan.status().code(), absl::StatusCode::kNotFound) << plan.status();
    const std::string message(plan.status().message());
    EXPECT_THAT(message, HasSubstr("GetPlan: no plan for that model; plan cache " +
                                   cache_.string() + " not used: kv plan \"profiled\" was made "
                                   "for model " + kOtherDigest));
  }
  // Nor one for a model of another shape.
  model::ModelConfig other_shape = config_;
  other_shape.n_layers = 6;
  runtime::KvPlan six = runtime::KvPlan::Dense(6);
  six.model_digest = kDigest;
  WriteFile(cache_, runtime::KvPlanToJson(six, other_shape));
  {
    PlanSource source(ProfilerOptions());
    auto plan = source.Resolve(config_, kDigest);
    ASSERT_FALSE(plan.ok());
    EXPECT_THAT(std::string(plan.status().message()), HasSubstr("not used: model.n_layers"));
  }
  // One for this model is.
  WriteFile(cache_, runtime::KvPlanToJson(ProfiledPlan(kDigest), config_));
  PlanSource source(ProfilerOptions());
  auto plan = source.Resolve(config_, kDigest);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(*plan, ProfiledPlan(kDigest));
  EXPECT_EQ(profiler_.service.calls(), 3);
}

TEST_F(PlanSourceTest, ASlowProfilerMeetsTheDeadline) {
  profiler_.service.SetPlan(MakePlanMessage(ProfiledPlan(kDigest), config_));
  profiler_.service.SetDelay(absl::Seconds(2));
  PlanSourceOptions options = ProfilerOptions(/*with_cache=*/false);
  options.profiler_timeout_ms = 150;
  PlanSource source(options);
  const absl::Time start = absl::Now();
  auto plan = source.Resolve(config_, kDigest);
  EXPECT_LT(absl::Now() - start, absl::Seconds(1.5));
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kDeadlineExceeded) << plan.status();
}

TEST_F(PlanSourceTest, ProfilerNeedsAModelDigest) {
  PlanSource source(ProfilerOptions());
  auto plan = source.Resolve(config_, "");
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kFailedPrecondition) << plan.status();
  EXPECT_EQ(profiler_.service.calls(), 0);
}

TEST_F(PlanSourceTest, PlanFilesNamingAnotherModelAreRefusedHandWrittenOnesAccepted) {
  const std::filesystem::path foreign = dir_ / "foreign.json";
  WriteFile(foreign, runtime::KvPlanToJson(ProfiledPlan(kOtherDigest), config_));
  PlanSourceOptions options;
  options.kv_plan = "@" + foreign.string();
  PlanSource source(options);
  auto engine_source = source.AsEngineSource();
  auto plan = engine_source(config_, kDigest);
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kFailedPrecondition) << plan.status();
  EXPECT_EQ(plan.status().message(), "kv plan \"profiled\" was made for model " + kOtherDigest +
                                         ", this model is " + kDigest);
  EXPECT_EQ(source.last_error(), plan.status());

  const std::filesystem::path hand = dir_ / "hand.json";
  WriteFile(hand, R"({"format": "tailorkv.kv_plan", "version": 1,
    "model": {"n_layers": 5, "n_kv_heads": 3, "head_dim": 64},
    "layers": [{"layer": 0, "policy": "quant", "bits": 1}, {"layer": 1, "policy": "dense"},
               {"layer": 2, "policy": "dense"}, {"layer": 3, "policy": "dense"},
               {"layer": 4, "policy": "window", "sink": 4, "recent": 60}]})");
  options.kv_plan = "@" + hand.string();
  PlanSource hand_source(options);
  auto hand_plan = hand_source.Resolve(config_, kDigest);
  ASSERT_TRUE(hand_plan.ok()) << hand_plan.status();
  EXPECT_EQ(hand_plan->Summary(), "quant(1b g64 r128) x1, dense x3, window(4+60) x1");
  EXPECT_TRUE(hand_source.last_error().ok());
}

TEST(PlanSourceOptionsTest, FlagsMustFitTogether) {
  auto message = [](const PlanSourceOptions& o) { return std::string(o.Validate().message()); };
  PlanSourceOptions o;
  EXPECT_TRUE(o.Validate().ok());
  o.kv_plan = "";
  EXPECT_THAT(message(o), HasSubstr("kv-plan: must not be empty"));
  o.kv_plan = "profiler";
  EXPECT_THAT(message(o), HasSubstr("profiler: required with --kv-plan profiler"));
  o.profiler_address = "127.0.0.1:50071";
  EXPECT_TRUE(o.Validate().ok());
  o.profiler_timeout_ms = 0;
  EXPECT_THAT(message(o), HasSubstr("profiler-timeout-ms: must be >= 1, got 0"));
  o.kv_plan = "dense";
  EXPECT_THAT(message(o), HasSubstr("profiler: used only with --kv-plan profiler"));
  o.profiler_address.clear();
  o.plan_cache = "/tmp/plan.json";
  EXPECT_THAT(message(o), HasSubstr("plan-cache: used only with --kv-plan profiler"));
}

}  // namespace
}  // namespace tailorkv::worker
