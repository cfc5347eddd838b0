// KV plans on the CPU backend with the real SmolLM2-135M model (label
// "model"; skipped when the file is missing).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>

#include "model/gguf_file.h"
#include "model/llama_weights.h"
#include "runtime/cpu_backend.h"
#include "runtime/kv_plan.h"
#include "runtime/quant_kv.h"
#include "tokenizer/tokenizer.h"

namespace tailorkv::runtime {
namespace {

std::string ModelPath() { return std::string(TAILORKV_MODEL_DIR) + "/SmolLM2-135M-Instruct.Q4_1.gguf"; }

class CpuBackendRealModel : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!std::filesystem::exists(ModelPath())) return;
    auto gguf = model::GgufFile::Open(ModelPath());
    ASSERT_TRUE(gguf.ok()) << gguf.status();
    auto weights = model::LoadWeightsFromGguf(**gguf);
    ASSERT_TRUE(weights.ok()) << weights.status();
    auto spec = tokenizer::TokenizerSpecFromGguf(**gguf);
    ASSERT_TRUE(spec.ok()) << spec.status();
    auto tok = tokenizer::Tokenizer::Create(*std::move(spec));
    ASSERT_TRUE(tok.ok()) << tok.status();
    tokenizer_ = tok->release();
    auto backend = CreateCpuBackend(*std::move(weights), {.threads = 2});
    ASSERT_TRUE(backend.ok()) << backend.status();
    backend_ = backend->release();
  }
  static void TearDownTestSuite() {
    delete backend_;
    delete tokenizer_;
    backend_ = nullptr;
    tokenizer_ = nullptr;
  }
  void SetUp() override {
    if (!std::filesystem::exists(ModelPath())) GTEST_SKIP() << ModelPath() << " is missing";
    ASSERT_NE(backend_, nullptr);
  }

  struct Run {
    std::vector<float> prefill_logits;            // every prompt position
    std::vector<std::vector<float>> step_logits;  // one per generated token
    std::vector<int32_t> generated;
  };
  // Prefill in one call, then greedy decode of `steps` tokens.
  static Run Greedy(const KvPlan& plan, const std::vector<int32_t>& prompt, int steps) {
    Run r;
    auto seq = backend_->NewSequence(static_cast<int>(prompt.size()) + steps, plan);
    EXPECT_TRUE(seq.ok()) << seq.status();
    if (!seq.ok()) return r;
    EXPECT_TRUE(backend_->Forward(**seq, prompt, true, &r.prefill_logits).ok());
    const int V = backend_->config().vocab;
    std::vector<float> last(r.prefill_logits.end() - V, r.prefill_logits.end());
    for (int s = 0; s < steps; ++s) {
      const int32_t next = static_cast<int32_t>(std::max_element(last.begin(), last.end()) - last.begin());
      r.generated.push_back(next);
      EXPECT_TRUE(backend_->Forward(**seq, absl::MakeConstSpan(&next, 1), false, &last).ok());
      r.step_logits.push_back(last);
    }
    EXPECT_EQ((*seq)->length(), static_cast<int>(prompt.size()) + steps);
    return r;
  }

  static Backend* backend_;
  static tokenizer::Tokenizer* tokenizer_;
};

Backend* CpuBackendRealModel::backend_ = nullptr;
tokenizer::Tokenizer* CpuBackendRealModel::tokenizer_ = nullptr;

// Short prompt: 32 steps never fill the 128-token residual, so the plan
// reproduces dense bit for bit, prefill and every decode step.
TEST_F(CpuBackendRealModel, TailorKvOneBitShortPromptMatchesDense) {
  const auto& c = backend_->config();
  auto plan = ParseKvPlanSpec("tailorkv:1", c);
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ(plan->layers[0].kind, KvPolicyKind::kQuant);
  ASSERT_EQ(plan->layers[0].quant.bits, 1);
  const auto prompt = *tokenizer_->Encode("The capital of France is", false, false);
  const Run dense = Greedy(KvPlan::Dense(c.n_layers), prompt, 32);
  const Run q = Greedy(*plan, prompt, 32);
  ASSERT_EQ(q.prefill_logits.size(), dense.prefill_logits.size());
  EXPECT_EQ(std::memcmp(q.prefill_logits.data(), dense.prefill_logits.data(), sizeof(float) * q.prefill_logits.size()), 0)
      << "prefill attends in full precision";
  EXPECT_EQ(q.generated, dense.generated);
  std::printf("tailorkv:1 greedy: %s\n", tokenizer_->Decode(q.generated).c_str());
}

