#include "runtime/kv_plan.h"

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace tailorkv::runtime {
namespace {

using json = nlohmann::json;
using ::testing::HasSubstr;

model::ModelConfig Config(int n_layers = 5, int n_kv_heads = 3, int head_dim = 64) {
  model::ModelConfig c;
  c.arch = "llama";
  c.name = "test-model";
  c.n_layers = n_layers;
  c.n_heads = n_kv_heads * 3;
  c.n_kv_heads = n_kv_heads;
  c.head_dim = head_dim;
  c.hidden = c.n_heads * head_dim;
  c.ffn = 2 * c.hidden;
  c.vocab = 101;
  c.max_context = 2048;
  return c;
}

// Every policy with non-default parameters, so a dropped field shows.
KvPlan MixedPlan() {
  KvPlan plan = KvPlan::Dense(5);
  plan.name = "mixed \"plan\" \u00e9";
  plan.layers[0].kind = KvPolicyKind::kQuant;
  plan.layers[0].quant = {2, 32, 96};
  plan.layers[0].dense_preference = 0.125;
  plan.layers[2].kind = KvPolicyKind::kWindow;
  plan.layers[2].window = {0, 7};
  plan.layers[3].kind = KvPolicyKind::kSparse;
  plan.layers[3].sparse = {3, 5, 17, 11, "faithful"};
  plan.layers[3].dense_preference = 0.7312345678901234;
  plan.layers[4].kind = KvPolicyKind::kQuant;
  plan.layers[4].quant = {4, 64, 4096};
  return plan;
}

std::string StatusText(const absl::Status& st) { return std::string(st.message()); }

TEST(KvPlanTest, JsonRoundTripsEveryPolicy) {
  const model::ModelConfig c = Config();
  const KvPlan plan = MixedPlan();
  ASSERT_TRUE(plan.Validate(c).ok()) << plan.Validate(c);
  const std::string text = KvPlanToJson(plan, c);
  auto parsed = ParseKvPlanJson(text, c);
  ASSERT_TRUE(parsed.ok()) << parsed.status() << "\n" << text;
  EXPECT_EQ(*parsed, plan);
  EXPECT_EQ(KvPlanToJson(*parsed, c), text);
  // One layer per line.
  EXPECT_THAT(text, HasSubstr("\n    {\"layer\":1,\"policy\":\"dense\"},\n"));
}

TEST(KvPlanTest, OmittedParametersTakeDefaults) {
  const model::ModelConfig c = Config(2);
  auto plan = ParseKvPlanJson(R"({"format": "tailorkv.kv_plan", "version": 1,
      "model": {"n_layers": 2, "n_kv_heads": 3, "head_dim": 64},
      "layers": [{"layer": 0, "policy": "quant", "bits": 2}, {"layer": 1, "policy": "sparse"}],
      "profile": {"anything": [1, 2]}})",
                              c);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->name, "");
  EXPECT_EQ(plan->layers[0].kind, KvPolicyKind::kQuant);
  EXPECT_EQ(plan->layers[0].quant, (QuantParams{2, 64, 128}));
  EXPECT_EQ(plan->layers[0].dense_preference, -1);
  EXPECT_EQ(plan->layers[1].kind, KvPolicyKind::kSparse);
  EXPECT_EQ(plan->layers[1].sparse, SparseParams{});
}

TEST(KvPlanTest, SummaryCountsDistinctPolicies) {
  KvPlan plan = KvPlan::Dense(30);
  plan.layers[0].kind = KvPolicyKind::kQuant;
  EXPECT_EQ(plan.Summary(), "quant(1b g64 r128) x1, dense x29");
  EXPECT_EQ(MixedPlan().Summary(),
            "quant(2b g32 r96) x1, dense x1, window(0+7) x1, sparse(3+5 k17 d11 faithful) x1, "
            "quant(4b g64 r4096) x1");
  EXPECT_EQ(KvPlan::Dense(3).Summary(), "dense x3");
}

