#include "runtime/engine.h"

#include <gtest/gtest.h>

#include "common/sha256.h"

#include <filesystem>
#include <fstream>

#include <unistd.h>

namespace tailorkv::runtime {
namespace {

const char* kModel = TAILORKV_MODEL_DIR "/SmolLM2-135M-Instruct.Q4_1.gguf";

class EngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    ASSERT_TRUE(std::filesystem::exists(kModel))
        << kModel << " is missing: run scripts/fetch_model.sh";
    auto e = Engine::Create({.model_path = kModel, .backend = "cpu", .threads = 2});
    ASSERT_TRUE(e.ok()) << e.status();
    engine_ = e->release();
  }
  static void TearDownTestSuite() {
    delete engine_;
    engine_ = nullptr;
  }
  static std::vector<int32_t> Prompt(const std::string& text) {
    return *engine_->tokenizer().Encode(text, false, false);
  }
  struct Out {
    std::string text;
    std::vector<int32_t> ids;
    int chunks = 0;
    GenerationResult result;
  };
  static Out Run(const GenerationRequest& r, int cancel_after = -1) {
    Out out;
    auto res = engine_->Generate(r, [&](const StreamChunk& c) {
      out.text += c.text;
      out.ids.insert(out.ids.end(), c.token_ids.begin(), c.token_ids.end());
      return ++out.chunks != cancel_after;
    });
    EXPECT_TRUE(res.ok()) << res.status();
    if (res.ok()) out.result = *res;
    return out;
  }
  static Engine* engine_;
};
Engine* EngineTest::engine_ = nullptr;

TEST_F(EngineTest, StreamsUpToMaxTokensAndCountsThem) {
  GenerationRequest r;
  r.prompt_tokens = Prompt("The capital of France is");
  r.max_tokens = 12;
  r.ignore_eos = true;
  auto out = Run(r);
  EXPECT_EQ(out.result.finish_reason, FinishReason::kLength);
  EXPECT_EQ(out.result.completion_tokens, 12);
  EXPECT_EQ(out.ids.size(), 12u);
  EXPECT_EQ(out.result.prompt_tokens, static_cast<int>(r.prompt_tokens.size()));
  EXPECT_EQ(out.text, engine_->tokenizer().Decode(out.ids));
  EXPECT_FALSE(out.text.empty());
}

TEST_F(EngineTest, StopStringEndsGenerationBeforeIt) {
  GenerationRequest r;
  r.prompt_tokens = Prompt("Write a list of fruits: apple, banana,");
  r.max_tokens = 24;
  r.ignore_eos = true;
  const auto full = Run(r);
  ASSERT_GT(full.text.size(), 12u);
  // A stop string taken from the middle of the unconstrained output.
  const std::string stop = full.text.substr(full.text.size() / 2, 3);
  r.stop = {stop, "never-appears-xyz"};
  const auto cut = Run(r);
  EXPECT_EQ(cut.result.finish_reason, FinishReason::kStop);
  EXPECT_EQ(cut.text, full.text.substr(0, full.text.find(stop)));
  EXPECT_LT(cut.result.completion_tokens, 24);
}

TEST_F(EngineTest, SameSeedSameTextOtherSeedDifferent) {
  GenerationRequest r;
  r.prompt_tokens = Prompt("Once upon a time");
  r.max_tokens = 20;
  r.ignore_eos = true;
  r.sampling = {.temperature = 1.2f, .top_p = 0.95f, .seed = 99};
  const auto a = Run(r), b = Run(r);
  EXPECT_EQ(a.ids, b.ids);
  r.sampling.seed = 100;
  EXPECT_NE(Run(r).ids, a.ids);
}

TEST_F(EngineTest, CallbackReturningFalseCancels) {
  GenerationRequest r;
  r.prompt_tokens = Prompt("Count: one, two, three,");
  r.max_tokens = 30;
  r.ignore_eos = true;
  const auto out = Run(r, /*cancel_after=*/3);
  EXPECT_EQ(out.result.finish_reason, FinishReason::kCancelled);
  EXPECT_EQ(out.chunks, 3);
  EXPECT_EQ(out.result.completion_tokens, 3);
}

