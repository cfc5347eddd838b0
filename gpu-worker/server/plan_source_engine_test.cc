// The real Engine (SmolLM2-135M, CPU backend) with its plan from an
// in-process fake Profiler: the plan it serves is the profiler's, the
// digest it reports is the model file's, the cache follows the engine's
// acceptance, and a reload swaps the plan only when the new one is good.
#include <filesystem>
#include <fstream>
#include <sstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include "common/sha256.h"
#include "server/fake_profiler_test_util.h"
#include "server/generation_service.h"
#include "server/plan_source.h"

namespace tailorkv::worker {
namespace {

using ::testing::HasSubstr;
using testing::FakeProfilerServer;
using testing::MakePlanMessage;

constexpr char kModelFile[] = TAILORKV_MODEL_DIR "/SmolLM2-135M-Instruct.Q4_1.gguf";

// What KvPlanToJson needs of SmolLM2-135M's shape.
model::ModelConfig SmolShape() {
  model::ModelConfig c;
  c.n_layers = 30;
  c.n_kv_heads = 3;
  c.head_dim = 64;
  return c;
}

std::string ReadFile(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Layer 0 quantized (`bits`), layers 1..3 sparse with `top_k`, the rest dense.
runtime::KvPlan Plan(const std::string& digest, int bits, int top_k) {
  runtime::KvPlan plan = runtime::KvPlan::Dense(30);
  plan.name = "profiled-b" + std::to_string(bits);
  plan.model_digest = digest;
  plan.layers[0].kind = runtime::KvPolicyKind::kQuant;
  plan.layers[0].quant.bits = bits;
  for (int l = 1; l <= 3; ++l) {
    plan.layers[l].kind = runtime::KvPolicyKind::kSparse;
    plan.layers[l].sparse.top_k = top_k;
  }
  return plan;
}

// Generates a few greedy tokens; returns how many came out.
int GenerateSome(runtime::Engine& engine) {
  runtime::GenerationRequest r;
  r.prompt_tokens = *engine.tokenizer().Encode("The capital of France is", false, false);
  r.max_tokens = 5;
  r.ignore_eos = true;
  int tokens = 0;
  auto result = engine.Generate(r, [&](const runtime::StreamChunk& c) {
    tokens += static_cast<int>(c.token_ids.size());
    return true;
  });
  EXPECT_TRUE(result.ok()) << result.status();
  return tokens;
}

TEST(PlanSourceEngineTest, ServesTheProfilersPlanAndReloadsOnlyGoodOnes) {
  ASSERT_TRUE(std::filesystem::exists(kModelFile))
      << kModelFile << " is missing: run scripts/fetch_model.sh";
  const auto digest = common::Sha256File(kModelFile);
  ASSERT_TRUE(digest.ok()) << digest.status();
  const std::filesystem::path cache = std::filesystem::temp_directory_path() /
                                      ("tkv_plan_engine_" + std::to_string(::getpid()) + ".json");
  std::filesystem::remove(cache);

  FakeProfilerServer profiler;
  profiler.Start();
  const runtime::KvPlan first = Plan(*digest, 2, 32);
  const v1::Plan first_message = MakePlanMessage(first, SmolShape(), "first");
  profiler.service.SetPlan(first_message);

  PlanSourceOptions options;
  options.kv_plan = "profiler";
  options.profiler_address = profiler.address();
  options.plan_cache = cache.string();
  PlanSource source(options);
  runtime::EngineOptions engine_options;
  engine_options.model_path = kModelFile;
  engine_options.backend = "cpu";
  engine_options.threads = 2;
  engine_options.max_context = 256;
  engine_options.kv_plan_source = source.AsEngineSource();
  auto engine = runtime::Engine::Create(engine_options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  runtime::Engine& e = **engine;
  EXPECT_EQ(e.model_digest(), *digest);
  EXPECT_EQ(profiler.service.last_digest(), *digest);
  EXPECT_EQ(e.kv_plan(), first);
  EXPECT_EQ(e.kv_plan().Summary(), "quant(2b g64 r128) x1, sparse(8+56 k32 d8 gpu) x3, dense x26");
  EXPECT_FALSE(std::filesystem::exists(cache)) << "cached before the engine took it";
  ASSERT_TRUE(source.CommitToCache().ok());
  EXPECT_EQ(ReadFile(cache), first_message.plan_json());
  EXPECT_EQ(GenerateSome(e), 5);

  // GetModelInfo reports the digest and the plan.
  GenerationServiceOptions service_options;
  service_options.model_path = kModelFile;
  GenerationService service(e, service_options);
  grpc::ServerContext context;
  v1::ModelInfo info;
  ASSERT_TRUE(service.GetModelInfo(&context, nullptr, &info).ok());
  EXPECT_EQ(info.model_digest(), *digest);
  EXPECT_EQ(info.kv_plan().summary(), first.Summary());

  // A new plan: swapped in for the next generation, and cached.
  const runtime::KvPlan second = Plan(*digest, 4, 48);
  const v1::Plan second_message = MakePlanMessage(second, SmolShape(), "second");
  profiler.service.SetPlan(second_message);
  ASSERT_TRUE(source.Reload(e).ok());
  EXPECT_EQ(e.kv_plan(), second);
  EXPECT_EQ(ReadFile(cache), second_message.plan_json());
  runtime::KvUsage during;
  runtime::GenerationRequest r;
  r.prompt_tokens = *e.tokenizer().Encode("Hello", false, false);
  r.max_tokens = 3;
  r.ignore_eos = true;
  r.cancelled = [&] {  // polled by the engine's scheduler while the generation runs
    during = e.KvInUse();
    return false;
  };
  ASSERT_TRUE(e.Generate(r, [](const runtime::StreamChunk&) { return true; }).ok());
  const auto expected = runtime::EstimateKvBytes(
      second, e.config(), static_cast<int>(r.prompt_tokens.size()) + r.max_tokens, 4);
  ASSERT_EQ(during.layers.size(), 30u);
  EXPECT_EQ(during.layers[0].kind, runtime::KvPolicyKind::kQuant);
  EXPECT_EQ(during.layers[0].device_bytes, expected[0].device_bytes) << "4-bit codes, not 2-bit";

  // Bad reloads: the plan and the cache stay as they were.
  v1::Plan foreign = MakePlanMessage(Plan(common::Sha256Tag("another model"), 1, 64), SmolShape());
  foreign.set_model_digest(*digest);
  profiler.service.SetPlan(foreign);
  absl::Status s = source.Reload(e);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("was made for model sha256:"));
  profiler.service.SetError(grpc::Status(grpc::StatusCode::NOT_FOUND, "gone"));
  s = source.Reload(e);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  EXPECT_EQ(e.kv_plan(), second);
  EXPECT_EQ(ReadFile(cache), second_message.plan_json());
  EXPECT_EQ(GenerateSome(e), 5);

  // A fresh start with the profiler saying NOT_FOUND comes up on the cache.
  PlanSource restart(options);
  engine_options.kv_plan_source = restart.AsEngineSource();
  auto again = runtime::Engine::Create(engine_options);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ((*again)->kv_plan(), second);
  std::filesystem::remove(cache);

  // ... and without the cache it does not come up, saying both why.
  PlanSource no_cache(options);
  engine_options.kv_plan_source = no_cache.AsEngineSource();
  auto refused = runtime::Engine::Create(engine_options);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kNotFound) << refused.status();
  EXPECT_THAT(std::string(refused.status().message()),
              HasSubstr("GetPlan: gone; plan cache " + cache.string() + " not used"));
  EXPECT_EQ(no_cache.last_error(), refused.status());
}

}  // namespace
}  // namespace tailorkv::worker
