#include "profiler/identify.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

namespace tailorkv::profiler {
namespace {

using runtime::Backend;
using runtime::KvPolicyKind;

model::ModelConfig Shape() {
  model::ModelConfig c;
  c.n_layers = 3;
  c.n_heads = 6;
  c.n_kv_heads = 2;
  c.head_dim = 64;
  c.hidden = 384;
  return c;
}

// A layer's post-RoPE tensors, laid out as a tap shows them.
struct Layer {
  int n = 0, Q = 0;
  std::vector<float> q, k, v;
  Backend::LayerTap Tap(const model::ModelConfig& c, int layer = 0) const {
    return {.layer = layer,
            .n_keys = n,
            .first_query = n - Q,
            .n_queries = Q,
            .q = q.data(),
            .k = k.data(),
            .v = v.data(),
            .kv_head_stride = static_cast<int64_t>(n) * c.head_dim};
  }
};

// Keys carry an outlier channel (what makes 1-bit quantization of K lossy);
// with `peaked`, a few "needle" keys match the queries strongly, so attention
// is sparse; without it, queries are weak and attention spreads out.
Layer MakeLayer(const model::ModelConfig& c, int n, int Q, bool peaked, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> N(0.0f, 1.0f);
  const int hd = c.head_dim;
  Layer L{.n = n, .Q = Q};
  L.k.resize(static_cast<size_t>(c.n_kv_heads) * n * hd);
  L.v.resize(L.k.size());
  L.q.resize(static_cast<size_t>(Q) * c.n_heads * hd);
  for (float& x : L.k) x = 0.3f * N(rng);
  for (float& x : L.v) x = N(rng);
  for (int g = 0; g < c.n_kv_heads; ++g) {
    for (int j = 0; j < n; ++j) L.k[(static_cast<size_t>(g) * n + j) * hd + 5] += 6.0f;
  }
  std::vector<float> dir(hd);
  for (float& x : dir) x = N(rng);
  for (int i = 0; i < Q; ++i) {
    for (int h = 0; h < c.n_heads; ++h) {
      float* q = &L.q[(static_cast<size_t>(i) * c.n_heads + h) * hd];
      for (int d = 0; d < hd; ++d) q[d] = peaked ? 1.5f * dir[d] + 0.1f * N(rng) : 0.05f * N(rng);
    }
  }
  if (peaked) {  // 20 needles per KV head, outside the sink and recent windows
    for (int g = 0; g < c.n_kv_heads; ++g) {
      for (int t = 0; t < 20; ++t) {
        const int j = 40 + t * ((n - Q - 80) / 20);  // spread over the prompt, inside it
        for (int d = 0; d < hd; ++d) L.k[(static_cast<size_t>(g) * n + j) * hd + d] = dir[d];
      }
    }
  }
  return L;
}

// A small budget for short synthetic taps, at TailorKV-1's widths (1 bit,
// 8 channels) so that the width candidates have room above them.
PlanSettings Small() {
  PlanSettings s;
  s.quant_bits = 1;
  s.channels = 8;
  s.sink = 4;
  s.recent = 16;
  s.top_k = 24;
  s.query_rows = 8;
  s.index_bits = 16;  // exact index entries: all channels rank exactly
  return s;
}

TEST(DensePreference, UniformAttentionScoresOneMinusTheKeptShare) {
  const auto c = Shape();
  const int n = 401, Q = 8;  // floor(0.05 * 401) = 20 keys kept of 401
  Layer L{.n = n, .Q = Q};
  L.k.assign(static_cast<size_t>(c.n_kv_heads) * n * c.head_dim, 0.25f);  // identical keys
  L.v.assign(L.k.size(), 1.0f);
  L.q.assign(static_cast<size_t>(Q) * c.n_heads * c.head_dim, 0.5f);
  auto s = ScoreLayer(L.Tap(c), c, Small(), 2);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_NEAR(s->dense_preference, 1.0 - 20.0 / 401.0, 1e-9);
  for (double h : s->head_preference) EXPECT_NEAR(h, 1.0 - 20.0 / 401.0, 1e-9);
  // Every key is the same: dropping any of them changes nothing.
  EXPECT_LT(s->sparse_error, 1e-12);
}

TEST(DensePreference, OneDominantKeyScoresNearZero) {
  const auto c = Shape();
  const int n = 300, Q = 8;
  Layer L{.n = n, .Q = Q};
  L.k.assign(static_cast<size_t>(c.n_kv_heads) * n * c.head_dim, 0.0f);
  L.v.assign(L.k.size(), 0.0f);
  for (int g = 0; g < c.n_kv_heads; ++g) {
    for (int d = 0; d < c.head_dim; ++d) L.k[(static_cast<size_t>(g) * n + 100) * c.head_dim + d] = 1.0f;
  }
  L.q.assign(static_cast<size_t>(Q) * c.n_heads * c.head_dim, 1.0f);  // logit 8 vs 0
  auto s = ScoreLayer(L.Tap(c), c, Small(), 1);
  ASSERT_TRUE(s.ok()) << s.status();
  // Top 15 keys hold key 100 (e^8) and 14 of weight 1: outside = 285 / (e^8 + 299).
  EXPECT_NEAR(s->dense_preference, 285.0 / (std::exp(8.0) + 299.0), 1e-6);
}

// The two policies fail in opposite places: a layer with a few dominant keys
// loses little under Top-K but its outlier keys suffer at 1 bit; a layer
// with spread attention keeps its output under quantization (errors average
// out) and loses under Top-K. The plan follows TailorKV's score and the
// measured errors agree with it.
TEST(ScoreLayer, MeasuredErrorsSeparateSparseAndDenseLayers) {
  const auto c = Shape();
  const auto s = Small();
  const Layer peaked = MakeLayer(c, 520, s.query_rows, true, 3);
  const Layer spread = MakeLayer(c, 520, s.query_rows, false, 4);
  auto a = ScoreLayer(peaked.Tap(c, 0), c, s, 2);
  auto b = ScoreLayer(spread.Tap(c, 1), c, s, 2);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_LT(a->dense_preference, 0.2);
  EXPECT_GT(b->dense_preference, 0.2);
  EXPECT_LT(a->sparse_error, a->quant_error);
  EXPECT_GT(b->sparse_error, b->quant_error);
  EXPECT_LT(a->sparse_error, 0.05);
  EXPECT_GT(b->sparse_error, 0.2);
  EXPECT_LE(a->sparse_oracle_error, a->sparse_error + 1e-12);
  EXPECT_GT(a->index_recall, 0.5);
  EXPECT_LE(a->index_recall, 1.0);
  for (const auto* r : {&*a, &*b}) {
    EXPECT_TRUE(std::isfinite(r->quant_error) && r->quant_error > 0);
  }

  // 2-bit quantization loses less than 1-bit on the same layer.
  PlanSettings two = s;
  two.quant_bits = 2;
  auto a2 = ScoreLayer(peaked.Tap(c, 0), c, two, 2);
  ASSERT_TRUE(a2.ok());
  EXPECT_LT(a2->quant_error, a->quant_error);

  auto plan = DecidePlan({*a, *b, *a}, s);
  ASSERT_EQ(plan.layers.size(), 3u);
  EXPECT_EQ(plan.layers[0].kind, KvPolicyKind::kSparse);
  EXPECT_EQ(plan.layers[1].kind, KvPolicyKind::kQuant);
  EXPECT_EQ(plan.layers[1].quant.bits, 1);
  EXPECT_EQ(plan.layers[0].sparse.top_k, 24);
  EXPECT_EQ(plan.layers[0].sparse.index, "gpu");
  EXPECT_EQ(plan.layers[0].sparse.index_bits, s.index_bits);
  EXPECT_EQ(plan.layers[0].sparse.query, s.query);
  EXPECT_EQ(plan.layers[1].dense_preference, RoundScore(b->dense_preference));
  EXPECT_EQ(plan.layers[0].sparse_error, RoundScore(a->sparse_error));
  EXPECT_TRUE(plan.Validate(c).ok()) << plan.Validate(c);
  // The defaults: FP8 index entries scored with the query after the
  // previous layer's attention; index "faithful" keeps neither.
  EXPECT_EQ(PlanSettings{}.index_bits, 8);
  EXPECT_EQ(PlanSettings{}.query, "after-attention");
  PlanSettings faithful = s;
  faithful.index = "faithful";
  auto fplan = DecidePlan({*a, *b, *a}, faithful);
  EXPECT_EQ(fplan.layers[0].sparse.index_bits, 16);
  EXPECT_EQ(fplan.layers[0].sparse.query, "previous");
  EXPECT_TRUE(fplan.Validate(c).ok()) << fplan.Validate(c);
}

// The replay scores the index as the plan stores it: FP8 entries change
// the measured recall of a layer whose keys straddle FP8 codes.
TEST(ScoreLayer, Fp8IndexEntriesAreWhatTheReplayScores) {
  const auto c = Shape();
  const Layer L = MakeLayer(c, 333, 8, true, 5);
  PlanSettings s = Small();
  s.index = "gpu";
  s.index_bits = 16;
  auto b16 = ScoreLayer(L.Tap(c), c, s, 1);
  s.index_bits = 8;
  auto b8 = ScoreLayer(L.Tap(c), c, s, 1);
  ASSERT_TRUE(b16.ok() && b8.ok());
  EXPECT_NE(b16->index_recall, b8->index_recall);
  EXPECT_GT(b8->index_recall, 0.5);
  s.index_bits = 12;
  EXPECT_EQ(ScoreLayer(L.Tap(c), c, s, 1).status().code(), absl::StatusCode::kInvalidArgument);
  s.index_bits = 8;
  s.query = "soon";
  EXPECT_EQ(ScoreLayer(L.Tap(c), c, s, 1).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ScoreLayer, SameInputSameNumbersWhateverTheThreads) {
  const auto c = Shape();
  const Layer L = MakeLayer(c, 333, 8, true, 5);
  for (const char* index : {"gpu", "faithful"}) {
    PlanSettings s = Small();
    s.index = index;
    auto one = ScoreLayer(L.Tap(c), c, s, 1);
    auto three = ScoreLayer(L.Tap(c), c, s, 3);
    ASSERT_TRUE(one.ok() && three.ok());
    EXPECT_EQ(one->dense_preference, three->dense_preference);
    EXPECT_EQ(one->head_preference, three->head_preference);
    EXPECT_EQ(one->sparse_error, three->sparse_error);
    EXPECT_EQ(one->quant_error, three->quant_error);
    EXPECT_EQ(one->index_recall, three->index_recall);
  }
}

// Per-layer widths: every candidate is measured; all channels give the exact
// ranking; more bits lose less; the plan takes the fewest that qualify.
TEST(ScoreLayer, MeasuresEveryCandidateWidthAndThePlanPicksTheFewest) {
  const auto c = Shape();
  PlanSettings s = Small();
  s.min_index_recall = 0.999;
  s.max_channels = 64;
  s.max_quant_error = 1e9;  // any: the fewest bits
  EXPECT_EQ(ChannelCandidates(s, c.head_dim), (std::vector<int>{8, 16, 32, 64}));
  EXPECT_EQ(BitCandidates(s), (std::vector<int>{1, 2, 4}));
  const Layer L = MakeLayer(c, 480, s.query_rows, true, 8);
  auto r = ScoreLayer(L.Tap(c), c, s, 2);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->by_channels.size(), 4u);
  ASSERT_EQ(r->by_bits.size(), 3u);
  EXPECT_EQ(r->by_channels[3].recall, 1.0);
  EXPECT_EQ(r->by_channels[3].sparse_error, r->sparse_oracle_error);
  EXPECT_EQ(r->by_channels[0].sparse_error, r->sparse_error);
  EXPECT_GT(r->by_bits[0].quant_error, r->by_bits[1].quant_error);
  EXPECT_GT(r->by_bits[1].quant_error, r->by_bits[2].quant_error);
  EXPECT_EQ(r->by_bits[0].quant_error, r->quant_error);
  // The default settings measure one width each and give the same numbers.
  auto plain = ScoreLayer(L.Tap(c), c, Small(), 2);
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(plain->by_channels.size(), 1u);
  EXPECT_EQ(plain->sparse_error, r->sparse_error);
  EXPECT_EQ(plain->quant_error, r->quant_error);

  int first_full = 0;  // the fewest channels with recall >= 0.999
  while (r->by_channels[first_full].recall < 0.999) ++first_full;
  LayerScores sparse = *r, dense = *r;
  sparse.dense_preference = 0.01;
  dense.dense_preference = 0.9;
  s.max_quant_error = (r->by_bits[1].quant_error + r->by_bits[0].quant_error) / 2;
  auto plan = DecidePlan({sparse, dense}, s);
  EXPECT_EQ(plan.layers[0].sparse.channels, r->by_channels[first_full].channels);
  EXPECT_EQ(plan.layers[0].sparse_error, RoundScore(r->by_channels[first_full].sparse_error));
  EXPECT_EQ(plan.layers[1].quant.bits, 2);
  EXPECT_EQ(plan.layers[1].quant_error, RoundScore(r->by_bits[1].quant_error));
  s.max_quant_error = 0;  // nothing qualifies: the widest
  s.min_index_recall = 1.1;
  plan = DecidePlan({sparse, dense}, s);
  EXPECT_EQ(plan.layers[0].sparse.channels, 64);
  EXPECT_EQ(plan.layers[1].quant.bits, 4);
}

// Per-layer budgets: the candidates are top_k x 1/4 .. 4 that the
// calibration can measure; each is measured with the index and exactly
// (the one at top_k equals the plain measurement); the plan takes the fewest
// tokens within max_sparse_error, the most when none qualifies.
TEST(ScoreLayer, MeasuresEveryCandidateBudgetAndThePlanPicksTheFewest) {
  const auto c = Shape();
  PlanSettings s = Small();  // sink 4 + recent 16, top_k 24, 8 query rows
  EXPECT_EQ(TopKCandidates(s, 480), (std::vector<int>{24}));
  s.max_sparse_error = 1e6;  // any: the fewest tokens
  EXPECT_EQ(TopKCandidates(s, 480), (std::vector<int>{6, 12, 24, 48, 96}));
  EXPECT_EQ(TopKCandidates(s, 100), (std::vector<int>{6, 12, 24, 48}));  // 20 + 96 + 8 >= 100
  s.max_top_k = 30;
  EXPECT_EQ(TopKCandidates(s, 480), (std::vector<int>{6, 12, 24}));
  s.max_top_k = 0;
  const Layer L = MakeLayer(c, 480, s.query_rows, true, 8);
  auto r = ScoreLayer(L.Tap(c), c, s, 2);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->by_top_k.size(), 5u);
  EXPECT_EQ(r->by_top_k[2].top_k, 24);
  EXPECT_EQ(r->by_top_k[2].sparse_error, r->sparse_error);
  EXPECT_EQ(r->by_top_k[2].oracle_error, r->sparse_oracle_error);
  for (const auto& k : r->by_top_k) {
    EXPECT_TRUE(std::isfinite(k.sparse_error) && k.sparse_error >= 0) << k.top_k;
    EXPECT_LE(k.oracle_error, k.sparse_error + 1e-9) << k.top_k << ": exact Top-K loses least";
  }
  EXPECT_LT(r->by_top_k[4].sparse_error, r->by_top_k[0].sparse_error);
  auto plain = ScoreLayer(L.Tap(c), c, Small(), 2);
  ASSERT_TRUE(plain.ok());
  EXPECT_TRUE(plain->by_top_k.empty());
  EXPECT_EQ(plain->sparse_error, r->sparse_error);