TEST_F(EngineTest, RejectsBadRequestsNamingTheField) {
  auto expect_invalid = [](const GenerationRequest& r, const std::string& field) {
    auto res = engine_->Generate(r, [](const StreamChunk&) { return true; });
    ASSERT_EQ(res.status().code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_NE(res.status().message().find(field), std::string::npos) << res.status();
  };
  GenerationRequest ok;
  ok.prompt_tokens = {1, 2, 3};
  GenerationRequest r = ok;
  r.prompt_tokens.clear();
  expect_invalid(r, "prompt");
  r = ok;
  r.prompt_tokens.push_back(engine_->config().vocab);
  expect_invalid(r, "vocabulary");
  r = ok;
  r.max_tokens = 0;
  expect_invalid(r, "max_tokens");
  r = ok;
  r.max_tokens = engine_->max_context();
  expect_invalid(r, "context");
  r = ok;
  r.stop = {""};
  expect_invalid(r, "stop[0]");
  r = ok;
  r.sampling.top_p = 2;
  expect_invalid(r, "top_p");
}

TEST_F(EngineTest, DenseByDefaultAndReportsKvBytes) {
  const model::ModelConfig& c = engine_->config();
  EXPECT_EQ(engine_->kv_plan(), KvPlan::Dense(c.n_layers));
  EXPECT_EQ(engine_->kv_elem_bytes(), 4);  // the CPU backend keeps fp32
  const int64_t row = static_cast<int64_t>(c.n_kv_heads) * c.head_dim * 4;
  const auto per_seq = engine_->KvBytesPerSequence();
  ASSERT_EQ(per_seq.size(), static_cast<size_t>(c.n_layers));
  for (const LayerKvBytes& b : per_seq) {
    EXPECT_EQ(b.kind, KvPolicyKind::kDense);
    EXPECT_EQ(b.device_bytes, 2 * row * engine_->max_context());
    EXPECT_EQ(b.host_bytes, 0);
  }

  // While a generation runs its sequence is counted, and only then.
  KvUsage idle = engine_->KvInUse();
  EXPECT_EQ(idle.sequences, 0);
  ASSERT_EQ(idle.layers.size(), static_cast<size_t>(c.n_layers));
  for (const LayerKvBytes& b : idle.layers) EXPECT_EQ(b.total(), 0);
  GenerationRequest r;
  r.prompt_tokens = Prompt("Counting bytes:");
  r.max_tokens = 3;
  r.ignore_eos = true;
  const int capacity = static_cast<int>(r.prompt_tokens.size()) + r.max_tokens;
  // `cancelled` is polled by the scheduler at every iteration while the
  // generation runs (chunks may reach the caller after it ended).
  std::vector<KvUsage> seen;
  r.cancelled = [&] {  // also polled while it waits: counted from its start
    KvUsage u = engine_->KvInUse();
    if (u.sequences > 0 || !seen.empty()) seen.push_back(std::move(u));
    return false;
  };
  int chunks = 0;
  auto res = engine_->Generate(r, [&](const StreamChunk&) { return ++chunks > 0; });
  ASSERT_TRUE(res.ok()) << res.status();
  EXPECT_EQ(chunks, 3);
  ASSERT_GE(seen.size(), 3u);  // the prefill's iteration and two decode steps
  for (const KvUsage& u : seen) {
    EXPECT_EQ(u.sequences, 1);
    EXPECT_EQ(u.capacity_tokens, capacity);
    ASSERT_EQ(u.layers.size(), static_cast<size_t>(c.n_layers));
    for (const LayerKvBytes& b : u.layers) EXPECT_EQ(b.device_bytes, 2 * row * capacity);
  }
  const KvUsage after = engine_->KvInUse();
  EXPECT_EQ(after.sequences, 0);
  EXPECT_EQ(after.capacity_tokens, 0);
  for (const LayerKvBytes& b : after.layers) EXPECT_EQ(b.total(), 0);
}

// A plan file written for this model, with one edit applied to its JSON.
std::string WritePlanFile(const std::string& name, const std::string& text) {
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("engine_test_" + std::to_string(::getpid()) + "_" + name))
                               .string();
  std::ofstream(path) << text;
  return path;
}

