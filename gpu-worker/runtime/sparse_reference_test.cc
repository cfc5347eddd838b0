// TopKIndices and GatherRows against independent oracles: a full std::sort
// by the stated rule (larger key first, then smaller index), and a
// byte-by-byte copy loop. Outputs are poisoned before each call.
#include "runtime/sparse_reference.h"

#include "runtime/cpu_reference.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

namespace tailorkv::runtime {
namespace {

constexpr int32_t kPoison = -12345;

// Oracle: rank all n by a full sort, take the first min(k, n), sort by index.
std::vector<int32_t> Oracle(const std::vector<float>& s, int k) {
  const int n = static_cast<int>(s.size());
  std::vector<int32_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  auto rank = [&](float x) -> std::pair<int, double> {  // (class, value): NaN < everything
    if (std::isnan(x)) return {0, 0.0};
    // -0.0 ranks just below +0.0: give it a tiny negative offset.
    if (x == 0.0f && std::signbit(x)) return {1, -1e-300};
    return {1, static_cast<double>(x)};
  };
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    auto ra = rank(s[a]), rb = rank(s[b]);
    if (ra != rb) return ra > rb;
    return a < b;
  });
  order.resize(std::min(k, n));
  std::sort(order.begin(), order.end());
  return order;
}

std::vector<int32_t> RunTopK(const std::vector<float>& s, int k) {
  const int n = static_cast<int>(s.size());
  std::vector<int32_t> out(std::max(1, std::min(k, n)) + 1, kPoison);
  absl::StatusOr<int> m = TopKIndices(s.data(), n, k, out.data());
  EXPECT_TRUE(m.ok()) << m.status();
  if (!m.ok()) return {};
  EXPECT_EQ(*m, std::min(k, n));
  EXPECT_EQ(out[std::min(k, n)], kPoison) << "wrote past min(k, n)";
  out.resize(*m);
  return out;
}

TEST(SparseTopKTest, HandPickedTiesAndNaN) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  //                    0     1    2    3     4    5     6     7
  std::vector<float> s = {1.0f, nan, 3.0f, 1.0f, -inf, 3.0f, 1.0f, -0.0f};
  EXPECT_EQ(RunTopK(s, 1), (std::vector<int32_t>{2}));              // tie 3.0 at 2, 5: smaller index
  EXPECT_EQ(RunTopK(s, 2), (std::vector<int32_t>{2, 5}));
  EXPECT_EQ(RunTopK(s, 3), (std::vector<int32_t>{0, 2, 5}));        // tie 1.0 at 0, 3, 6
  EXPECT_EQ(RunTopK(s, 5), (std::vector<int32_t>{0, 2, 3, 5, 6}));
  EXPECT_EQ(RunTopK(s, 6), (std::vector<int32_t>{0, 2, 3, 5, 6, 7}));  // -0.0 above -inf
  EXPECT_EQ(RunTopK(s, 7), (std::vector<int32_t>{0, 2, 3, 4, 5, 6, 7}));  // NaN last
  EXPECT_EQ(RunTopK(s, 8), (std::vector<int32_t>{0, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_EQ(RunTopK(s, 100), (std::vector<int32_t>{0, 1, 2, 3, 4, 5, 6, 7}));
  std::vector<float> z = {0.0f, -0.0f, 0.0f};
  EXPECT_EQ(RunTopK(z, 1), (std::vector<int32_t>{0}));
  EXPECT_EQ(RunTopK(z, 2), (std::vector<int32_t>{0, 2}));  // +0.0 outranks -0.0
  std::vector<float> nans(5, -nan);
  EXPECT_EQ(RunTopK(nans, 2), (std::vector<int32_t>{0, 1}));  // all NaN: smallest indices
}

TEST(SparseTopKTest, KeyOrdersLikeFloats) {
  const float vals[] = {-std::numeric_limits<float>::infinity(), -3e38f, -1.0f, -1e-45f, -0.0f,
                        0.0f, 1e-45f, 1.0f, 3e38f, std::numeric_limits<float>::infinity()};
  for (size_t i = 0; i + 1 < std::size(vals); ++i) {
    EXPECT_LT(TopKKey(vals[i]), TopKKey(vals[i + 1])) << vals[i] << " vs " << vals[i + 1];
  }
  EXPECT_EQ(TopKKey(std::numeric_limits<float>::quiet_NaN()), 0u);
  EXPECT_EQ(TopKKey(-std::numeric_limits<float>::quiet_NaN()), 0u);
  EXPECT_GT(TopKKey(-std::numeric_limits<float>::infinity()), 0u);
}

TEST(SparseTopKTest, RandomWithSeededDuplicatesMatchesSortOracle) {
  std::mt19937 rng(20261122);
  const int sizes[] = {1, 2, 7, 64, 257, 1000, 4097};
  for (int n : sizes) {
    for (int levels : {0, 3, 50}) {  // 0: continuous values; else quantized to `levels` values
      std::vector<float> s(n);
      std::normal_distribution<float> normal(0.0f, 2.0f);
      std::uniform_int_distribution<int> level(0, std::max(1, levels) - 1);
      for (int i = 0; i < n; ++i) s[i] = levels == 0 ? normal(rng) : 0.25f * level(rng) - 1.0f;
      // Seeded duplicates of random earlier values, and a few NaNs.
      for (int j = 0; j < n / 8; ++j) s[rng() % n] = s[rng() % n];
      for (int j = 0; j < n / 50; ++j) s[rng() % n] = std::numeric_limits<float>::quiet_NaN();
      for (int k : {1, 2, n / 3, n - 1, n, n + 5}) {
        if (k < 1) continue;
        EXPECT_EQ(RunTopK(s, k), Oracle(s, k)) << "n=" << n << " levels=" << levels << " k=" << k;
      }
    }
  }
}

TEST(SparseTopKTest, EmptyAndBadInput) {
  int32_t out[2] = {kPoison, kPoison};
  EXPECT_EQ(*TopKIndices(nullptr, 0, 4, out), 0);
  float one = 1.0f;
  EXPECT_EQ(*TopKIndices(&one, 1, 0, out), 0);
  EXPECT_EQ(out[0], kPoison);
  absl::StatusOr<int> r = TopKIndices(&one, -1, 1, out);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("n ="), std::string::npos);
  r = TopKIndices(&one, 1, -2, out);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("k ="), std::string::npos);
  EXPECT_FALSE(TopKIndices(nullptr, 1, 1, out).ok());
  EXPECT_FALSE(TopKIndices(&one, 1, 1, nullptr).ok());
}

