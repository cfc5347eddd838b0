#include "model/llama_weights.h"

#include <openssl/sha.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <random>

#include "absl/strings/str_format.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/gguf_file.h"
#include "model/gguf_test_util.h"
#include "nlohmann/json.hpp"

namespace tailorkv::model {
namespace {

using testing::GgufBuilder;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Tiny llama: hidden 32 (one Q8_0 block per row), 4 heads of 8, 2 KV heads,
// ffn 64, vocab 5, 2 layers.
constexpr int kHidden = 32, kHeads = 4, kKvHeads = 2, kHeadDim = 8, kFfn = 64, kVocab = 5,
              kLayers = 2;

std::vector<float> Seeded(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> dist(-64, 64);
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(dist(rng)) / 64.0f;  // exact in f16/bf16
  return v;
}

std::vector<uint8_t> F16Bytes(const std::vector<float>& v) {
  std::vector<uint8_t> out(v.size() * 2);
  for (size_t i = 0; i < v.size(); ++i) {
    const uint16_t h = FloatToHalf(v[i]);
    std::memcpy(out.data() + 2 * i, &h, 2);
  }
  return out;
}

struct TinyModelOptions {
  bool with_output = false;
  std::string arch = "llama";
  std::string skip_tensor;                  // omit this tensor
  std::string misshape_tensor;              // give this tensor a wrong shape
  std::function<void(GgufBuilder&)> extra;  // more keys or tensors
  uint32_t block_count = kLayers;           // as written in the metadata
};

std::vector<uint8_t> TinyModel(const TinyModelOptions& o = {}) {
  GgufBuilder b;
  const std::string a = o.arch;
  b.String("general.architecture", a)
      .String("general.name", "tiny")
      .U32(a + ".block_count", o.block_count)
      .U32(a + ".context_length", 256)
      .U32(a + ".embedding_length", kHidden)
      .U32(a + ".feed_forward_length", kFfn)
      .U32(a + ".attention.head_count", kHeads)
      .U32(a + ".attention.head_count_kv", kKvHeads)
      .F32(a + ".rope.freq_base", 500000.0f)
      .F32(a + ".attention.layer_norm_rms_epsilon", 1e-6f)
      .StringArray("tokenizer.ggml.tokens", {"a", "b", "c", "d", "e"});
  if (o.extra) o.extra(b);
  uint32_t seed = 1;
  auto add = [&](const std::string& name, uint64_t in, uint64_t out) {
    if (name == o.skip_tensor) return;
    std::vector<uint64_t> ne =
        out == 0 ? std::vector<uint64_t>{in} : std::vector<uint64_t>{in, out};
    if (name == o.misshape_tensor) ne.back() += 1;
    uint64_t n = 1;
    for (uint64_t d : ne) n *= d;
    const std::vector<float> values = Seeded(n, seed++);
    if (name.find("ffn_down") != std::string::npos) {
      b.Tensor(name, ne, static_cast<uint32_t>(GgmlType::kF16), F16Bytes(values));
    } else {
      b.TensorF32(name, ne, values);
    }
  };
  add("token_embd.weight", kHidden, kVocab);
  add("output_norm.weight", kHidden, 0);
  if (o.with_output) add("output.weight", kHidden, kVocab);
  for (int i = 0; i < kLayers; ++i) {
    const std::string p = "blk." + std::to_string(i) + ".";
    add(p + "attn_norm.weight", kHidden, 0);
    add(p + "attn_q.weight", kHidden, kHeads * kHeadDim);
    add(p + "attn_k.weight", kHidden, kKvHeads * kHeadDim);
    add(p + "attn_v.weight", kHidden, kKvHeads * kHeadDim);
    add(p + "attn_output.weight", kHeads * kHeadDim, kHidden);
    add(p + "ffn_norm.weight", kHidden, 0);
    add(p + "ffn_gate.weight", kHidden, kFfn);
    add(p + "ffn_up.weight", kHidden, kFfn);
    add(p + "ffn_down.weight", kFfn, kHidden);
  }
  return b.Build();
}

std::unique_ptr<GgufFile> MustParse(std::vector<uint8_t> bytes) {
  auto f = GgufFile::FromBytes("tiny.gguf", std::move(bytes));
  EXPECT_TRUE(f.ok()) << f.status();
  return f.ok() ? std::move(*f) : nullptr;
}

TEST(ConfigFromGgufTest, ReadsTinyModelConfig) {
  auto g = MustParse(TinyModel());
  ASSERT_NE(g, nullptr);
  auto c = ConfigFromGguf(*g);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->arch, "llama");
  EXPECT_EQ(c->name, "tiny");
  EXPECT_EQ(c->n_layers, kLayers);
  EXPECT_EQ(c->hidden, kHidden);
  EXPECT_EQ(c->n_heads, kHeads);
  EXPECT_EQ(c->n_kv_heads, kKvHeads);
  EXPECT_EQ(c->head_dim, kHeadDim);
  EXPECT_EQ(c->ffn, kFfn);
  EXPECT_EQ(c->vocab, kVocab);
  EXPECT_EQ(c->max_context, 256);
  EXPECT_EQ(c->rope_theta, 500000.0f);
  EXPECT_EQ(c->rms_eps, 1e-6f);
  EXPECT_EQ(c->rope_style, RopeStyle::kAdjacentPairs);
  EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kNone);
  EXPECT_TRUE(c->tied_embeddings);
}