  LayerScores sparse = *r;
  sparse.dense_preference = 0.01;
  int fewest = 0;  // the first candidate within a target between two candidates
  s.max_sparse_error = (r->by_top_k[2].sparse_error + r->by_top_k[1].sparse_error) / 2;
  while (r->by_top_k[fewest].sparse_error > s.max_sparse_error) ++fewest;
  auto plan = DecidePlan({sparse}, s);
  EXPECT_EQ(plan.layers[0].sparse.top_k, r->by_top_k[fewest].top_k);
  EXPECT_EQ(plan.layers[0].sparse_error, RoundScore(r->by_top_k[fewest].sparse_error));
  s.max_sparse_error = 0;  // nothing qualifies: the most tokens
  EXPECT_EQ(DecidePlan({sparse}, s).layers[0].sparse.top_k, 96);
  s.max_sparse_error = -1;  // off: the setting's top_k
  EXPECT_EQ(DecidePlan({sparse}, s).layers[0].sparse.top_k, 24);
}

// The index-format study measures eight stored forms of the index and
// changes nothing else: same scores, same plan.
TEST(ScoreLayer, IndexStudyMeasuresEveryFormatAndChangesNothingElse) {
  const auto c = Shape();
  PlanSettings s = Small();
  const Layer L = MakeLayer(c, 480, s.query_rows, true, 8);
  auto plain = ScoreLayer(L.Tap(c), c, s, 2);
  s.index_study = true;
  auto study = ScoreLayer(L.Tap(c), c, s, 2);
  ASSERT_TRUE(plain.ok() && study.ok()) << study.status();
  EXPECT_TRUE(plain->by_index_format.empty());
  ASSERT_EQ(study->by_index_format.size(), 8u);
  const char* names[] = {"bf16",     "fp8",           "int4",          "int4-all",
                         "int2-all", "int2-all-kivi", "int4-all-kivi", "int4-kivi"};
  const double hd = c.head_dim;
  const double bytes[] = {2.0 * s.channels, 1.0 * s.channels, 0.5 * s.channels + 2, 0.5 * hd + 2,
                          0.25 * hd + 4,    0.25 * hd + hd / 16, 0.5 * hd + hd / 16,
                          0.5 * s.channels + s.channels / 16.0};
  for (int f = 0; f < 8; ++f) {
    const auto& m = study->by_index_format[f];
    EXPECT_EQ(m.format, names[f]);
    EXPECT_EQ(m.channels, f >= 3 && f <= 6 ? c.head_dim : s.channels);
    EXPECT_EQ(m.bytes_per_token, bytes[f]);
    EXPECT_GE(m.recall, 0.0);
    EXPECT_LE(m.recall, 1.0);
    // The exact group-mean Top-K is not the least-error set for every head,
    // so a rounded index can land a hair below it, never far.
    EXPECT_GE(m.sparse_error, 0.95 * study->sparse_oracle_error) << m.format;
  }
  // All channels at 4 bits rank nearly as the exact scores do on this layer.
  EXPECT_GT(study->by_index_format[3].recall, 0.9);
  EXPECT_GT(study->by_index_format[6].recall, 0.9);
  // Fewer bits rank worse than more bits of the same layout.
  EXPECT_LT(study->by_index_format[5].recall, study->by_index_format[6].recall);
  EXPECT_EQ(study->sparse_error, plain->sparse_error);
  EXPECT_EQ(study->index_recall, plain->index_recall);
  s.index_study = false;
  EXPECT_EQ(DecidePlan({*study}, s), DecidePlan({*plain}, s));
}

TEST(DecidePlan, MaxQuantLayersKeepsTheHighestScores) {
  std::vector<LayerScores> scores(5);
  const double pref[] = {0.9, 0.3, 0.1, 0.5, 0.3};
  for (int l = 0; l < 5; ++l) {
    scores[l].layer = l;
    scores[l].dense_preference = pref[l];
  }
  PlanSettings s;
  s.max_quant_layers = 2;
  auto plan = DecidePlan(scores, s);
  std::vector<int> quant;
  for (int l = 0; l < 5; ++l) {
    if (plan.layers[l].kind == KvPolicyKind::kQuant) quant.push_back(l);
  }
  EXPECT_EQ(quant, (std::vector<int>{0, 3}));
  s.max_quant_layers = 3;  // 1 and 4 tie at 0.3: the lower layer wins
  plan = DecidePlan(scores, s);
  EXPECT_EQ(plan.layers[1].kind, KvPolicyKind::kQuant);
  EXPECT_EQ(plan.layers[4].kind, KvPolicyKind::kSparse);
  s.max_quant_layers = 0;
  plan = DecidePlan(scores, s);
  for (const auto& l : plan.layers) EXPECT_EQ(l.kind, KvPolicyKind::kSparse);
}

TEST(ValidatePlanSettings, NamesTheField) {
  const auto c = Shape();
  struct Case {
    std::function<void(PlanSettings&)> edit;
    int tokens;
    std::string field;
  };
  const Case cases[] = {
      {[](PlanSettings& s) { s.quant_bits = 3; }, 4096, "settings.quant_bits"},
      {[](PlanSettings& s) { s.quant_group = 128; }, 4096, "settings.quant_group"},
      {[](PlanSettings& s) { s.quant_residual = 100; }, 4096, "settings.quant_residual"},
      {[](PlanSettings& s) { s.sink = -1; }, 4096, "settings.sink"},
      {[](PlanSettings& s) { s.recent = 0; }, 4096, "settings.recent"},
      {[](PlanSettings& s) { s.channels = 65; }, 4096, "settings.channels"},
      {[](PlanSettings& s) { s.index = "cpu"; }, 4096, "settings.index"},
      {[](PlanSettings& s) { s.threshold = 1.5; }, 4096, "settings.threshold"},
      {[](PlanSettings& s) { s.query_rows = 0; }, 4096, "settings.query_rows"},
      {[](PlanSettings& s) { s.max_quant_layers = 4; }, 4096, "settings.max_quant_layers"},
      {[](PlanSettings& s) { s.min_index_recall = 2; }, 4096, "settings.min_index_recall"},
      {[](PlanSettings& s) { s.max_channels = 65; }, 4096, "settings.max_channels"},
      {[](PlanSettings& s) { s.max_sparse_error = 1e7; }, 4096, "settings.max_sparse_error"},
      {[](PlanSettings& s) { s.max_top_k = -1; }, 4096, "settings.max_top_k"},
      // The default budget 1,024 + 32 query rows does not fit 1,056 tokens.
      {[](PlanSettings&) {}, 1056, "settings.top_k: the sparse budget"},
      {[](PlanSettings& s) { s.top_k = 5000; }, 4096, "settings.top_k"},
  };
  ASSERT_TRUE(ValidatePlanSettings(PlanSettings{}, c, 1057).ok());
  for (const Case& tc : cases) {
    PlanSettings s;
    tc.edit(s);
    const absl::Status st = ValidatePlanSettings(s, c, tc.tokens);
    EXPECT_TRUE(absl::IsInvalidArgument(st)) << tc.field << ": " << st;
    EXPECT_EQ(st.message().find(tc.field), 0u) << st;
  }
}

TEST(ScoreLayer, RefusesATapWithoutTheLastRows) {
  const auto c = Shape();
  Layer L = MakeLayer(c, 300, 8, false, 6);
  auto tap = L.Tap(c);
  tap.first_query = 100;  // not the last rows
  EXPECT_TRUE(absl::IsInvalidArgument(ScoreLayer(tap, c, Small(), 1).status()));
  PlanSettings s = Small();
  s.query_rows = 16;  // the tap holds 8
  EXPECT_TRUE(absl::IsInvalidArgument(ScoreLayer(L.Tap(c), c, s, 1).status()));
}

TEST(RoundScore, SixSignificantDigits) {
  EXPECT_EQ(RoundScore(0.123456789), 0.123457);
  EXPECT_EQ(RoundScore(1.0), 1.0);
  EXPECT_EQ(RoundScore(0.0), 0.0);
  EXPECT_EQ(RoundScore(3.14159265e-7), 3.14159e-7);
}

}  // namespace
}  // namespace tailorkv::profiler