// Refine: a Top-K over a pool maps back to the pool's entries; entries
// outside the pool (TopK's -1 tail, anything out of range) become -1.
TEST(MapThroughPoolTest, MapsEachRowThroughItsOwnPool) {
  const int32_t pool[2 * 5] = {3, 8, 9, 40, 41,  //
                               0, 2, 4, 6, 1000};
  const int32_t idx[2 * 3] = {0, 2, 4,  //
                              1, 5, -1};
  int32_t out[2 * 3] = {kPoison, kPoison, kPoison, kPoison, kPoison, kPoison};
  MapThroughPool(idx, 3, pool, 5, 2, out);
  EXPECT_EQ(std::vector<int32_t>(out, out + 6), (std::vector<int32_t>{3, 9, 41, 2, -1, -1}));
  // The CPU backend's refine: Top-2 of the pooled scores, back to positions.
  const float pooled[5] = {0.5f, 3.0f, -1.0f, 2.0f, 2.0f};
  int32_t in_pool[2], picked[2];
  ASSERT_EQ(*TopKIndices(pooled, 5, 2, in_pool), 2);
  MapThroughPool(in_pool, 2, pool, 5, 1, picked);
  EXPECT_EQ(picked[0], 8);   // pool slot 1 (score 3)
  EXPECT_EQ(picked[1], 40);  // slot 3: the tie with slot 4 goes to the smaller index
}

TEST(SparseGatherTest, BitExactWithDuplicates) {
  std::mt19937 rng(7);
  for (int64_t row_bytes : {1, 16, 256, 2048, 2051}) {
    const int64_t src_rows = 97;
    std::vector<unsigned char> src(src_rows * row_bytes);
    for (auto& b : src) b = static_cast<unsigned char>(rng());
    const int count = 131;
    std::vector<int32_t> idx(count);
    for (auto& i : idx) i = static_cast<int32_t>(rng() % src_rows);
    idx[5] = idx[6] = idx[100];  // duplicates
    idx[0] = 0;
    idx[count - 1] = src_rows - 1;
    std::vector<unsigned char> dst(count * row_bytes + 3, 0xA5);
    ASSERT_TRUE(GatherRows(src.data(), src_rows, row_bytes, idx.data(), count, dst.data()).ok());
    for (int i = 0; i < count; ++i) {
      for (int64_t b = 0; b < row_bytes; ++b) {
        ASSERT_EQ(dst[i * row_bytes + b], src[idx[i] * row_bytes + b]) << "row " << i << " byte " << b;
      }
    }
    for (int t = 0; t < 3; ++t) EXPECT_EQ(dst[count * row_bytes + t], 0xA5) << "wrote past the end";
  }
}