TEST(ConfigFromGgufTest, AppliesDefaultsAndLinearScaling) {
  GgufBuilder b;
  b.String("general.architecture", "llama")
      .U32("llama.block_count", 1)
      .U32("llama.context_length", 64)
      .U32("llama.embedding_length", 32)
      .U32("llama.feed_forward_length", 64)
      .U32("llama.attention.head_count", 4)
      .String("llama.rope.scaling.type", "linear")
      .F32("llama.rope.scaling.factor", 4.0f)
      .TensorF32("token_embd.weight", {32, 3}, std::vector<float>(96));
  auto g = MustParse(b.Build());
  ASSERT_NE(g, nullptr);
  auto c = ConfigFromGguf(*g);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->n_kv_heads, 4);  // defaults to head_count
  EXPECT_EQ(c->head_dim, 8);    // hidden / heads
  EXPECT_EQ(c->rope_theta, 10000.0f);
  EXPECT_EQ(c->rms_eps, 1e-5f);
  EXPECT_EQ(c->vocab, 3);  // from token_embd when there is no token list
  EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kLinear);
  EXPECT_EQ(c->rope_scaling.factor, 4.0f);
}

TEST(ConfigFromGgufTest, RejectsOtherArchitectures) {
  for (const char* arch : {"qwen2", "mistral", "gemma"}) {
    TinyModelOptions o;
    o.arch = arch;
    auto g = MustParse(TinyModel(o));
    ASSERT_NE(g, nullptr);
    auto c = ConfigFromGguf(*g);
    EXPECT_EQ(c.status().code(), absl::StatusCode::kUnimplemented) << arch;
    EXPECT_THAT(c.status().message(), HasSubstr(arch));
  }
}

TEST(ConfigFromGgufTest, RejectsUnsupportedRopeVariants) {
  TinyModelOptions yarn;
  yarn.extra = [](GgufBuilder& b) { b.String("llama.rope.scaling.type", "yarn"); };
  auto g1 = MustParse(TinyModel(yarn));
  EXPECT_EQ(ConfigFromGguf(*g1).status().code(), absl::StatusCode::kUnimplemented);


  TinyModelOptions partial;
  partial.extra = [](GgufBuilder& b) { b.U32("llama.rope.dimension_count", 4); };
  auto g3 = MustParse(TinyModel(partial));
  EXPECT_EQ(ConfigFromGguf(*g3).status().code(), absl::StatusCode::kUnimplemented);
}