// Validate: each bad value is rejected naming its layer and field.
TEST(KvPlanTest, ValidateNamesLayerAndField) {
  const model::ModelConfig c = Config();
  struct Case {
    std::function<void(LayerKvPolicy&)> edit;
    std::string expected;
  };
  const Case cases[] = {
      {[](LayerKvPolicy& l) {
         l.kind = KvPolicyKind::kQuant;
         l.quant.bits = 3;
       },
       "layers[3].bits: must be 1, 2 or 4, got 3"},
      {[](LayerKvPolicy& l) {
         l.kind = KvPolicyKind::kQuant;
         l.quant.bits = 8;
       },
       "layers[3].bits: must be 1, 2 or 4, got 8"},
      {[](LayerKvPolicy& l) {
         l.kind = KvPolicyKind::kQuant;
         l.quant.group = 48;
       },
       "layers[3].group: must be 32, 64 or 128, got 48"},
      {[](LayerKvPolicy& l) {
         l.kind = KvPolicyKind::kQuant;
         l.quant.group = 128;
         l.quant.residual = 128;
       },
       "layers[3].group: must divide head_dim 64, got 128"},
      {[](LayerKvPolicy& l) {
         l.kind = KvPolicyKind::kQuant;
         l.quant.residual = 100;
       },
       "layers[3].residual: must be a positive multiple of group (64) and <= 4096, got 100"},
      {[](LayerKvPolicy& l) {
         l.kind = KvPolicyKind::kQuant;
         l.quant.residual = 0;
       },
       "layers[3].residual: must be a positive multiple of group (64)"},
      {[](LayerKvPolicy& l) {
         l.kind = KvPolicyKind::kQuant;
         l.quant.residual = 4160;
       },
       "layers[3].residual:"},
      {[](LayerKvPolicy& l) {
         l.kind = KvPolicyKind::kWindow;
         l.window.sink = -1;
       },
       "layers[3].sink: must be >= 0, got -1"},
      {[](LayerKvPolicy& l) {
         l.kind = KvPolicyKind::kWindow;
         l.window.recent = 0;
       },
       "layers[3].recent: must be >= 1, got 0"},
      {[](LayerKvPolicy& l) {
         l.kind = KvPolicyKind::kSparse;
         l.sparse.sink = -2;
       },
       "layers[3].sink: must be >= 0, got -2"},
      {[](LayerKvPolicy& l) {
         l.kind = KvPolicyKind::kSparse;
         l.sparse.recent = 0;
       },
       "layers[3].recent: must be >= 1, got 0"},
      {[](LayerKvPolicy& l) {
         l.kind = KvPolicyKind::kSparse;
         l.sparse.top_k = 0;
       },
       "layers[3].top_k: must be >= 1, got 0"},
      {[](LayerKvPolicy& l) {
         l.kind = KvPolicyKind::kSparse;
         l.sparse.channels = 0;
       },
       "layers[3].channels: must be in [1, head_dim 64], got 0"},
      {[](LayerKvPolicy& l) {
         l.kind = KvPolicyKind::kSparse;
         l.sparse.channels = 65;
       },
       "layers[3].channels: must be in [1, head_dim 64], got 65"},
      {[](LayerKvPolicy& l) {
         l.kind = KvPolicyKind::kSparse;
         l.sparse.index = "cpu";
       },
       "layers[3].index: must be \"gpu\" or \"faithful\", got \"cpu\""},
      {[](LayerKvPolicy& l) {
         l.kind = KvPolicyKind::kSparse;
         l.sparse.index = "gpu";
         l.sparse.index_bits = 5;
       },
       "layers[3].index_bits: must be 16, 8 or 4, got 5"},
      {[](LayerKvPolicy& l) {
         l.kind = KvPolicyKind::kSparse;
         l.sparse.index = "gpu";
         l.sparse.query = "next";
       },
       "layers[3].query: must be \"previous\", \"after-attention\" or \"real\", got \"next\""},
      {[](LayerKvPolicy& l) {
         l.kind = KvPolicyKind::kSparse;
         l.sparse.index = "gpu";
         l.sparse.group_score = "min";
       },
       "layers[3].group_score: must be \"mean\" or \"max\", got \"min\""},
      {[](LayerKvPolicy& l) { l.kind = static_cast<KvPolicyKind>(9); },
       "layers[3].policy: unknown policy kind 9"},
  };
  for (const Case& tc : cases) {
    KvPlan plan = KvPlan::Dense(c.n_layers);
    tc.edit(plan.layers[3]);
    const absl::Status st = plan.Validate(c);
    EXPECT_TRUE(absl::IsInvalidArgument(st)) << tc.expected << " -> " << st;
    EXPECT_THAT(StatusText(st), HasSubstr(tc.expected));
  }
  // The edges that are allowed.
  KvPlan ok = KvPlan::Dense(c.n_layers);
  ok.layers[0].kind = KvPolicyKind::kQuant;
  ok.layers[0].quant = {4, 32, 4096};
  ok.layers[1].kind = KvPolicyKind::kWindow;
  ok.layers[1].window = {0, 1};
  ok.layers[2].kind = KvPolicyKind::kSparse;
  ok.layers[2].sparse = {0, 1, 1, 64, "gpu"};
  EXPECT_TRUE(ok.Validate(c).ok()) << ok.Validate(c);
}

TEST(KvPlanTest, ValidateRejectsWrongLayerCount) {
  const absl::Status st = KvPlan::Dense(4).Validate(Config(5));
  EXPECT_TRUE(absl::IsInvalidArgument(st));
  EXPECT_EQ(StatusText(st), "layers: the plan has 4 layers, the model has 5");
}

// Without its checksum, so that each edit below reaches the field it breaks.
json BaseJson() {
  json j = json::parse(KvPlanToJson(MixedPlan(), Config()));
  j.erase("checksum");
  return j;
}