TEST_F(EngineTest, RejectsBadPlansWithTheParsersMessage) {
  const model::ModelConfig& c = engine_->config();
  auto expect_rejected = [](const std::string& spec, absl::StatusCode code,
                            const std::string& message) {
    auto e = Engine::Create({.model_path = kModel, .backend = "cpu", .threads = 2, .kv_plan = spec});
    ASSERT_FALSE(e.ok()) << spec;
    EXPECT_EQ(e.status().code(), code) << e.status();
    EXPECT_NE(e.status().message().find(message), std::string::npos) << e.status();
  };
  expect_rejected("quant:3", absl::StatusCode::kInvalidArgument,
                  "kv plan spec \"quant:3\": layers[0].bits: must be 1, 2 or 4, got 3");
  expect_rejected("kivi", absl::StatusCode::kInvalidArgument, "unknown kind \"kivi\"");
  // head_dim 64: a group of 128 cannot divide it.
  expect_rejected("quant:1:128", absl::StatusCode::kInvalidArgument, "layers[0].group");
  expect_rejected("@/nonexistent/plan.json", absl::StatusCode::kNotFound, "/nonexistent/plan.json");

  model::ModelConfig other = c;
  other.n_layers = c.n_layers + 1;
  const std::string wrong_model =
      WritePlanFile("wrong_model.json", KvPlanToJson(KvPlan::Dense(other.n_layers), other));
  expect_rejected("@" + wrong_model, absl::StatusCode::kInvalidArgument,
                  wrong_model + ": model.n_layers: the plan is for n_layers " +
                      std::to_string(other.n_layers));
  std::filesystem::remove(wrong_model);

  // A sparse layer with the GPU-resident index: the CPU backend runs it too.
  KvPlan sparse = KvPlan::Dense(c.n_layers);
  sparse.name = "one-sparse";
  sparse.layers[2].kind = KvPolicyKind::kSparse;
  const std::string sparse_file = WritePlanFile("sparse.json", KvPlanToJson(sparse, c));
  auto e = Engine::Create({.model_path = kModel, .backend = "cpu", .threads = 2, .kv_plan = "@" + sparse_file});
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ((*e)->kv_plan().Summary(), "dense x29, sparse(8+56 k128 d8 gpu) x1");
  std::filesystem::remove(sparse_file);

  // Its sequences' bytes: at creation the estimate's; once the prompt ended
  // (the first decode step), also the generated rows the device tier
  // reserves then (2 x n_kv x (capacity - prompt) x head_dim x 4 bytes).
  GenerationRequest r;
  r.prompt_tokens = *(*e)->tokenizer().Encode("Counting sparse bytes:", false, false);
  r.max_tokens = 4;
  r.ignore_eos = true;
  const int capacity = static_cast<int>(r.prompt_tokens.size()) + r.max_tokens;
  const auto est = EstimateKvBytes(sparse, c, capacity, 4);
  // Polled by the scheduler before each of its iterations: the prefill's,
  // then the decode steps of tokens 2, 3 and 4.
  std::vector<int64_t> sparse_device;
  r.cancelled = [&] {  // also polled while it waits: counted from its start
    const KvUsage u = (*e)->KvInUse();
    if (u.sequences > 0 || !sparse_device.empty()) sparse_device.push_back(u.layers[2].device_bytes);
    return false;
  };
  auto res = (*e)->Generate(r, [](const StreamChunk&) { return true; });
  ASSERT_TRUE(res.ok()) << res.status();
  ASSERT_EQ(sparse_device.size(), 4u);
  const int64_t reserved = 2LL * c.n_kv_heads * (capacity - static_cast<int>(r.prompt_tokens.size())) *
                           c.head_dim * 4;
  EXPECT_EQ(sparse_device[0], est[2].device_bytes) << "before the prefill";
  EXPECT_EQ(sparse_device[1], est[2].device_bytes) << "after the prefill";
  for (int i = 2; i < 4; ++i) EXPECT_EQ(sparse_device[i], est[2].device_bytes + reserved) << "step " << i;
  EXPECT_EQ((*e)->KvInUse().layers[2].device_bytes, 0);
}

// Runs a quantized plan end to end when the CPU backend has the quant policy.
TEST(EngineKvPlan, QuantPlanGeneratesAndCountsItsBytes) {
  ASSERT_TRUE(std::filesystem::exists(kModel)) << kModel << " is missing: run scripts/fetch_model.sh";
  auto e = Engine::Create(
      {.model_path = kModel, .backend = "cpu", .threads = 2, .max_context = 512, .kv_plan = "tailorkv:2:4"});
  if (absl::IsUnimplemented(e.status())) {
    GTEST_SKIP() << "the CPU backend has no quant policy yet: " << e.status();
  }
  ASSERT_TRUE(e.ok()) << e.status();
  Engine& engine = **e;
  EXPECT_EQ(engine.kv_plan().Summary(), "quant(2b g64 r128) x4, dense x26");
  GenerationRequest r;
  r.prompt_tokens = *engine.tokenizer().Encode("The capital of France is", false, false);
  r.max_tokens = 6;
  r.ignore_eos = true;
  const int capacity = static_cast<int>(r.prompt_tokens.size()) + r.max_tokens;
  KvUsage during;
  r.cancelled = [&] {  // polled by the scheduler while the generation runs
    during = engine.KvInUse();
    return false;
  };
  int chunks = 0;
  auto res = engine.Generate(r, [&](const StreamChunk&) { return ++chunks > 0; });
  ASSERT_TRUE(res.ok()) << res.status();
  EXPECT_EQ(res->completion_tokens, 6);
  EXPECT_EQ(chunks, 6);
  const auto expected = EstimateKvBytes(engine.kv_plan(), engine.config(), capacity, 4);
  ASSERT_EQ(during.layers.size(), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(during.layers[i].kind, expected[i].kind) << i;
    EXPECT_EQ(during.layers[i].device_bytes, expected[i].device_bytes) << i;
  }
  EXPECT_EQ(during.layers[0].kind, KvPolicyKind::kQuant);
}