// Llama 3.x GGUFs: rope_freqs.weight (head_dim / 2 factors) divides each
// frequency; a wrong shape is InvalidArgument naming the tensor, a factor
// that is not positive and finite one naming the config field.
TEST(ConfigFromGgufTest, ReadsRopeFrequencyFactors) {
  TinyModelOptions freqs;
  freqs.extra = [](GgufBuilder& b) { b.TensorF32("rope_freqs.weight", {4}, {1, 1, 2, 8}); };
  auto g = MustParse(TinyModel(freqs));
  auto c = ConfigFromGguf(*g);
  ASSERT_TRUE(c.ok()) << c.status();
  ASSERT_EQ(c->head_dim, 8);
  EXPECT_THAT(c->rope_scaling.freq_factors, ElementsAre(1.0f, 1.0f, 2.0f, 8.0f));
  EXPECT_TRUE(c->Validate().ok());

  TinyModelOptions shape;
  shape.extra = [](GgufBuilder& b) { b.TensorF32("rope_freqs.weight", {3}, {1, 1, 2}); };
  auto g2 = MustParse(TinyModel(shape));
  auto c2 = ConfigFromGguf(*g2);
  EXPECT_EQ(c2.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(c2.status().message(), HasSubstr("rope_freqs.weight"));

  for (float bad : {0.0f, -2.0f, std::numeric_limits<float>::infinity()}) {
    TinyModelOptions o;
    o.extra = [bad](GgufBuilder& b) { b.TensorF32("rope_freqs.weight", {4}, {1, bad, 2, 8}); };
    auto g3 = MustParse(TinyModel(o));
    auto c3 = ConfigFromGguf(*g3);
    EXPECT_EQ(c3.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(c3.status().message(), HasSubstr("rope_scaling.freq_factors[1]")) << bad;
  }
}

TEST(ModelConfigTest, FreqFactorsMustMatchTheHeadAndNotStackWithLlama3) {
  ModelConfig c;
  c.arch = "llama";
  c.n_layers = 1;
  c.hidden = 16;
  c.n_heads = 2;
  c.n_kv_heads = 2;
  c.head_dim = 8;
  c.ffn = 8;
  c.vocab = 5;
  c.max_context = 64;
  c.rope_scaling.freq_factors = {1, 1, 2};
  EXPECT_THAT(c.Validate().message(), HasSubstr("freq_factors"));
  c.rope_scaling.freq_factors = {1, 1, 2, 8};
  EXPECT_TRUE(c.Validate().ok()) << c.Validate();
  c.rope_scaling.type = RopeScaling::Type::kLlama3;
  c.rope_scaling.factor = 8;
  EXPECT_THAT(c.Validate().message(), HasSubstr("twice"));
}

TEST(ConfigFromGgufTest, RejectsMissingKeyAndVocabMismatch) {
  GgufBuilder b;
  b.String("general.architecture", "llama").U32("llama.block_count", 1);
  auto g = MustParse(b.Build());
  auto c = ConfigFromGguf(*g);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(c.status().message(), HasSubstr("llama.embedding_length"));

  TinyModelOptions o;
  o.misshape_tensor = "token_embd.weight";  // 6 rows vs 5 tokens
  auto g2 = MustParse(TinyModel(o));
  auto c2 = ConfigFromGguf(*g2);
  EXPECT_EQ(c2.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(c2.status().message(), HasSubstr("tokenizer.ggml.tokens"));
}

TEST(ModelConfigTest, ValidateNamesTheBadField) {
  ModelConfig good;
  good.n_layers = 2;
  good.hidden = 32;
  good.n_heads = 4;
  good.n_kv_heads = 2;
  good.head_dim = 8;
  good.ffn = 64;
  good.vocab = 10;
  good.max_context = 128;
  ASSERT_TRUE(good.Validate().ok()) << good.Validate();
  auto expect_bad = [](ModelConfig c, const char* field) {
    const absl::Status s = c.Validate();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_THAT(s.message(), HasSubstr(field));
  };
  {
    ModelConfig c = good;
    c.n_layers = 0;
    expect_bad(c, "n_layers");
  }
  {
    ModelConfig c = good;
    c.vocab = -1;
    expect_bad(c, "vocab");
  }
  {
    ModelConfig c = good;
    c.n_kv_heads = 3;
    expect_bad(c, "n_kv_heads");
  }
  {
    ModelConfig c = good;
    c.head_dim = 7;
    expect_bad(c, "head_dim");
  }
  {
    ModelConfig c = good;
    c.rms_eps = 0;
    expect_bad(c, "rms_eps");
  }
  {
    ModelConfig c = good;
    c.rope_theta = -1;
    expect_bad(c, "rope_theta");
  }
  {
    ModelConfig c = good;
    c.rope_scaling.type = RopeScaling::Type::kLlama3;
    c.rope_scaling.factor = 8;
    c.rope_scaling.low_freq_factor = 4;
    c.rope_scaling.high_freq_factor = 1;
    expect_bad(c, "high_freq_factor");
  }
}

TEST(LoadWeightsFromGgufTest, LoadsTinyModelWithShapesAndValues) {
  auto g = MustParse(TinyModel());
  ASSERT_NE(g, nullptr);
  auto w = LoadWeightsFromGguf(*g);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->tok_embd.shape, (std::vector<int64_t>{kVocab, kHidden}));
  EXPECT_EQ(w->output_norm.shape, (std::vector<int64_t>{kHidden}));
  EXPECT_TRUE(w->output.data.empty());
  EXPECT_EQ(&w->head(), &w->tok_embd);
  ASSERT_EQ(w->layers.size(), static_cast<size_t>(kLayers));
  const LayerWeights& l1 = w->layers[1];
  EXPECT_EQ(l1.wq.shape, (std::vector<int64_t>{kHeads * kHeadDim, kHidden}));
  EXPECT_EQ(l1.wk.shape, (std::vector<int64_t>{kKvHeads * kHeadDim, kHidden}));
  EXPECT_EQ(l1.wo.shape, (std::vector<int64_t>{kHidden, kHeads * kHeadDim}));
  EXPECT_EQ(l1.w_gate.shape, (std::vector<int64_t>{kFfn, kHidden}));
  EXPECT_EQ(l1.w_down.shape, (std::vector<int64_t>{kHidden, kFfn}));
  EXPECT_EQ(l1.w_down.data.size(), static_cast<size_t>(kHidden * kFfn));
  // Tensors were written with seeds 1, 2, ... in order: token_embd = 1,
  // output_norm = 2, blk.0.* = 3..11, blk.1.attn_norm = 12, blk.1.attn_q = 13.
  EXPECT_EQ(w->tok_embd.data, Seeded(kVocab * kHidden, 1));
  EXPECT_EQ(l1.wq.data, Seeded(kHeads * kHeadDim * kHidden, 13));
  EXPECT_EQ(l1.w_down.data, Seeded(kHidden * kFfn, 20));  // F16 storage, exact values
}

TEST(LoadWeightsFromGgufTest, UntiedWhenOutputPresent) {
  TinyModelOptions o;
  o.with_output = true;
  auto g = MustParse(TinyModel(o));
  auto w = LoadWeightsFromGguf(*g);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_FALSE(w->config.tied_embeddings);
  EXPECT_EQ(w->output.shape, (std::vector<int64_t>{kVocab, kHidden}));
  EXPECT_EQ(&w->head(), &w->output);
}

TEST(LoadWeightsFromGgufTest, MissingOrMisshapedTensorIsNamed) {
  TinyModelOptions missing;
  missing.skip_tensor = "blk.1.ffn_up.weight";
  auto w1 = LoadWeightsFromGguf(*MustParse(TinyModel(missing)));
  EXPECT_EQ(w1.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(w1.status().message(), HasSubstr("blk.1.ffn_up.weight"));

  TinyModelOptions bad;
  bad.misshape_tensor = "blk.0.attn_k.weight";
  auto w2 = LoadWeightsFromGguf(*MustParse(TinyModel(bad)));
  EXPECT_EQ(w2.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(w2.status().message(), HasSubstr("blk.0.attn_k.weight"));
}

// Found by tests/fuzz/gguf_fuzz.cc: the loader sized its layer list from
// block_count before reading any layer, so a corrupt count (INT_MAX) made it
// allocate ~900 GB of empty layers (std::bad_alloc, an ASan OOM report).
TEST(LoadWeightsFromGgufTest, HugeBlockCountEndsAtTheFirstMissingLayer) {
  TinyModelOptions o;
  o.block_count = 0x7fffffff;
  auto g = MustParse(TinyModel(o));
  ASSERT_NE(g, nullptr);
  auto w = LoadWeightsFromGguf(*g);
  EXPECT_EQ(w.status().code(), absl::StatusCode::kNotFound) << w.status();
  EXPECT_THAT(w.status().message(), HasSubstr("blk." + std::to_string(kLayers) + ".attn_norm"));
}

// ---------------------------------------------------------------------------
// The real test model. CI runs scripts/fetch_model.sh first, so a missing file
// is a failure, not a skip.

const char kModelFile[] = "SmolLM2-135M-Instruct.Q4_1.gguf";

std::string RealModelPath() { return std::string(TAILORKV_MODEL_DIR) + "/" + kModelFile; }

class RealModelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!std::filesystem::exists(RealModelPath())) return;
    auto g = GgufFile::Open(RealModelPath());
    if (g.ok())
      gguf_ = std::move(*g).release();
    else
      open_error_ = new std::string(g.status().ToString());
  }
  static void TearDownTestSuite() {
    delete gguf_;
    gguf_ = nullptr;
    delete open_error_;
    open_error_ = nullptr;
  }
  void SetUp() override {
    ASSERT_TRUE(std::filesystem::exists(RealModelPath()))
        << RealModelPath() << " is missing: run scripts/fetch_model.sh";
    ASSERT_NE(gguf_, nullptr) << (open_error_ ? *open_error_ : "");
  }
  static GgufFile* gguf_;
  static std::string* open_error_;
};
GgufFile* RealModelTest::gguf_ = nullptr;
std::string* RealModelTest::open_error_ = nullptr;

TEST_F(RealModelTest, ConfigMatchesSmolLM2) {
  EXPECT_EQ(gguf_->version(), 3u);
  EXPECT_EQ(gguf_->tensors().size(), 272u);
  auto c = ConfigFromGguf(*gguf_);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->n_layers, 30);
  EXPECT_EQ(c->hidden, 576);
  EXPECT_EQ(c->n_heads, 9);
  EXPECT_EQ(c->n_kv_heads, 3);
  EXPECT_EQ(c->head_dim, 64);
  EXPECT_EQ(c->ffn, 1536);
  EXPECT_EQ(c->vocab, 49152);
  EXPECT_EQ(c->max_context, 8192);
  EXPECT_EQ(c->rope_theta, 100000.0f);
  EXPECT_EQ(c->rms_eps, 1e-5f);
  EXPECT_TRUE(c->tied_embeddings);
  EXPECT_EQ(c->rope_style, RopeStyle::kAdjacentPairs);
  auto langs = gguf_->GetStringArray("general.languages");
  ASSERT_TRUE(langs.ok()) << langs.status();
  EXPECT_THAT(*langs, ::testing::ElementsAre("en"));
  auto types = gguf_->GetIntArray("tokenizer.ggml.token_type");
  ASSERT_TRUE(types.ok());
  EXPECT_EQ(types->size(), 49152u);
}