// Parse: each malformed document is rejected naming its field.
TEST(KvPlanTest, ParseErrorsNameTheField) {
  const model::ModelConfig c = Config();
  struct Case {
    std::function<void(json&)> edit;
    std::string expected;
  };
  const Case cases[] = {
      {[](json& j) { j.erase("format"); }, "format: missing"},
      {[](json& j) { j["format"] = "tailorkv.plan"; },
       "format: must be \"tailorkv.kv_plan\", got \"tailorkv.plan\""},
      {[](json& j) { j["format"] = 1; }, "format: must be a string, got number 1"},
      {[](json& j) { j.erase("version"); }, "version: missing"},
      {[](json& j) { j["version"] = 2; }, "version: this build reads version 1, got 2"},
      {[](json& j) { j["version"] = "1"; }, "version: must be an integer, got string \"1\""},
      {[](json& j) { j["version"] = 1.0; }, "version: must be an integer, got number 1.0"},
      {[](json& j) { j["name"] = 7; }, "name: must be a string, got number 7"},
      {[](json& j) { j["nmae"] = "x"; },
       "nmae: unknown key (allowed: format, version, name, model"},
      {[](json& j) { j.erase("model"); }, "model: missing"},
      {[](json& j) { j["model"] = json::array(); }, "model: must be an object, got array []"},
      {[](json& j) { j["model"].erase("head_dim"); }, "model.head_dim: missing"},
      {[](json& j) { j["model"]["n_heads"] = 9; }, "model.n_heads: unknown key"},
      {[](json& j) { j["model"]["n_layers"] = "5"; }, "model.n_layers: must be an integer"},
      {[](json& j) { j.erase("layers"); }, "layers: missing"},
      {[](json& j) { j["layers"] = json::object(); }, "layers: must be an array, got object {}"},
      {[](json& j) { j["layers"].erase(4); }, "layers: has 4 entries, the model has 5 layers"},
      {[](json& j) {
         j["layers"].push_back({{"layer", 5}, {"policy", "dense"}});
       },
       "layers: has 6 entries, the model has 5 layers"},
      {[](json& j) { j["layers"][2] = "dense"; }, "layers[2]: must be an object, got string"},
      {[](json& j) { j["layers"][2].erase("layer"); }, "layers[2].layer: missing"},
      {[](json& j) { j["layers"][2]["layer"] = 3; },
       "layers[2].layer: expected 2, got 3 (every layer is listed exactly once, in order 0..n-1)"},
      {[](json& j) { std::swap(j["layers"][1], j["layers"][2]); },
       "layers[1].layer: expected 1, got 2"},
      {[](json& j) { j["layers"][1]["layer"] = "1"; }, "layers[1].layer: must be an integer"},
      {[](json& j) { j["layers"][1].erase("policy"); }, "layers[1].policy: missing"},
      {[](json& j) { j["layers"][1]["policy"] = "kivi"; },
       "layers[1].policy: must be dense, quant, window or sparse, got \"kivi\""},
      {[](json& j) { j["layers"][1]["policy"] = json::array({"dense"}); },
       "layers[1].policy: must be a string, got array"},
      {[](json& j) { j["layers"][0]["bitz"] = 1; },
       "layers[0].bitz: unknown key for policy \"quant\" (allowed: layer, policy, "
       "dense_preference, sparse_error, quant_error, bits, group, residual)"},
      {[](json& j) { j["layers"][1]["bits"] = 1; },
       "layers[1].bits: unknown key for policy \"dense\""},
      {[](json& j) { j["layers"][2]["top_k"] = 1; },
       "layers[2].top_k: unknown key for policy \"window\""},
      {[](json& j) { j["layers"][0]["bits"] = "1"; },
       "layers[0].bits: must be an integer, got string \"1\""},
      {[](json& j) { j["layers"][0]["bits"] = 1.5; },
       "layers[0].bits: must be an integer, got number 1.5"},
      {[](json& j) { j["layers"][0]["bits"] = 3; }, "layers[0].bits: must be 1, 2 or 4, got 3"},
      {[](json& j) { j["layers"][0]["bits"] = 4294967297LL; },
       "layers[0].bits: integer out of range"},
      {[](json& j) { j["layers"][0]["group"] = nullptr; },
       "layers[0].group: must be an integer, got null"},
      {[](json& j) { j["layers"][0]["residual"] = 33; },
       "layers[0].residual: must be a positive multiple"},
      {[](json& j) { j["layers"][2]["sink"] = -1; }, "layers[2].sink: must be >= 0, got -1"},
      {[](json& j) { j["layers"][2]["recent"] = true; },
       "layers[2].recent: must be an integer, got boolean"},
      {[](json& j) { j["layers"][3]["index"] = 0; },
       "layers[3].index: must be a string, got number 0"},
      {[](json& j) { j["layers"][3]["index"] = "host"; },
       "layers[3].index: must be \"gpu\" or \"faithful\""},
      {[](json& j) { j["layers"][3]["channels"] = 100; },
       "layers[3].channels: must be in [1, head_dim 64]"},
      {[](json& j) { j["layers"][3]["top_k"] = 0; }, "layers[3].top_k: must be >= 1"},
      {[](json& j) { j["layers"][3]["dense_preference"] = "high"; },
       "layers[3].dense_preference: must be a number >= 0, got string"},
      {[](json& j) { j["layers"][3]["sparse_error"] = -0.5; },
       "layers[3].sparse_error: must be a number >= 0, got number -0.5"},
      {[](json& j) { j["model"]["digest"] = "sha256:XYZ"; },
       "model.digest: must be \"sha256:\" and 64 lowercase hex digits"},
      {[](json& j) { j["profile"] = 3; }, "profile: must be an object, got number 3"},
      {[](json& j) { j["checksum"] = 3; }, "checksum: must be a string, got number 3"},
  };
  ASSERT_TRUE(ParseKvPlanJson(BaseJson().dump(), c).ok());
  for (const Case& tc : cases) {
    json j = BaseJson();
    tc.edit(j);
    auto plan = ParseKvPlanJson(j.dump(), c);
    ASSERT_FALSE(plan.ok()) << "accepted, expected: " << tc.expected;
    EXPECT_TRUE(absl::IsInvalidArgument(plan.status())) << plan.status();
    EXPECT_THAT(StatusText(plan.status()), HasSubstr(tc.expected));
  }
}

