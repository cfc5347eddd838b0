#include "runtime/cpu_backend.h"

#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numbers>
#include <random>

#include "runtime/cpu_reference.h"
#include "runtime/test_model.h"

namespace tailorkv::runtime {
namespace {

using model::ModelWeights;
using model::RopeStyle;

// Straightforward forward pass over a whole sequence built only from the
// reference ops (no BLAS, no cache): what the backend must reproduce.
std::vector<float> ReferenceLogits(const ModelWeights& w, const std::vector<int32_t>& tokens) {
  const auto& c = w.config;
  const int n = static_cast<int>(tokens.size()), H = c.hidden, hd = c.head_dim;
  const auto inv_freq = ref::RopeInvFreq(c);
  auto matvec = [](const model::Tensor& W, const float* x, float* y) {
    for (int64_t o = 0; o < W.rows(); ++o) {
      double acc = 0;
      for (int64_t i = 0; i < W.cols(); ++i) acc += static_cast<double>(W.data[o * W.cols() + i]) * x[i];
      y[o] = static_cast<float>(acc);
    }
  };
  std::vector<float> x(n * H), xn(H);
  for (int i = 0; i < n; ++i) std::copy_n(&w.tok_embd.data[tokens[i] * H], H, &x[i * H]);
  for (const auto& L : w.layers) {
    std::vector<std::vector<float>> q(c.n_heads, std::vector<float>(n * hd));
    std::vector<std::vector<float>> k(c.n_kv_heads, std::vector<float>(n * hd)), v = k;
    std::vector<float> tq(c.n_heads * hd), tk(c.n_kv_heads * hd), tv(c.n_kv_heads * hd);
    for (int i = 0; i < n; ++i) {
      ref::RmsNorm(&x[i * H], L.attn_norm.data.data(), H, c.rms_eps, xn.data());
      matvec(L.wq, xn.data(), tq.data());
      matvec(L.wk, xn.data(), tk.data());
      matvec(L.wv, xn.data(), tv.data());
      for (int h = 0; h < c.n_heads; ++h) {
        ref::ApplyRope(&tq[h * hd], hd, i, inv_freq, c.rope_style);
        std::copy_n(&tq[h * hd], hd, &q[h][i * hd]);
      }
      for (int h = 0; h < c.n_kv_heads; ++h) {
        ref::ApplyRope(&tk[h * hd], hd, i, inv_freq, c.rope_style);
        std::copy_n(&tk[h * hd], hd, &k[h][i * hd]);
        std::copy_n(&tv[h * hd], hd, &v[h][i * hd]);
      }
    }
    std::vector<float> attn(n * c.n_heads * hd), head_out(n * hd), o(H);
    for (int h = 0; h < c.n_heads; ++h) {
      const int g = h / (c.n_heads / c.n_kv_heads);
      ref::AttentionHead(q[h].data(), k[g].data(), v[g].data(), n, 0, hd, head_out.data());
      for (int i = 0; i < n; ++i) std::copy_n(&head_out[i * hd], hd, &attn[(i * c.n_heads + h) * hd]);
    }
    std::vector<float> gate(c.ffn), up(c.ffn);
    for (int i = 0; i < n; ++i) {
      matvec(L.wo, &attn[i * c.n_heads * hd], o.data());
      for (int j = 0; j < H; ++j) x[i * H + j] += o[j];
      ref::RmsNorm(&x[i * H], L.ffn_norm.data.data(), H, c.rms_eps, xn.data());
      matvec(L.w_gate, xn.data(), gate.data());
      matvec(L.w_up, xn.data(), up.data());
      ref::SwiGlu(gate.data(), up.data(), c.ffn);
      matvec(L.w_down, gate.data(), o.data());
      for (int j = 0; j < H; ++j) x[i * H + j] += o[j];
    }
  }
  std::vector<float> logits(n * c.vocab);
  for (int i = 0; i < n; ++i) {
    ref::RmsNorm(&x[i * H], w.output_norm.data.data(), H, c.rms_eps, xn.data());
    matvec(w.head(), xn.data(), &logits[i * c.vocab]);
  }
  return logits;
}

std::vector<int32_t> RandomTokens(int n, int vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> d(0, vocab - 1);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = d(rng);
  return t;
}

float MaxAbsDiff(const float* a, const float* b, size_t n, size_t* where) {
  float m = 0;
  for (size_t i = 0; i < n; ++i) {
    const float d = std::fabs(a[i] - b[i]);
    if (!(d <= m)) {  // NaN counts as a difference
      m = std::isnan(d) ? INFINITY : d;
      *where = i;
    }
  }
  return m;
}

struct Case {
  RopeStyle style;
  bool tied;
};

class CpuBackendTest : public ::testing::TestWithParam<Case> {};

// 300 tokens: three 128-row query blocks, the last partial, so block edges
// are covered.
TEST_P(CpuBackendTest, BatchPrefillMatchesReferenceForward) {
  const auto w = testing::TinyModel(7, GetParam().style, GetParam().tied);
  const auto tokens = RandomTokens(300, w.config.vocab, 11);
  const auto expected = ReferenceLogits(w, tokens);
  ASSERT_GT(std::fabs(expected[5]) + std::fabs(expected[1234]), 1e-3f) << "reference is trivial";
  auto backend = CreateCpuBackend(w, {.threads = 2});
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto seq = (*backend)->NewSequence(320);
  ASSERT_TRUE(seq.ok());
  std::vector<float> logits(7, NAN);
  ASSERT_TRUE((*backend)->Forward(**seq, tokens, true, &logits).ok());
  ASSERT_EQ(logits.size(), expected.size());
  size_t where = 0;
  EXPECT_LT(MaxAbsDiff(logits.data(), expected.data(), logits.size(), &where), 2e-4f)
      << "first large difference at flat index " << where << ": " << logits[where] << " vs "
      << expected[where];
  EXPECT_EQ((*seq)->length(), 300);
}

// Prefix in one call, the rest split into a 5-token chunk (GEMM path) and
// single tokens (decode path): every position's logits match the batch run.
TEST_P(CpuBackendTest, IncrementalMatchesBatch) {
  const auto w = testing::TinyModel(8, GetParam().style, GetParam().tied);
  const auto tokens = RandomTokens(37, w.config.vocab, 12);
  const auto expected = ReferenceLogits(w, tokens);
  auto backend = *CreateCpuBackend(w, {.threads = 2});
  auto seq = *backend->NewSequence(40);
  const int V = w.config.vocab;
  std::vector<float> logits;
  ASSERT_TRUE(backend->Forward(*seq, absl::MakeConstSpan(tokens).subspan(0, 29), false, &logits).ok());
  ASSERT_EQ(logits.size(), static_cast<size_t>(V));
  size_t where = 0;
  EXPECT_LT(MaxAbsDiff(logits.data(), &expected[28 * V], V, &where), 2e-4f);
  ASSERT_TRUE(backend->Forward(*seq, absl::MakeConstSpan(tokens).subspan(29, 5), true, &logits).ok());
  EXPECT_LT(MaxAbsDiff(logits.data(), &expected[29 * V], 5 * V, &where), 2e-4f) << where;
  for (int i = 34; i < 37; ++i) {
    ASSERT_TRUE(backend->Forward(*seq, absl::MakeConstSpan(&tokens[i], 1), false, &logits).ok());
    EXPECT_LT(MaxAbsDiff(logits.data(), &expected[i * V], V, &where), 2e-4f) << "position " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Styles, CpuBackendTest,
                         ::testing::Values(Case{RopeStyle::kAdjacentPairs, true},
                                           Case{RopeStyle::kHalves, false}));

TEST(CpuBackend, RejectsBadInputAndLeavesSequenceUnchanged) {
  auto backend = *CreateCpuBackend(testing::TinyModel(9, RopeStyle::kHalves, true), {.threads = 1});
  EXPECT_FALSE(backend->NewSequence(0).ok());
  EXPECT_FALSE(backend->NewSequence(641).ok());
  auto seq = *backend->NewSequence(4);
  std::vector<float> logits;
  EXPECT_EQ(backend->Forward(*seq, {}, false, &logits).code(), absl::StatusCode::kInvalidArgument);
  const std::vector<int32_t> bad = {1, 97};
  auto s = backend->Forward(*seq, bad, false, &logits);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("tokens[1]"), std::string::npos) << s;
  const std::vector<int32_t> five = {1, 2, 3, 4, 5};
  EXPECT_EQ(backend->Forward(*seq, five, false, &logits).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(seq->length(), 0);
}

TEST(CpuReference, LlamaThreeScalingKeepsHighFrequenciesAndSlowsLowOnes) {
  model::ModelConfig c;
  c.head_dim = 128;
  c.rope_theta = 500000.0f;
  const auto plain = ref::RopeInvFreq(c);
  c.rope_scaling = {model::RopeScaling::Type::kLlama3, 8.0f, 1.0f, 4.0f, 8192};
  const auto scaled = ref::RopeInvFreq(c);
  ASSERT_EQ(plain.size(), 64u);
  EXPECT_FLOAT_EQ(scaled[0], plain[0]);          // wavelength 2*pi: untouched
  EXPECT_FLOAT_EQ(scaled[63], plain[63] / 8.0f);  // longest wavelength: divided by factor
  int smoothed = 0;
  for (int i = 0; i < 64; ++i) {
    EXPECT_LE(scaled[i], plain[i]);
    EXPECT_GE(scaled[i], plain[i] / 8.0f * (1 - 1e-6f));
    smoothed += scaled[i] < plain[i] && scaled[i] > plain[i] / 8.0f * (1 + 1e-6f);
  }
  EXPECT_GT(smoothed, 0) << "the band between the two wavelengths is interpolated";
}

// Every float in [-87.33, 88.72] in steps of 2^-12 (about 720k inputs, all
// residues of the range reduction), against exp in double. Measured max
// relative error: see ExpShiftedSum in cpu_reference.h.
TEST(CpuReference, FastExpMatchesStdExp) {
  std::vector<float> x;
  for (double v = -87.33; v <= 88.72; v += 1.0 / 4096) x.push_back(static_cast<float>(v));
  for (float v : {-0.0f, 0.0f, 1e-30f, -1e-30f, FLT_MIN, 0.5f * std::numbers::ln2_v<float>}) x.push_back(v);
  const int n = static_cast<int>(x.size());
  std::vector<float> out(n, NAN);
  ref::ExpShiftedSum(x.data(), n, 0.0f, out.data());
  double max_rel = 0;
  int worst = 0;
  for (int i = 0; i < n; ++i) {
    const double exact = std::exp(static_cast<double>(x[i]));
    const double rel = std::fabs(out[i] - exact) / exact;
    if (!(rel <= max_rel)) {
      max_rel = std::isnan(rel) ? INFINITY : rel;
      worst = i;
    }
  }
  EXPECT_LE(max_rel, 2e-7) << "at x = " << x[worst] << ": " << out[worst] << " vs "
                           << std::exp(static_cast<double>(x[worst]));
  RecordProperty("max_relative_error", std::to_string(max_rel));
  std::printf("fast exp: max relative error %.3g at x = %.9g over %d inputs\n", max_rel, x[worst], n);
  EXPECT_EQ(out[n - 5], 1.0f) << "exp(0)";
}

TEST(CpuReference, FastExpEdgesMatchStdExp) {
  const float inf = std::numeric_limits<float>::infinity();
  // Shifted by 2: exp(x - 2), exercising the shift as the softmax uses it.
  const std::vector<float> x = {-inf, -1e30f, -200.0f, -100.0f, -98.0f, -90.0f, 2.0f, 90.0f, 90.72f, 90.8f, 200.0f, inf};
  std::vector<float> out(x.size(), NAN);
  ref::ExpShiftedSum(x.data(), static_cast<int>(x.size()), 2.0f, out.data());
  for (size_t i = 0; i < x.size(); ++i) {
    const double exact = std::exp(static_cast<double>(x[i] - 2.0f));
    const float exact_f = static_cast<float>(exact);
    if (exact_f == 0 || std::isinf(exact_f)) {
      EXPECT_EQ(out[i], exact_f) << "exp(" << x[i] << " - 2)";
    } else if (exact_f < FLT_MIN) {
      // Denormal result: the scaled polynomial rounded once, so within one
      // denormal step of exact.
      EXPECT_LE(std::fabs(out[i] - exact), std::numeric_limits<float>::denorm_min())
          << "exp(" << x[i] << " - 2)";
      EXPECT_GT(out[i], 0.0f);
    } else {
      EXPECT_NEAR(out[i] / exact, 1.0, 2e-7) << "exp(" << x[i] << " - 2)";
    }
  }
  EXPECT_EQ(out[0], 0.0f) << "-inf gives 0, not NaN";
  EXPECT_TRUE(std::isinf(out.back()));
  const float nan_in = NAN;
  float nan_out = 0;
  ref::ExpShiftedSum(&nan_in, 1, 0.0f, &nan_out);
  EXPECT_TRUE(std::isnan(nan_out));
}

// Lengths around the SIMD widths (1, 7, 8, 15, 16, 17, 33): tails included.
TEST(CpuReference, RowMaxCoversEveryElement) {
  for (int n : {1, 7, 8, 15, 16, 17, 33}) {
    for (int at = 0; at < n; ++at) {
      std::vector<float> x(n, -3.0f);
      x[at] = 5.0f;
      ASSERT_EQ(ref::RowMax(x.data(), n), 5.0f) << "n " << n << ", max at " << at;
      std::vector<float> e(n, NAN);
      const float sum = ref::ExpShiftedSum(x.data(), n, 5.0f, e.data());
      ASSERT_EQ(e[at], 1.0f);
      ASSERT_NEAR(sum, 1.0f + (n - 1) * std::exp(-8.0f), 1e-6f) << "n " << n;
    }
  }
  EXPECT_EQ(ref::RowMax(nullptr, 0), -INFINITY);
}

TEST(CpuReference, RopeStylesRotateDifferentPairs) {
  model::ModelConfig c;
  c.head_dim = 4;
  const auto inv = ref::RopeInvFreq(c);
  float a[4] = {1, 2, 3, 4}, b[4] = {1, 2, 3, 4};
  ref::ApplyRope(a, 4, 1, inv, RopeStyle::kAdjacentPairs);
  ref::ApplyRope(b, 4, 1, inv, RopeStyle::kHalves);
  // Adjacent pairs rotate (x0, x1) by 1 rad; halves rotate (x0, x2).
  EXPECT_NEAR(a[0], std::cos(1.0f) * 1 - std::sin(1.0f) * 2, 1e-6);
  EXPECT_NEAR(b[0], std::cos(1.0f) * 1 - std::sin(1.0f) * 3, 1e-6);
  // Rotation preserves the norm.
  EXPECT_NEAR(a[0] * a[0] + a[1] * a[1], 5.0f, 1e-5);
}

}  // namespace
}  // namespace tailorkv::runtime