// A 400-token prompt: decode attends over 1-bit codes in layer 0 (3 blocks
// of 128 keys quantized). Prefill still equals dense exactly; decode runs,
// stays finite and departs from dense.
TEST_F(CpuBackendRealModel, TailorKvOneBitLongPromptDecodesOverCodes) {
  const auto& c = backend_->config();
  const KvPlan plan = *ParseKvPlanSpec("tailorkv:1", c);
  std::string text;
  for (int i = 0; text.size() < 1800; ++i) {
    text += "Paris is the capital of France, and Berlin is the capital of Germany. Rome, number " +
            std::to_string(i) + ", is in Italy. ";
  }
  auto prompt = *tokenizer_->Encode(text, false, false);
  ASSERT_GE(prompt.size(), 400u);
  prompt.resize(400);
  const Run dense = Greedy(KvPlan::Dense(c.n_layers), prompt, 32);
  const Run q = Greedy(plan, prompt, 32);
  EXPECT_EQ(std::memcmp(q.prefill_logits.data(), dense.prefill_logits.data(), sizeof(float) * q.prefill_logits.size()), 0);
  float max_diff = 0;
  int same = 0;
  for (int s = 0; s < 32; ++s) {
    for (size_t i = 0; i < q.step_logits[s].size(); ++i) {
      ASSERT_TRUE(std::isfinite(q.step_logits[s][i])) << "step " << s;
      max_diff = std::max(max_diff, std::fabs(q.step_logits[s][i] - dense.step_logits[s][i]));
    }
    same += q.generated[s] == dense.generated[s];
  }
  std::printf("tailorkv:1 after 400 tokens: max |logit - dense| %.4g, %d/32 greedy tokens equal\n", max_diff, same);
  EXPECT_GT(max_diff, 0.0f) << "layer 0 decodes over codes";
}

// TailorKV's plan (layer 0 2-bit, the rest sparse 8 + 56 + Top-128 of 8
// channels) after a 600-token prompt: prefill is plain attention, so its
// logits equal dense bit for bit; 32 decode steps select 128 of the 536
// candidates per KV head, stay finite and depart from dense.
TEST_F(CpuBackendRealModel, HybridPlanAfterLongPromptSelectsTopK) {
  const auto& c = backend_->config();
  auto plan = ParseKvPlanSpec("hybrid:2:128:8:56", c);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->Summary(), "quant(2b g64 r128) x1, sparse(8+56 k128 d8 faithful) x" + std::to_string(c.n_layers - 1));
  std::string text;
  for (int i = 0; text.size() < 3000; ++i) {
    text += "The river passes the old mill, number " + std::to_string(i) +
            ", where the miller keeps a ledger of every sack of grain. ";
  }
  auto prompt = *tokenizer_->Encode(text, false, false);
  ASSERT_GE(prompt.size(), 600u);
  prompt.resize(600);
  const Run dense = Greedy(KvPlan::Dense(c.n_layers), prompt, 32);
  const Run h = Greedy(*plan, prompt, 32);
  ASSERT_EQ(h.prefill_logits.size(), dense.prefill_logits.size());
  EXPECT_EQ(std::memcmp(h.prefill_logits.data(), dense.prefill_logits.data(), sizeof(float) * h.prefill_logits.size()), 0)
      << "prefill attends in full precision";
  ASSERT_EQ(h.step_logits.size(), 32u);
  float max_diff = 0;
  int same = 0;
  for (int s = 0; s < 32; ++s) {
    for (size_t i = 0; i < h.step_logits[s].size(); ++i) {
      ASSERT_TRUE(std::isfinite(h.step_logits[s][i])) << "step " << s;
      max_diff = std::max(max_diff, std::fabs(h.step_logits[s][i] - dense.step_logits[s][i]));
    }
    same += h.generated[s] == dense.generated[s];
  }
  std::printf("hybrid:2:128:8:56 after 600 tokens: max |logit - dense| %.4g, %d/32 greedy tokens equal\n%s\n",
              max_diff, same, tokenizer_->Decode(h.generated).c_str());
  EXPECT_GT(max_diff, 0.0f) << "decode attends over a selection";

  // The GPU-resident index (fixed channels, speculative query).
  auto gpu_plan = ParseKvPlanSpec("hybrid:2:128:8:56:gpu", c);
  ASSERT_TRUE(gpu_plan.ok()) << gpu_plan.status();
  const Run g = Greedy(*gpu_plan, prompt, 32);
  EXPECT_EQ(std::memcmp(g.prefill_logits.data(), dense.prefill_logits.data(), sizeof(float) * g.prefill_logits.size()), 0);
  int same_gpu = 0;
  float max_diff_gpu = 0;
  for (int s = 0; s < 32; ++s) {
    for (size_t i = 0; i < g.step_logits[s].size(); ++i) {
      ASSERT_TRUE(std::isfinite(g.step_logits[s][i])) << "step " << s;
      max_diff_gpu = std::max(max_diff_gpu, std::fabs(g.step_logits[s][i] - dense.step_logits[s][i]));
    }
    same_gpu += g.generated[s] == dense.generated[s];
  }
  std::printf("hybrid:2:128:8:56:gpu: max |logit - dense| %.4g, %d/32 greedy tokens equal\n", max_diff_gpu, same_gpu);
  EXPECT_GT(max_diff_gpu, 0.0f);
  EXPECT_GE(same_gpu, 8) << "a selection that keeps the text on track for a while";
}