// The checksum survives reformatting and catches any changed value; the
// digest ties a plan to one model file.
TEST(KvPlanTest, ChecksumAndDigestProtectThePlan) {
  const model::ModelConfig c = Config();
  KvPlan plan = MixedPlan();
  plan.model_digest = "sha256:" + std::string(64, 'a');
  plan.profile_json = R"({"alpha":{"n":[1,2.5]},"zeta":1})";  // canonical, as parsing leaves it
  plan.layers[3].sparse_error = 0.125;
  plan.layers[3].quant_error = 0.75;
  const std::string text = KvPlanToJson(plan, c);
  EXPECT_EQ(text, KvPlanToJson(plan, c));
  auto back = ParseKvPlanJson(text, c);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, plan);
  // Reindented and keys reordered: same content, still accepted.
  auto pretty = ParseKvPlanJson(nlohmann::ordered_json::parse(text).dump(4), c);
  EXPECT_TRUE(pretty.ok()) << pretty.status();
  const std::pair<std::string, std::function<void(json&)>> tampered[] = {
      {"bits", [](json& j) { j["layers"][0]["bits"] = 1; }},
      {"score", [](json& j) { j["layers"][3]["sparse_error"] = 0.126; }},
      {"digest", [](json& j) { j["model"]["digest"] = "sha256:" + std::string(64, 'b'); }},
      {"profile", [](json& j) { j["profile"]["zeta"] = 2; }},
      {"name", [](json& j) { j["name"] = "other"; }},
  };
  for (const auto& [what, edit] : tampered) {
    json j = json::parse(text);
    edit(j);
    auto got = ParseKvPlanJson(j.dump(), c);
    ASSERT_FALSE(got.ok()) << what;
    EXPECT_THAT(StatusText(got.status()), HasSubstr("checksum: ")) << what;
  }
  EXPECT_TRUE(CheckPlanModel(*back, plan.model_digest).ok());
  EXPECT_TRUE(CheckPlanModel(MixedPlan(), "sha256:" + std::string(64, 'c')).ok())
      << "a plan that names no model fits any";
  const absl::Status other = CheckPlanModel(*back, "sha256:" + std::string(64, 'c'));
  EXPECT_TRUE(absl::IsFailedPrecondition(other)) << other;
  EXPECT_THAT(std::string(other.message()), HasSubstr(std::string(64, 'a')));
  EXPECT_THAT(std::string(other.message()), HasSubstr(std::string(64, 'c')));
}

TEST(KvPlanTest, RejectsPlanForAnotherModel) {
  const std::string text = KvPlanToJson(MixedPlan(), Config());
  struct Case {
    model::ModelConfig config;
    std::string expected;
  };
  const Case cases[] = {
      {Config(6), "model.n_layers: the plan is for n_layers 5, the model (test-model) has 6"},
      {Config(5, 1),
       "model.n_kv_heads: the plan is for n_kv_heads 3, the model (test-model) has 1"},
      {Config(5, 3, 128),
       "model.head_dim: the plan is for head_dim 64, the model (test-model) has 128"},
  };
  for (const Case& tc : cases) {
    auto plan = ParseKvPlanJson(text, tc.config);
    ASSERT_FALSE(plan.ok());
    EXPECT_EQ(StatusText(plan.status()), tc.expected);
  }
}

TEST(KvPlanTest, NotJsonGivesTheParsePosition) {
  auto plan =
      ParseKvPlanJson("{\n  \"format\": \"tailorkv.kv_plan\",\n  \"version\": 1,,\n}", Config());
  ASSERT_FALSE(plan.ok());
  EXPECT_TRUE(absl::IsInvalidArgument(plan.status()));
  EXPECT_THAT(StatusText(plan.status()), HasSubstr("kv plan is not valid JSON"));
  EXPECT_THAT(StatusText(plan.status()), HasSubstr("line 3, column 16"));

  auto array = ParseKvPlanJson("[1, 2]", Config());
  ASSERT_FALSE(array.ok());
  EXPECT_THAT(StatusText(array.status()), HasSubstr("must be a JSON object, got array"));
  EXPECT_FALSE(ParseKvPlanJson("", Config()).ok());
}

// nlohmann::json keeps the last of two equal keys silently; a plan must not
// mean something other than what its first occurrence says.
TEST(KvPlanTest, DuplicateKeysAreRejectedNamingTheField) {
  const model::ModelConfig c = Config(2);
  auto plan_with = [](const std::string& top, const std::string& model, const std::string& layer1,
                      const std::string& profile) {
    return absl::StrCat(R"({"format": "tailorkv.kv_plan", "version": 1, )", top,
                        R"("model": {"n_layers": 2, "n_kv_heads": 3, "head_dim": 64)", model,
                        R"(}, "layers": [{"layer": 0, "policy": "dense"}, )",
                        R"({"layer": 1, "policy": "quant", "bits": 4)", layer1, "}], ",
                        R"("profile": {"runs": [{"a": 1}, {"b": [{}, {"c": 2)", profile,
                        "}]}]}}");
  };
  // Equal keys in different objects are fine.
  auto ok = ParseKvPlanJson(plan_with("", "", "", ""), c);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->layers[1].quant.bits, 4);

  const std::pair<std::string, std::string> cases[] = {
      {plan_with(R"("version": 1, )", "", "", ""), "version: duplicate key"},
      {plan_with("", R"(, "n_layers": 2)", "", ""), "model.n_layers: duplicate key"},
      {plan_with("", "", R"(, "bits": 1)", ""), "layers[1].bits: duplicate key"},
      {plan_with("", "", "", R"(, "c": 2)"), "profile.runs[1].b[1].c: duplicate key"},
  };
  for (const auto& [text, want] : cases) {
    auto plan = ParseKvPlanJson(text, c);
    ASSERT_FALSE(plan.ok()) << text;
    EXPECT_TRUE(absl::IsInvalidArgument(plan.status())) << plan.status();
    EXPECT_THAT(StatusText(plan.status()), HasSubstr(want)) << text;
  }
}

// Found by tests/fuzz/kv_plan_fuzz.cc: nlohmann::json reports a number too
// large for a double as out_of_range, not parse_error, and it escaped
// ParseKvPlanJson (std::terminate in the worker loading the plan).
TEST(KvPlanTest, NumberBeyondDoubleIsInvalidArgument) {
  for (const char* text :
       {R"({"format": "tailorkv.kv_plan", "version": 1e999})",
        R"({"format": "tailorkv.kv_plan", "version": 1, "profile": {"x": [-1e400]}})"}) {
    auto plan = ParseKvPlanJson(text, Config());
    ASSERT_FALSE(plan.ok()) << text;
    EXPECT_TRUE(absl::IsInvalidArgument(plan.status())) << plan.status();
    EXPECT_THAT(StatusText(plan.status()), HasSubstr("number overflow"));
  }
}

class KvPlanFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("kv_plan_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string Write(const std::string& name, const std::string& text) {
    const std::string path = (dir_ / name).string();
    std::ofstream(path, std::ios::binary) << text;
    return path;
  }
  std::filesystem::path dir_;
};

TEST_F(KvPlanFileTest, LoadsAndNamesThePathInErrors) {
  const model::ModelConfig c = Config();
  const std::string good = Write("good.json", KvPlanToJson(MixedPlan(), c));
  auto plan = LoadKvPlanFile(good, c);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(*plan, MixedPlan());

  auto spec = ParseKvPlanSpec("@" + good, c);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(*spec, MixedPlan());  // a file keeps its own name

  const std::string missing = (dir_ / "missing.json").string();
  auto none = LoadKvPlanFile(missing, c);
  EXPECT_TRUE(absl::IsNotFound(none.status())) << none.status();
  EXPECT_THAT(StatusText(none.status()), HasSubstr(missing));

  const std::string bad = Write("bad.json", "{\"format\": \"tailorkv.kv_plan\"");
  auto broken = LoadKvPlanFile(bad, c);
  ASSERT_FALSE(broken.ok());
  EXPECT_THAT(StatusText(broken.status()),
              HasSubstr("kv plan file " + bad + ": kv plan is not valid JSON"));

  auto wrong_model = ParseKvPlanSpec("@" + good, Config(7));
  ASSERT_FALSE(wrong_model.ok());
  EXPECT_THAT(StatusText(wrong_model.status()), HasSubstr(good + ": model.n_layers"));
}

