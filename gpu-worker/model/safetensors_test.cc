#include "model/safetensors.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/ggml_types.h"
#include "model/llama_weights.h"
#include "nlohmann/json.hpp"

namespace tailorkv::model {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using json = nlohmann::json;

struct StTensor {
  std::string name;
  std::string dtype;  // F32, F16 or BF16
  std::vector<int64_t> shape;
  std::vector<float> values;  // encoded in `dtype`
};

std::vector<uint8_t> Encode(const StTensor& t) {
  std::vector<uint8_t> out;
  for (float v : t.values) {
    if (t.dtype == "F32") {
      uint8_t b[4];
      std::memcpy(b, &v, 4);
      out.insert(out.end(), b, b + 4);
    } else {
      const uint16_t h = t.dtype == "F16" ? FloatToHalf(v) : FloatToBf16(v);
      out.push_back(static_cast<uint8_t>(h & 0xFF));
      out.push_back(static_cast<uint8_t>(h >> 8));
    }
  }
  return out;
}

std::vector<uint8_t> WithHeader(const std::string& header, const std::vector<uint8_t>& data) {
  // Sized once (GCC 12's -Warray-bounds misreads an insert that grows an
  // 8-byte vector).
  std::vector<uint8_t> out(8 + header.size());
  const uint64_t len = header.size();
  std::memcpy(out.data(), &len, 8);
  std::copy(header.begin(), header.end(), out.begin() + 8);
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

std::vector<uint8_t> Safetensors(const std::vector<StTensor>& tensors) {
  json header = json::object();
  header["__metadata__"] = {{"format", "pt"}};
  std::vector<uint8_t> data;
  for (const StTensor& t : tensors) {
    const std::vector<uint8_t> bytes = Encode(t);
    header[t.name] = {{"dtype", t.dtype},
                      {"shape", t.shape},
                      {"data_offsets", {data.size(), data.size() + bytes.size()}}};
    data.insert(data.end(), bytes.begin(), bytes.end());
  }
  return WithHeader(header.dump(), data);
}

void WriteFile(const fs::path& p, const std::vector<uint8_t>& bytes) {
  std::ofstream out(p, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}
void WriteFile(const fs::path& p, const std::string& s) {
  WriteFile(p, std::vector<uint8_t>(s.begin(), s.end()));
}

// Values exactly representable in bf16 and f16, so every dtype round-trips.
std::vector<float> Seeded(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> dist(-32, 32);
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(dist(rng)) / 16.0f;
  return v;
}

// Tiny HF llama: hidden 8, 2 layers, 2 heads of 4, 1 KV head, ffn 12, vocab 7.
constexpr int64_t kHidden = 8, kLayers = 2, kHeads = 2, kKv = 1, kHd = 4, kFfn = 12, kVocab = 7;

json TinyConfig() {
  return {{"model_type", "llama"},
          {"hidden_size", kHidden},
          {"num_hidden_layers", kLayers},
          {"num_attention_heads", kHeads},
          {"num_key_value_heads", kKv},
          {"intermediate_size", kFfn},
          {"vocab_size", kVocab},
          {"max_position_embeddings", 512},
          {"rope_theta", 500000.0},
          {"rms_norm_eps", 1e-5},
          {"tie_word_embeddings", false},
          {"rope_scaling",
           {{"rope_type", "llama3"},
            {"factor", 8.0},
            {"low_freq_factor", 1.0},
            {"high_freq_factor", 4.0},
            {"original_max_position_embeddings", 8192}}}};
}

std::vector<StTensor> TinyTensors(bool with_lm_head) {
  std::vector<StTensor> t;
  uint32_t seed = 1;
  const char* dtypes[] = {"F32", "BF16", "F16"};
  auto add = [&](const std::string& name, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    t.push_back({name, dtypes[seed % 3], shape, Seeded(static_cast<size_t>(n), seed)});
    ++seed;
  };
  add("model.embed_tokens.weight", {kVocab, kHidden});
  add("model.norm.weight", {kHidden});
  if (with_lm_head) add("lm_head.weight", {kVocab, kHidden});
  for (int i = 0; i < kLayers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    add(p + "input_layernorm.weight", {kHidden});
    add(p + "self_attn.q_proj.weight", {kHeads * kHd, kHidden});
    add(p + "self_attn.k_proj.weight", {kKv * kHd, kHidden});
    add(p + "self_attn.v_proj.weight", {kKv * kHd, kHidden});
    add(p + "self_attn.o_proj.weight", {kHidden, kHeads * kHd});
    add(p + "post_attention_layernorm.weight", {kHidden});
    add(p + "mlp.gate_proj.weight", {kFfn, kHidden});
    add(p + "mlp.up_proj.weight", {kFfn, kHidden});
    add(p + "mlp.down_proj.weight", {kHidden, kFfn});
  }
  return t;
}

class SafetensorsDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(::testing::TempDir()) /
           ("st_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

TEST_F(SafetensorsDirTest, LoadsSingleFileModelWithMixedDtypes) {
  const auto tensors = TinyTensors(/*with_lm_head=*/true);
  WriteFile(dir_ / "config.json", TinyConfig().dump());
  WriteFile(dir_ / "model.safetensors", Safetensors(tensors));
  auto w = LoadWeightsFromSafetensors(dir_.string());
  ASSERT_TRUE(w.ok()) << w.status();
  const ModelConfig& c = w->config;
  EXPECT_EQ(c.arch, "llama");
  EXPECT_EQ(c.hidden, kHidden);
  EXPECT_EQ(c.n_layers, kLayers);
  EXPECT_EQ(c.n_heads, kHeads);
  EXPECT_EQ(c.n_kv_heads, kKv);
  EXPECT_EQ(c.head_dim, kHd);
  EXPECT_EQ(c.ffn, kFfn);
  EXPECT_EQ(c.vocab, kVocab);
  EXPECT_EQ(c.max_context, 512);
  EXPECT_EQ(c.rope_theta, 500000.0f);
  EXPECT_EQ(c.rms_eps, 1e-5f);
  EXPECT_EQ(c.rope_style, RopeStyle::kHalves);
  EXPECT_FALSE(c.tied_embeddings);
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_EQ(c.rope_scaling.factor, 8.0f);
  EXPECT_EQ(c.rope_scaling.low_freq_factor, 1.0f);
  EXPECT_EQ(c.rope_scaling.high_freq_factor, 4.0f);
  EXPECT_EQ(c.rope_scaling.original_max_position, 8192);

  EXPECT_EQ(w->tok_embd.data, tensors[0].values);     // BF16 (seed 1)
  EXPECT_EQ(w->output_norm.data, tensors[1].values);  // F16 (seed 2)
  EXPECT_EQ(w->output.data, tensors[2].values);       // F32 (seed 3)
  EXPECT_EQ(&w->head(), &w->output);
  ASSERT_EQ(w->layers.size(), 2u);
  EXPECT_EQ(w->layers[1].wo.shape, (std::vector<int64_t>{kHidden, kHeads * kHd}));
  EXPECT_EQ(w->layers[1].w_down.data, tensors.back().values);
  EXPECT_EQ(w->layers[0].wk.data, tensors[5].values);
}

TEST_F(SafetensorsDirTest, LoadsShardedTiedModel) {
  auto config = TinyConfig();
  config["tie_word_embeddings"] = true;
  config.erase("rope_scaling");
  config.erase("num_key_value_heads");  // defaults to num_attention_heads
  WriteFile(dir_ / "config.json", config.dump());
  auto tensors = TinyTensors(/*with_lm_head=*/false);
  for (StTensor& t : tensors) {
    if (t.name.find("k_proj") != std::string::npos || t.name.find("v_proj") != std::string::npos) {
      t.shape[0] = kHeads * kHd;
      t.values = Seeded(static_cast<size_t>(t.shape[0] * t.shape[1]), 99);
    }
  }
  const size_t half = tensors.size() / 2;
  const std::vector<StTensor> a(tensors.begin(), tensors.begin() + half),
      b(tensors.begin() + half, tensors.end());
  WriteFile(dir_ / "model-00001-of-00002.safetensors", Safetensors(a));
  WriteFile(dir_ / "model-00002-of-00002.safetensors", Safetensors(b));
  json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", json::object()}};
  for (const StTensor& t : a) index["weight_map"][t.name] = "model-00001-of-00002.safetensors";
  for (const StTensor& t : b) index["weight_map"][t.name] = "model-00002-of-00002.safetensors";
  WriteFile(dir_ / "model.safetensors.index.json", index.dump());

  auto w = LoadWeightsFromSafetensors(dir_.string());
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_TRUE(w->config.tied_embeddings);
  EXPECT_EQ(w->config.n_kv_heads, kHeads);
  EXPECT_EQ(w->config.rope_scaling.type, RopeScaling::Type::kNone);
  EXPECT_TRUE(w->output.data.empty());
  EXPECT_EQ(&w->head(), &w->tok_embd);
  EXPECT_EQ(w->layers[1].w_down.data, tensors.back().values);
}

TEST_F(SafetensorsDirTest, ReportsConfigAndTensorProblems) {
  WriteFile(dir_ / "model.safetensors", Safetensors(TinyTensors(true)));
  // No config.json.
  EXPECT_EQ(LoadWeightsFromSafetensors(dir_.string()).status().code(), absl::StatusCode::kNotFound);
  // Missing required field.
  auto config = TinyConfig();
  config.erase("intermediate_size");
  WriteFile(dir_ / "config.json", config.dump());
  auto s1 = LoadWeightsFromSafetensors(dir_.string());
  EXPECT_EQ(s1.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s1.status().message(), HasSubstr("intermediate_size"));
  // Invalid JSON.
  WriteFile(dir_ / "config.json", std::string("{\"hidden_size\": 8,"));
  EXPECT_EQ(LoadWeightsFromSafetensors(dir_.string()).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Unsupported model type and rope scaling.
  config = TinyConfig();
  config["model_type"] = "qwen2";
  WriteFile(dir_ / "config.json", config.dump());
  EXPECT_EQ(LoadWeightsFromSafetensors(dir_.string()).status().code(),
            absl::StatusCode::kUnimplemented);
  config = TinyConfig();
  config["rope_scaling"] = {{"type", "yarn"}, {"factor", 4.0}};
  WriteFile(dir_ / "config.json", config.dump());
  EXPECT_EQ(LoadWeightsFromSafetensors(dir_.string()).status().code(),
            absl::StatusCode::kUnimplemented);
  // Wrong tensor shape is named.
  config = TinyConfig();
  config["intermediate_size"] = kFfn + 1;
  WriteFile(dir_ / "config.json", config.dump());
  auto s2 = LoadWeightsFromSafetensors(dir_.string());
  EXPECT_EQ(s2.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s2.status().message(), HasSubstr("model.layers.0.mlp.gate_proj.weight"));
  // Missing lm_head while untied.
  WriteFile(dir_ / "config.json", TinyConfig().dump());
  WriteFile(dir_ / "model.safetensors", Safetensors(TinyTensors(false)));
  auto s3 = LoadWeightsFromSafetensors(dir_.string());
  EXPECT_EQ(s3.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s3.status().message(), HasSubstr("lm_head.weight"));
}

// The defect tests/fuzz/gguf_fuzz.cc found in the GGUF loader, here too:
// num_hidden_layers sized the layer list before any layer was read, so
// INT_MAX in config.json meant allocating ~900 GB of empty layers.
TEST_F(SafetensorsDirTest, HugeLayerCountEndsAtTheFirstMissingLayer) {
  auto config = TinyConfig();
  config["num_hidden_layers"] = 0x7fffffff;
  WriteFile(dir_ / "config.json", config.dump());
  WriteFile(dir_ / "model.safetensors", Safetensors(TinyTensors(/*with_lm_head=*/true)));
  auto w = LoadWeightsFromSafetensors(dir_.string());
  EXPECT_EQ(w.status().code(), absl::StatusCode::kNotFound) << w.status();
  EXPECT_THAT(w.status().message(),
              HasSubstr("model.layers." + std::to_string(kLayers) + ".input_layernorm"));
}

TEST_F(SafetensorsDirTest, RejectsIndexEscapingTheDirectory) {
  WriteFile(dir_ / "config.json", TinyConfig().dump());
  json index = {{"weight_map", {{"model.embed_tokens.weight", "../elsewhere.safetensors"}}}};
  WriteFile(dir_ / "model.safetensors.index.json", index.dump());
  auto s = LoadWeightsFromSafetensors(dir_.string());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.status().message(), HasSubstr("not a plain file name"));
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> Parse(std::vector<uint8_t> bytes) {
  return SafetensorsFile::FromBytes("t.safetensors", std::move(bytes));
}

TEST(SafetensorsFileTest, ParsesAndConvertsEachDtype) {
  const std::vector<float> v = {1.5f, -2.0f, 0.0f, 3.25f, -0.125f};
  for (const char* dtype : {"F32", "F16", "BF16"}) {
    auto f = Parse(Safetensors({{"x", dtype, {5}, v}, {"y", dtype, {1, 1}, {7.0f}}}));
    ASSERT_TRUE(f.ok()) << f.status();
    ASSERT_EQ((*f)->tensors().size(), 2u);
    EXPECT_EQ(*(*f)->ToFloat("x"), v) << dtype;
    EXPECT_EQ(*(*f)->ToFloat("y"), std::vector<float>{7.0f}) << dtype;
    EXPECT_EQ((*f)->ToFloat("z").status().code(), absl::StatusCode::kNotFound);
  }
}

TEST(SafetensorsFileTest, RejectsHeaderLengthPastEndOfFile) {
  auto bytes = Safetensors({{"x", "F32", {2}, {1, 2}}});
  const uint64_t huge = bytes.size();  // header + 8 cannot fit
  std::memcpy(bytes.data(), &huge, 8);
  auto f = Parse(bytes);
  EXPECT_EQ(f.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(f.status().message(), HasSubstr("t.safetensors: header length"));
  EXPECT_EQ(Parse({1, 2, 3}).status().code(), absl::StatusCode::kDataLoss);
  // Every truncation of a valid file fails cleanly.
  const auto full = Safetensors({{"x", "F32", {2}, {1, 2}}, {"y", "BF16", {3}, {1, 2, 3}}});
  ASSERT_TRUE(Parse(full).ok());
  for (size_t len = 0; len < full.size(); ++len) {
    EXPECT_FALSE(Parse(std::vector<uint8_t>(full.begin(), full.begin() + len)).ok()) << len;
  }
}

TEST(SafetensorsFileTest, RejectsOffsetsOutOfRange) {
  const std::vector<uint8_t> data(8);
  auto f =
      Parse(WithHeader(R"({"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}})", data));
  EXPECT_EQ(f.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(f.status().message(), HasSubstr("tensor 'x'"));
  auto g =
      Parse(WithHeader(R"({"x": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}})", data));
  EXPECT_EQ(g.status().code(), absl::StatusCode::kInvalidArgument);
  auto h = Parse(WithHeader(
      R"({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 18446744073709551615]}})", data));
  EXPECT_EQ(h.status().code(), absl::StatusCode::kDataLoss);
}

TEST(SafetensorsFileTest, RejectsDtypeShapeMismatch) {
  const std::vector<uint8_t> data(12);
  auto f =
      Parse(WithHeader(R"({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}})", data));
  EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(f.status().message(), HasSubstr("dtype F32 and shape [2]"));
  auto g = Parse(WithHeader(
      R"({"x": {"dtype": "BF16", "shape": [4294967296, 4294967296], "data_offsets": [0, 12]}})",
      data));
  EXPECT_FALSE(g.ok());
  auto h =
      Parse(WithHeader(R"({"x": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}})", data));
  EXPECT_THAT(h.status().message(), HasSubstr("unknown dtype 'Q4'"));
}

TEST(SafetensorsFileTest, RejectsMalformedJson) {
  const std::vector<uint8_t> data(8);
  for (const char* header :
       {R"({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})",  // unterminated
        R"([1, 2])", R"({"x": 5})", R"({"x": {"shape": [2], "data_offsets": [0, 8]}})",
        R"({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}})",
        R"({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0]}})",
        R"({"x": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}})"}) {
    auto f = Parse(WithHeader(header, data));
    EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument) << header;
  }
}

TEST(SafetensorsFileTest, ConvertsOnlyFloatDtypes) {
  const std::vector<uint8_t> data(16);
  auto f = Parse(WithHeader(
      R"({"__metadata__": {"a": "b"}, "i": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}})",
      data));
  ASSERT_TRUE(f.ok()) << f.status();
  auto v = (*f)->ToFloat("i");
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(v.status().message(), HasSubstr("I64"));
}

}  // namespace
}  // namespace tailorkv::model