// The first rows of `tensor` as the gguf Python package dequantizes them,
// kept as a digest (scripts/make_dequant_vectors.py) so that no weights are
// committed: our float32 bytes must hash the same. The sum and nonzero count
// say how far off a mismatch is.
void ExpectMatchesGgufRows(const std::vector<float>& got, const std::string& tensor) {
  const std::string path =
      std::string(TAILORKV_SOURCE_DIR) + "/gpu-worker/model/testdata/real_model_rows.json";
  std::ifstream in(path);
  ASSERT_TRUE(in.good()) << path;
  const nlohmann::json all = nlohmann::json::parse(in);
  ASSERT_TRUE(all.contains(tensor)) << tensor;
  const nlohmann::json& want = all[tensor];
  const size_t n = want["rows"].get<size_t>() * want["cols"].get<size_t>();
  ASSERT_GE(got.size(), n);
  double sum = 0;
  size_t nonzero = 0;
  for (size_t i = 0; i < n; ++i) {
    sum += got[i];
    nonzero += got[i] != 0.0f;
  }
  EXPECT_GT(nonzero, n / 2) << tensor;
  static_assert(std::endian::native == std::endian::little, "digests are of little-endian floats");
  unsigned char digest[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(got.data()), n * sizeof(float), digest);
  std::string hex;
  for (unsigned char c : digest) hex += absl::StrFormat("%02x", c);
  EXPECT_EQ(hex, want["sha256"].get<std::string>())
      << tensor << ": sum " << sum << " vs gguf " << want["sum"].get<double>() << ", nonzero "
      << nonzero << " vs " << want["nonzero"].get<size_t>();
}