TEST(KvPlanSpecTest, AcceptsTheGrammar) {
  const model::ModelConfig c = Config();
  auto dense = ParseKvPlanSpec("dense", c);
  ASSERT_TRUE(dense.ok()) << dense.status();
  EXPECT_EQ(*dense, KvPlan::Dense(5));

  struct Case {
    std::string spec;
    QuantParams quant;
  };
  for (const Case& tc :
       {Case{"quant:1", {1, 64, 128}}, Case{"quant:2:32", {2, 32, 128}},
        Case{"quant:4:32:64", {4, 32, 64}}, Case{"quant:1:64:4096", {1, 64, 4096}}}) {
    auto plan = ParseKvPlanSpec(tc.spec, c);
    ASSERT_TRUE(plan.ok()) << tc.spec << ": " << plan.status();
    EXPECT_EQ(plan->name, tc.spec);
    ASSERT_EQ(plan->layers.size(), 5u);
    for (const LayerKvPolicy& l : plan->layers) {
      EXPECT_EQ(l.kind, KvPolicyKind::kQuant);
      EXPECT_EQ(l.quant, tc.quant) << tc.spec;
    }
  }

  auto window = ParseKvPlanSpec("window:0:17", c);
  ASSERT_TRUE(window.ok()) << window.status();
  for (const LayerKvPolicy& l : window->layers) {
    EXPECT_EQ(l.kind, KvPolicyKind::kWindow);
    EXPECT_EQ(l.window, (WindowParams{0, 17}));
  }

  auto tailor = ParseKvPlanSpec("tailorkv:2:3", c);
  ASSERT_TRUE(tailor.ok()) << tailor.status();
  EXPECT_EQ(tailor->Summary(), "quant(2b g64 r128) x3, dense x2");
  for (int i = 0; i < 5; ++i) EXPECT_EQ(tailor->layers[i].kind == KvPolicyKind::kQuant, i < 3) << i;

  auto tailor_default = ParseKvPlanSpec("tailorkv:1", c);
  ASSERT_TRUE(tailor_default.ok());
  EXPECT_EQ(tailor_default->Summary(), "quant(1b g64 r128) x1, dense x4");
  auto tailor_all = ParseKvPlanSpec("tailorkv:1:5", c);
  ASSERT_TRUE(tailor_all.ok());
  EXPECT_EQ(tailor_all->Summary(), "quant(1b g64 r128) x5");
  auto tailor_none = ParseKvPlanSpec("tailorkv:1:0", c);
  ASSERT_TRUE(tailor_none.ok());
  EXPECT_TRUE(tailor_none->all_dense());

  struct SparseCase {
    std::string spec;
    SparseParams sparse;
  };
  for (const SparseCase& tc :
       {SparseCase{"sparse:128", {8, 56, 128, 8, "faithful"}},
        SparseCase{"sparse:17:3:5", {3, 5, 17, 8, "faithful"}},
        SparseCase{"sparse:896:64:64:12", {64, 64, 896, 12, "faithful"}},
        SparseCase{"sparse:1:0:1:64", {0, 1, 1, 64, "faithful"}},
        SparseCase{"sparse:128:gpu", {8, 56, 128, 8, "gpu"}},
        SparseCase{"sparse:17:3:5:faithful", {3, 5, 17, 8, "faithful"}},
        SparseCase{"sparse:896:64:64:12:gpu", {64, 64, 896, 12, "gpu"}},
        SparseCase{"sparse:128:gpu:fp8", {8, 56, 128, 8, "gpu", 8}},
        SparseCase{"sparse:128:fp8", {8, 56, 128, 8, "faithful", 8}},
        SparseCase{"sparse:128:gpu:i8", {8, 56, 128, 8, "gpu", 16, 8}},
        SparseCase{"sparse:128:gpu:late", {8, 56, 128, 8, "gpu", 16, 16, "after-attention"}},
        SparseCase{"sparse:896:64:64:32:gpu:fp8:real:i8", {64, 64, 896, 32, "gpu", 8, 8, "real"}},
        SparseCase{"sparse:896:64:64:32:gpu:i8:late", {64, 64, 896, 32, "gpu", 16, 8, "after-attention"}},
        SparseCase{"sparse:896:64:64:32:gpu:late:gmax", {64, 64, 896, 32, "gpu", 16, 16, "after-attention", "max"}},
        SparseCase{"sparse:896:64:64:32:gpu:i4:late", {64, 64, 896, 32, "gpu", 16, 4, "after-attention"}},
        SparseCase{"sparse:896:64:64:32:gpu:late:i8:refine2",
                   {64, 64, 896, 32, "gpu", 16, 8, "after-attention", "mean", 2}}}) {
    auto plan = ParseKvPlanSpec(tc.spec, c);
    ASSERT_TRUE(plan.ok()) << tc.spec << ": " << plan.status();
    EXPECT_EQ(plan->name, tc.spec);
    ASSERT_EQ(plan->layers.size(), 5u);
    for (const LayerKvPolicy& l : plan->layers) {
      EXPECT_EQ(l.kind, KvPolicyKind::kSparse) << tc.spec;
      EXPECT_EQ(l.sparse, tc.sparse) << tc.spec;
    }
  }
  auto hybrid = ParseKvPlanSpec("hybrid:2:128:8:56", c);
  ASSERT_TRUE(hybrid.ok()) << hybrid.status();
  EXPECT_EQ(hybrid->name, "hybrid:2:128:8:56");
  EXPECT_EQ(hybrid->Summary(), "quant(2b g64 r128) x1, sparse(8+56 k128 d8 faithful) x4");
  EXPECT_EQ(hybrid->layers[0].quant, (QuantParams{2, 64, 128}));
  auto hybrid_short = ParseKvPlanSpec("hybrid:1:896", c);
  ASSERT_TRUE(hybrid_short.ok()) << hybrid_short.status();
  EXPECT_EQ(hybrid_short->Summary(), "quant(1b g64 r128) x1, sparse(8+56 k896 d8 faithful) x4");
  auto hybrid_full = ParseKvPlanSpec("hybrid:4:7:1:2:3", c);
  ASSERT_TRUE(hybrid_full.ok()) << hybrid_full.status();
  EXPECT_EQ(hybrid_full->Summary(), "quant(4b g64 r128) x1, sparse(1+2 k7 d3 faithful) x4");
  auto hybrid_gpu = ParseKvPlanSpec("hybrid:1:128:8:56:16:gpu", c);
  ASSERT_TRUE(hybrid_gpu.ok()) << hybrid_gpu.status();
  EXPECT_EQ(hybrid_gpu->Summary(), "quant(1b g64 r128) x1, sparse(8+56 k128 d16 gpu) x4");
  // The index name is only a trailing part: "gpu" in the middle is a bad number.
  EXPECT_EQ(ParseKvPlanSpec("sparse:gpu:128", c).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseKvPlanSpec("sparse:gpu", c).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseKvPlanSpec("sparse:128:fp8:gpu", c).status().code(), absl::StatusCode::kInvalidArgument)
      << "fp8 comes last";
  auto fp8 = ParseKvPlanSpec("hybrid:1:128:gpu:fp8", c);
  ASSERT_TRUE(fp8.ok()) << fp8.status();
  EXPECT_EQ(fp8->Summary(), "quant(1b g64 r128) x1, sparse(8+56 k128 d8 gpu fp8) x4");
  // The host tier at one byte a value; the JSON form keeps the field.
  const auto b16 = EstimateKvBytes(*ParseKvPlanSpec("hybrid:1:128:gpu", c), c, 1000, 2);
  const auto b8 = EstimateKvBytes(*fp8, c, 1000, 2);
  EXPECT_EQ(b8[1].host_bytes * 2, b16[1].host_bytes);
  EXPECT_EQ(b8[1].device_bytes, b16[1].device_bytes);
  auto round_trip = ParseKvPlanJson(KvPlanToJson(*fp8, c), c);
  ASSERT_TRUE(round_trip.ok()) << round_trip.status();
  EXPECT_EQ(*round_trip, *fp8);
  // Flags: FP8 index entries (one byte each) and the query, in the summary
  // and the JSON form.
  auto late = ParseKvPlanSpec("hybrid:2:896:64:64:32:gpu:late:i8", c);
  ASSERT_TRUE(late.ok()) << late.status();
  EXPECT_EQ(late->Summary(), "quant(2b g64 r128) x1, sparse(64+64 k896 d32 gpu i8 late) x4");
  const auto bl = EstimateKvBytes(*late, c, 1000, 2);
  const auto bl16 = EstimateKvBytes(*ParseKvPlanSpec("hybrid:2:896:64:64:32:gpu", c), c, 1000, 2);
  EXPECT_EQ(bl16[1].device_bytes - bl[1].device_bytes, int64_t{c.n_kv_heads} * 32 * 1000);
  auto late_trip = ParseKvPlanJson(KvPlanToJson(*late, c), c);
  ASSERT_TRUE(late_trip.ok()) << late_trip.status();
  EXPECT_EQ(*late_trip, *late);
  EXPECT_THAT(KvPlanToJson(*late, c), HasSubstr("\"index_bits\":8"));
  EXPECT_THAT(KvPlanToJson(*late, c), HasSubstr("\"query\":\"after-attention\""));
  // 4-bit entries: half a byte each plus a bf16 zero and step per channel
  // and block of 64 positions (1000 positions: 16 blocks).
  auto i4 = ParseKvPlanSpec("hybrid:2:896:64:64:32:gpu:late:i4", c);
  ASSERT_TRUE(i4.ok()) << i4.status();
  EXPECT_EQ(i4->Summary(), "quant(2b g64 r128) x1, sparse(64+64 k896 d32 gpu i4 late) x4");
  const auto b4 = EstimateKvBytes(*i4, c, 1000, 2);
  EXPECT_EQ(b4[1].device_bytes - (bl16[1].device_bytes - int64_t{c.n_kv_heads} * 32 * 1000 * 2),
            int64_t{c.n_kv_heads} * 32 * (1000 / 2 + 16 * 4));
  // A one-layer model keeps only the quantized layer.
  auto hybrid_one = ParseKvPlanSpec("hybrid:1:8", Config(1));
  ASSERT_TRUE(hybrid_one.ok()) << hybrid_one.status();
  EXPECT_EQ(hybrid_one->Summary(), "quant(1b g64 r128) x1");
}