TEST(SparseGatherTest, BadInputNamesTheField) {
  std::vector<unsigned char> src(64), dst(64, 0xA5);
  int32_t idx[2] = {0, 4};
  absl::Status s = GatherRows(src.data(), 4, 16, idx, 2, dst.data());
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("idx[1] = 4"), std::string::npos) << s;
  EXPECT_EQ(dst[0], 0xA5) << "copied before validating";
  idx[1] = -1;
  EXPECT_FALSE(GatherRows(src.data(), 4, 16, idx, 2, dst.data()).ok());
  EXPECT_NE(GatherRows(src.data(), 4, -16, idx, 2, dst.data()).message().find("row_bytes"), std::string::npos);
  EXPECT_NE(GatherRows(src.data(), 4, 16, idx, -2, dst.data()).message().find("count"), std::string::npos);
  EXPECT_NE(GatherRows(src.data(), -4, 16, idx, 2, dst.data()).message().find("src_rows"), std::string::npos);
  EXPECT_FALSE(GatherRows(nullptr, 4, 16, idx, 1, dst.data()).ok());
  EXPECT_FALSE(GatherRows(src.data(), 4, 16, nullptr, 1, dst.data()).ok());
  EXPECT_FALSE(GatherRows(src.data(), 4, 16, idx, 1, nullptr).ok());
  EXPECT_TRUE(GatherRows(nullptr, 0, 16, nullptr, 0, nullptr).ok());
}

// ChooseChannels ranks |q| x max|K|: ties to the smaller channel, NaN last,
// output ascending.
TEST(ChooseChannelsTest, RanksByQueryTimesMaxAbsKey) {
  const float q[6] = {1.0f, -4.0f, 2.0f, NAN, -2.0f, 0.5f};
  const float mx[6] = {3.0f, 1.0f, 2.0f, 100.0f, 2.0f, 8.0f};
  // scores 3, 4, 4, NaN, 4, 4: the four 4s, the smaller channels first.
  int32_t out[6] = {-7, -7, -7, -7, -7, -7};
  auto n = ChooseChannels(q, mx, 6, 3, out);
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 3);
  EXPECT_EQ(std::vector<int32_t>(out, out + 3), (std::vector<int32_t>{1, 2, 4}));
  EXPECT_EQ(out[3], -7) << "writes only the count";
  n = ChooseChannels(q, mx, 6, 5, out);
  EXPECT_EQ(std::vector<int32_t>(out, out + 5), (std::vector<int32_t>{0, 1, 2, 4, 5}));
  n = ChooseChannels(q, mx, 6, 9, out);
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 6);
  EXPECT_FALSE(ChooseChannels(q, mx, 0, 1, out).ok());
}

TEST(ScoreOnChannelsTest, SumsInChannelOrder) {
  // 1e8 + 1 - 1e8 in order is 0 in fp32; another order would give 1.
  const float q[3] = {1.0f, 1.0f, 1.0f};
  const float rows[6] = {1e8f, 1.0f, -1e8f, 2.0f, 3.0f, -0.5f};
  float out[3] = {NAN, NAN, 42.0f};
  ScoreOnChannels(q, 3, rows, 2, out);
  EXPECT_EQ(out[0], 0.0f);
  EXPECT_EQ(out[1], 4.5f);
  EXPECT_EQ(out[2], 42.0f) << "writes only n scores";
}

// SpeculativeQueryMean equals the full projection, RoPE on whole heads
// (ApplyRope) and the group mean, restricted to the chosen channels: both
// rope styles, a group of 3, channels from both halves of the head.
TEST(SpeculativeQueryMeanTest, MatchesFullProjectionRopeAndMean) {
  constexpr int hidden = 37, n_heads = 6, n_kv = 2, hd = 16, d = 5, pos = 1234;
  std::mt19937 rng(61);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x(hidden), wq(static_cast<size_t>(n_heads) * hd * hidden);
  for (float& v : x) v = nd(rng);
  for (float& v : wq) v = nd(rng);
  model::ModelConfig c;
  c.head_dim = hd;
  c.rope_theta = 10000.0f;
  const std::vector<float> inv_freq = ref::RopeInvFreq(c);
  const int32_t chans[n_kv * d] = {0, 3, 7, 8, 15, 1, 2, 9, 10, 14};
  for (const model::RopeStyle style : {model::RopeStyle::kAdjacentPairs, model::RopeStyle::kHalves}) {
    std::vector<float> q(static_cast<size_t>(n_heads) * hd);
    for (int r = 0; r < n_heads * hd; ++r) {
      float s = 0.0f;
      for (int i = 0; i < hidden; ++i) s += wq[static_cast<size_t>(r) * hidden + i] * x[i];
      q[r] = s;
    }
    for (int h = 0; h < n_heads; ++h) ref::ApplyRope(&q[h * hd], hd, pos, inv_freq, style);
    float out[n_kv * d];
    std::fill(std::begin(out), std::end(out), NAN);
    SpeculativeQueryMean(x.data(), wq.data(), hidden, n_heads, n_kv, hd, chans, d, pos, inv_freq.data(),
                         style == model::RopeStyle::kAdjacentPairs, out);
    for (int h = 0; h < n_kv; ++h) {
      for (int j = 0; j < d; ++j) {
        const int ch = chans[h * d + j];
        const float want = (q[(3 * h) * hd + ch] + q[(3 * h + 1) * hd + ch] + q[(3 * h + 2) * hd + ch]) / 3.0f;
        EXPECT_NEAR(out[h * d + j], want, 1e-4f * (1.0f + std::fabs(want)))
            << "style " << static_cast<int>(style) << " head " << h << " channel " << ch;
      }
    }
  }
}