TEST_F(RealModelTest, DequantizedRowsMatchGgufPackage) {
  auto embd = gguf_->DequantizeTensor("token_embd.weight");  // Q8_0
  ASSERT_TRUE(embd.ok()) << embd.status();
  ExpectMatchesGgufRows(*embd, "token_embd.weight");
  auto q = gguf_->DequantizeTensor("blk.0.attn_q.weight");  // Q4_1
  ASSERT_TRUE(q.ok()) << q.status();
  ExpectMatchesGgufRows(*q, "blk.0.attn_q.weight");
  auto norm = gguf_->DequantizeTensor("blk.0.attn_norm.weight");  // F32
  ASSERT_TRUE(norm.ok()) << norm.status();
  ExpectMatchesGgufRows(*norm, "blk.0.attn_norm.weight");
}

TEST_F(RealModelTest, LoadsAllWeights) {
  auto w = LoadWeightsFromGguf(*gguf_);
  ASSERT_TRUE(w.ok()) << w.status();
  ASSERT_EQ(w->layers.size(), 30u);
  EXPECT_EQ(w->tok_embd.shape, (std::vector<int64_t>{49152, 576}));
  EXPECT_EQ(w->layers[29].wk.shape, (std::vector<int64_t>{192, 576}));
  EXPECT_EQ(w->layers[29].w_down.shape, (std::vector<int64_t>{576, 1536}));
  ExpectMatchesGgufRows(w->layers[0].wq.data, "blk.0.attn_q.weight");
  for (float x : w->layers[29].w_down.data) ASSERT_TRUE(std::isfinite(x));
}

}  // namespace
}  // namespace tailorkv::model