TEST(KvPlanSpecTest, RejectsBadSpecsClearly) {
  const model::ModelConfig c = Config();
  struct Case {
    std::string spec;
    std::string expected;
  };
  const Case cases[] = {
      {"", "kv plan spec \"\": empty; expected dense, quant:BITS"},
      {"Dense",
       "kv plan spec \"Dense\": unknown kind \"Dense\"; expected dense, "
       "quant:BITS[:GROUP[:RESIDUAL]], "
       "window:SINK:RECENT, tailorkv:BITS[:LAYERS], sparse:TOPK[:SINK:RECENT[:CHANNELS]][:INDEX][:FLAG...], "
       "hybrid:BITS:TOPK[:SINK:RECENT[:CHANNELS]][:INDEX][:FLAG...] (INDEX gpu or faithful; FLAGs "
       "i8 or i4, late or real, gmax, refineN, fp8) or @plan.json"},
      {"sparse:128:gpu:i8:i8", "kv plan spec \"sparse:128:gpu:i8:i8\": flag \"i8\" given twice"},
      {"sparse:128:faithful:gmax", "layers[0].group_score: \"max\" needs index \"gpu\", got \"faithful\""},
      {"sparse:128:gpu:late:real", "flags \"late\" and \"real\" exclude each other"},
      {"sparse:128:gpu:i4:i8", "flags \"i8\" and \"i4\" exclude each other"},
      {"sparse:128:gpu:refine2", "layers[0].refine: needs index \"gpu\" with query \"after-attention\" or \"real\""},
      {"sparse:128:gpu:late:refine0", "flag \"refine0\": leave it out instead"},
      {"sparse:128:gpu:late:refine17", "layers[0].refine: must be in [0, 16], got 17"},
      {"sparse:128:gpu:late:refine2:refine3", "flag \"refine\" given twice"},
      {"sparse:128:faithful:i4", "layers[0].index_bits: 4 needs index \"gpu\""},
      {"sparse:128:i8", "layers[0].index_bits: 8 needs index \"gpu\" (index \"faithful\" keeps no index on the GPU)"},
      {"sparse:128:faithful:late",
       "layers[0].query: \"after-attention\" needs index \"gpu\" (index \"faithful\" scores with the real query)"},
      {"kivi:1", "unknown kind \"kivi\""},
      {"dense:1", "kv plan spec \"dense:1\": dense takes no parameters"},
      {"quant", "kv plan spec \"quant\": expected quant:BITS[:GROUP[:RESIDUAL]]"},
      {"quant:1:64:128:9", "expected quant:BITS[:GROUP[:RESIDUAL]]"},
      {"quant:3", "kv plan spec \"quant:3\": layers[0].bits: must be 1, 2 or 4, got 3"},
      {"quant:x", "kv plan spec \"quant:x\": BITS must be a non-negative integer, got \"x\""},
      {"quant:", "BITS must be a non-negative integer, got \"\""},
      {"quant:-1", "BITS must be a non-negative integer, got \"-1\""},
      {"quant: 1", "BITS must be a non-negative integer, got \" 1\""},
      {"quant:1:48", "layers[0].group: must be 32, 64 or 128, got 48"},
      {"quant:1:64:100", "layers[0].residual: must be a positive multiple of group (64)"},
      {"quant:1:64:12345678901", "RESIDUAL must be a non-negative integer"},
      {"window:4", "kv plan spec \"window:4\": expected window:SINK:RECENT"},
      {"window:4:0", "layers[0].recent: must be >= 1, got 0"},
      {"window:a:1", "SINK must be a non-negative integer"},
      {"tailorkv", "expected tailorkv:BITS[:LAYERS]"},
      {"tailorkv:1:6",
       "kv plan spec \"tailorkv:1:6\": LAYERS must be in [0, 5] (the model's layers), got 6"},
      {"tailorkv:3:1", "layers[0].bits: must be 1, 2 or 4, got 3"},
      {"tailorkv:1:2:3", "expected tailorkv:BITS[:LAYERS]"},
      {"@", "kv plan spec \"@\": a plan file path must follow '@'"},
      {"sparse", "kv plan spec \"sparse\": expected sparse:TOPK[:SINK:RECENT[:CHANNELS]]"},
      {"sparse:8:1", "expected sparse:TOPK[:SINK:RECENT[:CHANNELS]]"},
      {"sparse:8:1:2:3:4", "expected sparse:TOPK[:SINK:RECENT[:CHANNELS]]"},
      {"sparse:0", "kv plan spec \"sparse:0\": layers[0].top_k: must be >= 1, got 0"},
      {"sparse:8:4:0", "layers[0].recent: must be >= 1, got 0"},
      {"sparse:8:4:4:0", "layers[0].channels: must be in [1, head_dim 64], got 0"},
      {"sparse:8:4:4:65", "layers[0].channels: must be in [1, head_dim 64], got 65"},
      {"sparse:k", "TOPK must be a non-negative integer, got \"k\""},
      {"sparse:8:-1:4", "SINK must be a non-negative integer, got \"-1\""},
      {"sparse:8:1:x", "RECENT must be a non-negative integer, got \"x\""},
      {"sparse:8:1:2:", "CHANNELS must be a non-negative integer, got \"\""},
      {"hybrid:2", "kv plan spec \"hybrid:2\": expected hybrid:BITS:TOPK[:SINK:RECENT[:CHANNELS]]"},
      {"hybrid:2:8:1", "expected hybrid:BITS:TOPK[:SINK:RECENT[:CHANNELS]]"},
      {"hybrid:2:8:1:2:3:4", "expected hybrid:BITS:TOPK[:SINK:RECENT[:CHANNELS]]"},
      {"hybrid:3:8", "layers[0].bits: must be 1, 2 or 4, got 3"},
      {"hybrid:2:0", "layers[1].top_k: must be >= 1, got 0"},
      {"hybrid:x:8", "BITS must be a non-negative integer, got \"x\""},
  };
  for (const Case& tc : cases) {
    auto plan = ParseKvPlanSpec(tc.spec, c);
    ASSERT_FALSE(plan.ok()) << "accepted '" << tc.spec << "'";
    EXPECT_TRUE(absl::IsInvalidArgument(plan.status())) << plan.status();
    EXPECT_THAT(StatusText(plan.status()), HasSubstr(tc.expected)) << tc.spec;
  }
  // group 128 cannot divide head_dim 64 of this model, but can for head_dim 128.
  EXPECT_FALSE(ParseKvPlanSpec("quant:1:128", c).ok());
  EXPECT_TRUE(ParseKvPlanSpec("quant:1:128", Config(5, 3, 128)).ok());
}