// Weights kept in their GGUF blocks (issue 19; WeightLoadOptions::
// keep_quantized): every linear weight and the token embedding stay Q4_1 /
// Q8_0 views of the file, and the backend multiplies them against int8
// activations. Against the float32 copies of the same weights, teacher-
// forced with the float run's tokens, for a dense and a sparse plan (the
// sparse layers' speculative query dequantizes wq on first use).
TEST_F(CpuBackendRealModel, QuantizedWeightsFollowTheFloatWeights) {
  auto gguf = model::GgufFile::Open(ModelPath());
  ASSERT_TRUE(gguf.ok()) << gguf.status();
  std::shared_ptr<const model::GgufFile> file(std::move(*gguf));
  auto qw = model::LoadWeightsFromGguf(file, {.keep_quantized = true});
  ASSERT_TRUE(qw.ok()) << qw.status();
  const model::ModelConfig c = qw->config;
  EXPECT_EQ(qw->QuantizedTensors(), 7 * c.n_layers + 1);  // 7 linear weights a layer + tok_embd
  EXPECT_EQ(qw->tok_embd.quant.type, model::GgmlType::kQ8_0);
  EXPECT_EQ(qw->layers[3].w_down.quant.type, model::GgmlType::kQ4_1);
  EXPECT_TRUE(qw->layers[3].w_down.data.empty());
  EXPECT_FALSE(qw->layers[3].ffn_norm.quantized());  // F32 in the file
  EXPECT_NE(qw->storage, nullptr);
  // Dequantize() gives the float loader's values, bit for bit.
  {
    model::ModelWeights copy = *qw;
    ASSERT_TRUE(copy.Dequantize().ok());
    EXPECT_EQ(copy.QuantizedTensors(), 0);
    EXPECT_EQ(copy.storage, nullptr);
    auto fw = model::LoadWeightsFromGguf(*file);
    ASSERT_TRUE(fw.ok());
    EXPECT_EQ(copy.layers[7].wv.data, fw->layers[7].wv.data);
    EXPECT_EQ(copy.tok_embd.data, fw->tok_embd.data);
  }
  auto qb = CreateCpuBackend(*std::move(qw), {.threads = 2});
  ASSERT_TRUE(qb.ok()) << qb.status();
  file.reset();  // the weights keep the mapping alive

  const std::string text =
      "Alice keeps the spare key under the blue flower pot by the back door. Bob, who lives next door, "
      "waters her plants on Tuesdays. Where is the spare key? It is";
  const auto prompt = *tokenizer_->Encode(text, false, false);
  const int V = c.vocab, steps = 24;
  for (const char* spec : {"dense", "hybrid:2:16:4:8:32:gpu:late:i8"}) {
    SCOPED_TRACE(spec);
    auto plan = ParseKvPlanSpec(spec, c);
    ASSERT_TRUE(plan.ok()) << plan.status();
    const Run ref = Greedy(*plan, prompt, steps);
    auto seq = (*qb)->NewSequence(static_cast<int>(prompt.size()) + steps, *plan);
    ASSERT_TRUE(seq.ok()) << seq.status();
    std::vector<float> logits;
    ASSERT_TRUE((*qb)->Forward(**seq, prompt, false, &logits).ok());
    float worst = 0;  // max |logit diff| / max |reference logit| over the steps
    int same = 0;
    for (int s = 0; s <= steps; ++s) {
      const float* want = s == 0 ? ref.prefill_logits.data() + ref.prefill_logits.size() - V
                                 : ref.step_logits[static_cast<size_t>(s - 1)].data();
      float diff = 0, scale = 0;
      for (int i = 0; i < V; ++i) {
        ASSERT_TRUE(std::isfinite(logits[static_cast<size_t>(i)])) << "step " << s;
        diff = std::max(diff, std::fabs(logits[static_cast<size_t>(i)] - want[i]));
        scale = std::max(scale, std::fabs(want[i]));
      }
      worst = std::max(worst, diff / scale);
      const int32_t top = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
      same += top == static_cast<int32_t>(std::max_element(want, want + V) - want);
      if (s == steps) break;
      const int32_t next = ref.generated[static_cast<size_t>(s)];
      ASSERT_TRUE((*qb)->Forward(**seq, absl::MakeConstSpan(&next, 1), false, &logits).ok());
    }
    std::printf("%s: quantized weights vs float32: max |diff| / max |logit| %.4f, top-1 %d/%d\n", spec, worst, same,
                steps + 1);
    EXPECT_GT(worst, 0.0f) << "a different arithmetic";
    EXPECT_LT(worst, 0.08f);
    EXPECT_GE(same, steps * 9 / 10);
  }
}

}  // namespace
}  // namespace tailorkv::runtime