// Slots whose token is selected again keep it; the new tokens, ascending,
// take the freed slots, ascending; a freed slot left over holds -1; empty
// slots in `next` (-1) take nothing.
TEST(AssignSlotsTest, KeepsSlotsSelectedAgainAndFillsTheFreedOnes) {
  const int count = 6;
  std::vector<int32_t> slots = {11, 2, -1, 9, 5, 30};
  const std::vector<int32_t> next = {1, 5, 9, 12, 40, -1};
  std::vector<int32_t> miss(count, 77);
  auto n = AssignSlots(slots.data(), next.data(), count, miss.data());
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(*n, 2);  // 9 and 5
  // Freed: slots 0 (11), 1 (2), 2 (empty), 5 (30); fresh: 1, 12, 40.
  EXPECT_EQ(miss, (std::vector<int32_t>{1, 12, 40, -1, -1, -1}));
  EXPECT_EQ(slots, (std::vector<int32_t>{1, 12, 40, 9, 5, -1}));
  // The same selection again: every slot keeps its token, nothing to fetch.
  n = AssignSlots(slots.data(), next.data(), count, miss.data());
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 5);
  EXPECT_EQ(miss, std::vector<int32_t>(count, -1));
  EXPECT_EQ(slots, (std::vector<int32_t>{1, 12, 40, 9, 5, -1}));
  // Nothing held: every token is fetched, in order.
  std::vector<int32_t> none(count, -1);
  n = AssignSlots(none.data(), next.data(), count, miss.data());
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 0);
  EXPECT_EQ(miss, (std::vector<int32_t>{1, 5, 9, 12, 40, -1}));
  EXPECT_EQ(none, miss);
  EXPECT_EQ(AssignSlots(slots.data(), next.data(), -1, miss.data()).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(AssignSlots(slots.data(), nullptr, count, miss.data()).status().message(),
            "AssignSlots: next is null");
}

}  // namespace
}  // namespace tailorkv::runtime

namespace tailorkv::runtime {
namespace {

// A block of a 4-bit index: 16 levels from bf16(min) in steps of
// bf16(range / 15), strided; a flat block keeps its value; NaN stays NaN.
TEST(IndexBlock4Test, RoundsToSixteenLevelsOfTheBlock) {
  // Column 0 of a 3-wide row-major block: 0, 1.5, 3, ..., the max 15 * 1.5.
  std::vector<float> v(3 * 16, -99.0f);
  for (int i = 0; i < 16; ++i) v[i * 3] = 1.5f * i + (i % 2 == 0 ? 0.2f : -0.2f);
  v[0] = 0.0f;
  v[15 * 3] = 22.5f;
  RoundIndexBlock4(v.data(), 16, 3);
  for (int i = 0; i < 16; ++i) EXPECT_EQ(v[i * 3], 1.5f * i) << i;  // each to its own level
  for (int i = 0; i < 16; ++i) EXPECT_EQ(v[i * 3 + 1], -99.0f) << "other columns untouched";
  // Half-way values round to even codes: step 1 (bf16 exact), 0.5 -> 0, 1.5 -> 2.
  std::vector<float> h = {0.0f, 0.5f, 1.5f, 15.0f};
  RoundIndexBlock4(h.data(), 4, 1);
  EXPECT_EQ(h, (std::vector<float>{0.0f, 0.0f, 2.0f, 15.0f}));
  // bf16 zero and step: min 0.1 -> 0.10009765625; step of (1.1 - z) / 15.
  std::vector<float> r = {0.1f, 1.1f};
  RoundIndexBlock4(r.data(), 2, 1);
  EXPECT_EQ(r[0], 0.10009765625f);
  EXPECT_NEAR(r[1], 1.1f, 0.01f);
  std::vector<float> flat = {2.5f, 2.5f, std::numeric_limits<float>::quiet_NaN()};
  RoundIndexBlock4(flat.data(), 3, 1);
  EXPECT_EQ(flat[0], 2.5f);
  EXPECT_EQ(flat[1], 2.5f);
  EXPECT_TRUE(std::isnan(flat[2]));
  RoundIndexBlock4(nullptr, 0, 1);  // empty: nothing to do
}

}  // namespace
}  // namespace tailorkv::runtime