TEST(KvPlanBytesTest, EstimatesEveryPolicy) {
  const model::ModelConfig c = Config(5, 3, 64);
  const KvPlan plan = MixedPlan();
  const int cap = 100;
  const auto bytes = EstimateKvBytes(plan, c, cap, 4);
  ASSERT_EQ(bytes.size(), 5u);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(bytes[i].kind, plan.layers[i].kind) << i;
  // Layer 0: quant 2 bits, group 32, residual 96; per KV head:
  //   words/group 2, key groups ceil(100/32) = 4: K codes 4*64*2 = 512 words,
  //   K params 4*64 = 256; V codes 100*2*2 = 400 words, V params 100*2 = 200;
  //   (512+256+400+200)*4 = 5472 bytes, residual 2*96*64*4 = 49152.
  EXPECT_EQ(bytes[0].device_bytes, 3 * (5472 + 49152));
  EXPECT_EQ(bytes[0].host_bytes, 0);
  // Layer 1: dense.
  EXPECT_EQ(bytes[1].device_bytes, 2 * 3 * 100 * 64 * 4);
  // Layer 2: window 0+7.
  EXPECT_EQ(bytes[2].device_bytes, 2 * 3 * 7 * 64 * 4);
  // Layer 3: sparse 3+5 rows, 11 channels, index "faithful": host every
  // token, device sink + recent rows and max|K| (3 heads x 64 channels).
  EXPECT_EQ(bytes[3].host_bytes, 2 * 3 * 100 * 64 * 4);
  EXPECT_EQ(bytes[3].device_bytes, 2 * 3 * 8 * 64 * 4 + 3 * 64 * 4);
  // Index "gpu" adds an 11-channel key index of every token.
  KvPlan gpu_index = plan;
  gpu_index.layers[3].sparse.index = "gpu";
  const auto g = EstimateKvBytes(gpu_index, c, cap, 4);
  EXPECT_EQ(g[3].host_bytes, bytes[3].host_bytes);
  EXPECT_EQ(g[3].device_bytes, 2 * 3 * 8 * 64 * 4 + 3 * 4 * (64 + 11 * 100));
  // Sink + recent longer than the capacity keeps only the capacity.
  const auto short_seq = EstimateKvBytes(plan, c, 5, 2);
  EXPECT_EQ(short_seq[3].host_bytes, 2 * 3 * 5 * 64 * 2);
  EXPECT_EQ(short_seq[3].device_bytes, 2 * 3 * 5 * 64 * 2 + 3 * 64 * 2);
  // Layer 4: quant 4 bits, group 64, residual 4096: words/group 8, key
  // groups 2: K 2*64*8 + 2*64, V 100*1*8 + 100 -> (1024+128+800+100)*4 = 8208;
  // residual 2*4096*64*4 = 2097152.
  EXPECT_EQ(bytes[4].device_bytes, 3 * (8208 + 2097152));
  // A 1-bit layer at bf16 on another shape.
  KvPlan one = KvPlan::Dense(1);
  one.layers[0].kind = KvPolicyKind::kQuant;
  const auto q1 = EstimateKvBytes(one, Config(1, 2, 64), 100, 2);
  // words/group 2, key groups 2: K 256 words + 128 params, V 200 words + 100
  // params = 684*4 = 2736; residual 2*128*64*2 = 32768; 2 heads.
  EXPECT_EQ(q1[0].device_bytes, 2 * (2736 + 32768));

  // A window longer than the capacity holds only the capacity.
  const auto w = EstimateKvBytes(*ParseKvPlanSpec("window:4:1020", c), c, 10, 2);
  EXPECT_EQ(w[0].device_bytes, 2 * 3 * 10 * 64 * 2);

  const auto sums = SumKvBytesByPolicy(bytes);
  ASSERT_EQ(sums.size(), 4u);
  EXPECT_EQ(sums[0].kind, KvPolicyKind::kQuant);
  EXPECT_EQ(sums[0].layers, 2);
  EXPECT_EQ(sums[0].device_bytes, bytes[0].device_bytes + bytes[4].device_bytes);
  EXPECT_EQ(sums[1].kind, KvPolicyKind::kDense);
  EXPECT_EQ(sums[3].kind, KvPolicyKind::kSparse);
  EXPECT_EQ(sums[3].host_bytes, bytes[3].host_bytes);
}

}  // namespace
}  // namespace tailorkv::runtime