// Weights kept in their GGUF blocks (issue 19): the engine generates from
// them, the model file's digest is the same, and the greedy answer to a
// question SmolLM2 knows is the float weights' answer.
TEST(EngineWeights, QuantizedWeightsGenerateTheFloatAnswer) {
  ASSERT_TRUE(std::filesystem::exists(kModel)) << kModel << " is missing: run scripts/fetch_model.sh";
  std::string text[2];
  int i = 0;
  for (const char* weights : {"float", "quantized"}) {
    auto e = Engine::Create({.model_path = kModel, .backend = "cpu", .weights = weights, .threads = 2});
    ASSERT_TRUE(e.ok()) << weights << ": " << e.status();
    GenerationRequest r;
    r.prompt_tokens = *(*e)->tokenizer().Encode("The capital of France is", false, false);
    r.max_tokens = 4;
    r.ignore_eos = true;
    auto res = (*e)->Generate(r, [&](const StreamChunk& c) {
      text[i] += c.text;
      return true;
    });
    ASSERT_TRUE(res.ok()) << weights << ": " << res.status();
    EXPECT_EQ(res->completion_tokens, 4);
    ++i;
  }
  EXPECT_NE(text[0].find("Paris"), std::string::npos) << text[0];
  EXPECT_NE(text[1].find("Paris"), std::string::npos) << text[1];
}

// The engine hashes its model file; a plan naming another model is refused
// at Create and at SetKvPlan, and SetKvPlan swaps only plans it can run.
TEST(EngineDigest, ChecksPlansAgainstTheModelFilesDigestAndSwapsGoodOnes) {
  ASSERT_TRUE(std::filesystem::exists(kModel)) << kModel << " is missing: run scripts/fetch_model.sh";
  const auto digest = common::Sha256File(kModel);
  ASSERT_TRUE(digest.ok()) << digest.status();
  model::ModelConfig shape;  // SmolLM2-135M's, as plans record it
  shape.n_layers = 30;
  shape.n_kv_heads = 3;
  shape.head_dim = 64;
  KvPlan foreign = KvPlan::Dense(30);
  foreign.name = "foreign";
  foreign.model_digest = common::Sha256Tag("another model");
  const std::string foreign_file = WritePlanFile("foreign.json", KvPlanToJson(foreign, shape));
  auto refused = Engine::Create(
      {.model_path = kModel, .backend = "cpu", .threads = 2, .kv_plan = "@" + foreign_file});
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition) << refused.status();
  EXPECT_EQ(refused.status().message(), "kv plan \"foreign\" was made for model " +
                                            foreign.model_digest + ", this model is " + *digest);
  std::filesystem::remove(foreign_file);

  KvPlan own = KvPlan::Dense(30);
  own.name = "own";
  own.model_digest = *digest;
  own.layers[1].kind = KvPolicyKind::kWindow;
  own.layers[1].window = {.sink = 4, .recent = 28};
  int source_calls = 0;
  auto e = Engine::Create({.model_path = kModel,
                           .backend = "cpu",
                           .threads = 2,
                           .max_context = 512,
                           .kv_plan = "quant:3",  // ignored: the source decides
                           .kv_plan_source = [&](const model::ModelConfig& config,
                                                 const std::string& model_digest) {
                             ++source_calls;
                             EXPECT_EQ(config.n_layers, 30);
                             EXPECT_EQ(model_digest, *digest);
                             return absl::StatusOr<KvPlan>(own);
                           }});
  ASSERT_TRUE(e.ok()) << e.status();
  Engine& engine = **e;
  EXPECT_EQ(source_calls, 1);
  EXPECT_EQ(engine.model_digest(), *digest);
  EXPECT_EQ(engine.kv_plan(), own);

  KvPlan too_short = KvPlan::Dense(29);
  EXPECT_EQ(engine.SetKvPlan(too_short).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine.SetKvPlan(foreign).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(engine.kv_plan(), own);

  KvPlan next = KvPlan::Dense(30);
  next.name = "next";
  next.layers[0].kind = KvPolicyKind::kQuant;
  ASSERT_TRUE(engine.SetKvPlan(next).ok());
  EXPECT_EQ(engine.kv_plan(), next);
  GenerationRequest r;
  r.prompt_tokens = *engine.tokenizer().Encode("Plans change between requests", false, false);
  r.max_tokens = 3;
  r.ignore_eos = true;
  KvUsage during;
  r.cancelled = [&] {  // polled by the scheduler while the generation runs
    during = engine.KvInUse();
    return false;
  };
  auto res = engine.Generate(r, [](const StreamChunk&) { return true; });
  ASSERT_TRUE(res.ok()) << res.status();
  ASSERT_EQ(during.layers.size(), 30u);
  EXPECT_EQ(during.layers[0].kind, KvPolicyKind::kQuant);
  EXPECT_EQ(during.layers[1].kind, KvPolicyKind::kDense) << "the old plan's window layer is gone";

  // The source's error fails Create unchanged.
  auto failed = Engine::Create({.model_path = kModel,
                                .backend = "cpu",
                                .threads = 2,
                                .kv_plan_source = [](const model::ModelConfig&, const std::string&) {
                                  return absl::StatusOr<KvPlan>(absl::UnavailableError("no plan"));
                                }});
  EXPECT_EQ(failed.status(), absl::UnavailableError("no plan"));
}

