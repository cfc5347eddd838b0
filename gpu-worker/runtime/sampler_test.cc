#include "runtime/sampler.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace tailorkv::runtime {
namespace {

std::vector<float> Logits(std::vector<double> probs) {
  std::vector<float> l;
  for (double p : probs) l.push_back(static_cast<float>(std::log(p)));
  return l;
}

TEST(Sampler, GreedyPicksArgmaxAndLowestIdOnTies) {
  Sampler s({});
  std::vector<float> l = {0.1f, 3.0f, -1.0f, 3.0f, 2.9f};
  EXPECT_EQ(s.Sample(absl::MakeSpan(l), {}), 1);
  std::vector<float> m = {-5.0f, -2.0f, -7.0f};
  EXPECT_EQ(s.Sample(absl::MakeSpan(m), {}), 1);
}

TEST(Sampler, TemperatureSamplesTheDistribution) {
  SamplingParams p;
  p.temperature = 1.0f;
  p.seed = 42;
  Sampler s(p);
  std::vector<int> counts(3);
  const int n = 20000;
  for (int i = 0; i < n; ++i) {
    auto l = Logits({0.5, 0.3, 0.2});
    counts[s.Sample(absl::MakeSpan(l), {})]++;
  }
  EXPECT_NEAR(counts[0] / double(n), 0.5, 0.02);
  EXPECT_NEAR(counts[1] / double(n), 0.3, 0.02);
  EXPECT_NEAR(counts[2] / double(n), 0.2, 0.02);
}

TEST(Sampler, TopPAndTopKCutTheTail) {
  SamplingParams p;
  p.temperature = 1.0f;
  p.top_p = 0.75f;  // 0.5 + 0.3 reaches it: token 2 and 3 never appear
  p.seed = 3;
  Sampler s(p);
  SamplingParams q = p;
  q.top_p = 1.0f;
  q.top_k = 1;  // top_k 1 is greedy whatever the temperature
  Sampler k1(q);
  std::vector<int> counts(4);
  for (int i = 0; i < 5000; ++i) {
    auto l = Logits({0.5, 0.3, 0.15, 0.05});
    counts[s.Sample(absl::MakeSpan(l), {})]++;
    auto l2 = Logits({0.3, 0.5, 0.15, 0.05});
    EXPECT_EQ(k1.Sample(absl::MakeSpan(l2), {}), 1);
  }
  EXPECT_EQ(counts[2] + counts[3], 0);
  EXPECT_GT(counts[0], 0);
  EXPECT_GT(counts[1], 0);
}

TEST(Sampler, SameSeedSameSequenceOtherSeedDiffers) {
  SamplingParams p;
  p.temperature = 1.5f;
  p.seed = 1234;
  auto run = [](SamplingParams params) {
    Sampler s(params);
    std::vector<int32_t> out;
    for (int i = 0; i < 64; ++i) {
      std::vector<float> l(50);
      for (int j = 0; j < 50; ++j) l[j] = std::sin(j * 0.7f + i);
      out.push_back(s.Sample(absl::MakeSpan(l), {}));
    }
    return out;
  };
  EXPECT_EQ(run(p), run(p));
  SamplingParams other = p;
  other.seed = 1235;
  EXPECT_NE(run(p), run(other));
}

TEST(Sampler, RepetitionPenaltyDividesPositiveAndMultipliesNegative) {
  SamplingParams p;
  p.repetition_penalty = 2.0f;
  Sampler s(p);
  std::vector<float> l = {4.0f, 3.0f, -1.0f};
  const std::vector<int32_t> history = {0, 0, 2};
  // Token 0: 4 -> 2 (below token 1's 3); applied once although seen twice.
  EXPECT_EQ(s.Sample(absl::MakeSpan(l), history), 1);
  // Negative logits are multiplied: token 2's -1 becomes -2.
  const std::vector<float> m = {-1.2f, -1.5f, -1.0f};
  EXPECT_EQ(GreedyPick(m, 2.0f, {}), 2);
  EXPECT_EQ(GreedyPick(m, 2.0f, std::vector<int32_t>{2}), 0);
  EXPECT_EQ(GreedyPick(m, 2.0f, std::vector<int32_t>{0, 2, 2}), 1);
  EXPECT_EQ(GreedyPick(m, 1.0f, std::vector<int32_t>{2}), 2);  // no penalty
}

// The device pick's reference: ties to the lowest id, NaN never wins except
// at id 0 (nothing compares greater), ids outside the vocabulary ignored,
// penalties once per distinct token, the logits left as they are.
TEST(GreedyPick, TiesNaNAndHistoryEdgeCases) {
  const float nan = std::nanf("");
  std::vector<float> l = {1.0f, 5.0f, nan, 5.0f, -2.0f};
  EXPECT_EQ(GreedyPick(l, 1.0f, {}), 1);
  EXPECT_EQ(GreedyPick(l, 10.0f, std::vector<int32_t>{1, 1, -7, 99}), 3);  // 5 -> 0.5
  EXPECT_FLOAT_EQ(l[1], 5.0f);
  const std::vector<float> first_nan = {nan, 1.0f, 2.0f};
  EXPECT_EQ(GreedyPick(first_nan, 1.0f, {}), 0);
  const std::vector<float> all_neg_inf(4, -INFINITY);
  EXPECT_EQ(GreedyPick(all_neg_inf, 2.0f, std::vector<int32_t>{0}), 0);
  EXPECT_EQ(GreedyPick({}, 1.0f, {}), 0);
}

TEST(SamplingParams, ValidateNamesFieldAndLimit) {
  struct Bad {
    SamplingParams p;
    const char* field;
  };
  std::vector<Bad> bad;
  bad.push_back({{.temperature = NAN}, "temperature"});
  bad.push_back({{.temperature = -0.5f}, "temperature"});
  bad.push_back({{.top_p = 0.0f}, "top_p"});
  bad.push_back({{.top_p = 1.5f}, "top_p"});
  bad.push_back({{.top_p = NAN}, "top_p"});
  bad.push_back({{.top_k = 101}, "top_k"});
  bad.push_back({{.top_k = -1}, "top_k"});
  bad.push_back({{.repetition_penalty = 0.0f}, "repetition_penalty"});
  bad.push_back({{.repetition_penalty = INFINITY}, "repetition_penalty"});
  for (const auto& b : bad) {
    auto s = b.p.Validate(100);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << b.field;
    EXPECT_NE(s.message().find(b.field), std::string::npos) << s;
  }
  EXPECT_TRUE(SamplingParams{}.Validate(100).ok());
  EXPECT_TRUE((SamplingParams{.temperature = 0.7f, .top_p = 0.9f, .top_k = 100}).Validate(100).ok());
}

}  // namespace
}  // namespace tailorkv::runtime