TEST(EngineCreate, RejectsUnknownBackendAndMissingFile) {
  EXPECT_EQ(Engine::Create({.model_path = kModel, .backend = "tpu"}).status().code(),
            absl::StatusCode::kInvalidArgument);
  const auto weights = Engine::Create({.model_path = kModel, .backend = "cpu", .weights = "int3"}).status();
  EXPECT_EQ(weights.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(weights.message().find("weights"), std::string::npos) << weights;
  auto missing = Engine::Create({.model_path = "/nonexistent/model.gguf", .backend = "cpu"});
  EXPECT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("/nonexistent/model.gguf"), std::string::npos)
      << missing.status();
}

}  // namespace
}  // namespace tailorkv::runtime

namespace tailorkv::runtime {
namespace {

// Chunked prefill: the same text as one pass, and a cancel between chunks
// stops before any token is generated.
TEST(EngineChunkedPrefill, SameOutputAndCancelsBetweenChunks) {
  ASSERT_TRUE(std::filesystem::exists(kModel)) << kModel << " is missing: run scripts/fetch_model.sh";
  EngineOptions options;
  options.model_path = kModel;
  options.backend = "cpu";
  options.threads = 2;
  options.prefill_chunk = 5;
  auto chunked = Engine::Create(options);
  ASSERT_TRUE(chunked.ok()) << chunked.status();
  options.prefill_chunk = 1024;
  auto whole = Engine::Create(options);
  ASSERT_TRUE(whole.ok()) << whole.status();
  GenerationRequest r;
  r.prompt_tokens = *(*whole)->tokenizer().Encode("A short story about a robot who learns to paint:",
                                                  false, false);
  ASSERT_GT(r.prompt_tokens.size(), 10u);
  r.max_tokens = 8;
  r.ignore_eos = true;
  auto collect = [](Engine& e, const GenerationRequest& req, std::vector<int32_t>& ids) {
    return e.Generate(req, [&](const StreamChunk& c) {
      ids.insert(ids.end(), c.token_ids.begin(), c.token_ids.end());
      return true;
    });
  };
  std::vector<int32_t> a, b;
  ASSERT_TRUE(collect(**chunked, r, a).ok());
  ASSERT_TRUE(collect(**whole, r, b).ok());
  EXPECT_EQ(a, b);
  EXPECT_EQ(a.size(), 8u);

  int polls = 0;
  r.cancelled = [&polls] { return ++polls == 2; };  // cancel before the second chunk
  std::vector<int32_t> none;
  auto res = collect(**chunked, r, none);
  ASSERT_TRUE(res.ok()) << res.status();
  EXPECT_EQ(res->finish_reason, FinishReason::kCancelled);
  EXPECT_EQ(res->completion_tokens, 0);
  EXPECT_TRUE(none.empty());
  EXPECT_EQ(polls, 2);
  options.prefill_chunk = -1;
  EXPECT_EQ(Engine::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tailorkv::runtime
