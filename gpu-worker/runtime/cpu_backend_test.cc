#include "runtime/cpu_backend.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <limits>
#include <numbers>
#include <random>

#include "runtime/cpu_reference.h"
#include "runtime/fp8_reference.h"
#include "runtime/sparse_reference.h"
#include "runtime/kv_plan.h"
#include "runtime/quant_kv.h"
#include "runtime/test_model.h"
#include "store/in_process_store.h"

namespace tailorkv::runtime {
namespace {

using model::ModelWeights;
using model::RopeStyle;

// Straightforward forward pass over a whole sequence built only from the
// reference ops (no BLAS, no cache): what the backend must reproduce.
// Per layer: q[head][pos*hd], k and v [kv_head][pos*hd], after RoPE.
using ReferenceTap = std::function<void(int layer, const std::vector<std::vector<float>>& q,
                                        const std::vector<std::vector<float>>& k,
                                        const std::vector<std::vector<float>>& v)>;

std::vector<float> ReferenceLogits(const ModelWeights& w, const std::vector<int32_t>& tokens,
                                   const ReferenceTap& tap = nullptr) {
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
    if (tap) tap(static_cast<int>(&L - w.layers.data()), q, k, v);
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

using testing::RandomTokens;

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

// Taps of a chunked prefill (the second chunk observed) show exactly the
// reference pass's post-RoPE q of the last rows and k/v of every position.
TEST(CpuBackendTaps, ShowEveryLayersQueriesKeysAndValues) {
  const auto w = testing::TinyModel(21, RopeStyle::kHalves, false);
  const auto& c = w.config;
  const int n = 203, first_chunk = 128, tap_q = 32, hd = c.head_dim;
  const auto tokens = RandomTokens(n, c.vocab, 22);
  std::vector<std::vector<std::vector<float>>> rq(c.n_layers), rk(c.n_layers), rv(c.n_layers);
  ReferenceLogits(w, tokens, [&](int l, const auto& q, const auto& k, const auto& v) {
    rq[l] = q;
    rk[l] = k;
    rv[l] = v;
  });
  auto backend = *CreateCpuBackend(w, {.threads = 2});
  auto seq = *backend->NewSequence(240);
  std::vector<float> logits;
  const auto span = absl::MakeConstSpan(tokens);
  ASSERT_TRUE(backend->Forward(*seq, span.subspan(0, first_chunk), false, &logits).ok());
  std::vector<int> seen;
  auto st = backend->ForwardObserved(
      *seq, span.subspan(first_chunk), tap_q, [&](const Backend::LayerTap& t) -> absl::Status {
        seen.push_back(t.layer);
        EXPECT_EQ(t.n_keys, n);
        EXPECT_EQ(t.first_query, n - tap_q);
        EXPECT_EQ(t.n_queries, tap_q);
        float worst = 0;
        for (int i = 0; i < tap_q; ++i) {
          for (int h = 0; h < c.n_heads; ++h) {
            for (int d = 0; d < hd; ++d) {
              const float got = t.q[(static_cast<int64_t>(i) * c.n_heads + h) * hd + d];
              const float want = rq[t.layer][h][(n - tap_q + i) * hd + d];
              worst = std::max(worst, std::fabs(got - want));
            }
          }
        }
        for (int h = 0; h < c.n_kv_heads; ++h) {
          for (int p = 0; p < n; ++p) {
            for (int d = 0; d < hd; ++d) {
              const int64_t at = h * t.kv_head_stride + static_cast<int64_t>(p) * hd + d;
              worst = std::max(worst, std::fabs(t.k[at] - rk[t.layer][h][p * hd + d]));
              worst = std::max(worst, std::fabs(t.v[at] - rv[t.layer][h][p * hd + d]));
            }
          }
        }
        EXPECT_LT(worst, 2e-4f) << "layer " << t.layer;
        EXPECT_FALSE(std::isnan(worst));
        return absl::OkStatus();
      });
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_EQ(seen, (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(seq->length(), n);
}

TEST(CpuBackendTaps, ObserverErrorStopsAndBadInputIsRefused) {
  const auto w = testing::TinyModel(23, RopeStyle::kAdjacentPairs, true);
  auto backend = *CreateCpuBackend(w, {.threads = 1});
  const auto tokens = RandomTokens(40, w.config.vocab, 24);
  auto seq = *backend->NewSequence(64);
  int calls = 0;
  auto st = backend->ForwardObserved(*seq, tokens, 8, [&](const Backend::LayerTap& t) {
    ++calls;
    return t.layer == 1 ? absl::CancelledError("stop here") : absl::OkStatus();
  });
  EXPECT_EQ(st.code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(calls, 2);
  auto ok = [](const Backend::LayerTap&) { return absl::OkStatus(); };
  auto fresh = *backend->NewSequence(64);
  EXPECT_EQ(backend->ForwardObserved(*fresh, tokens, 0, ok).code(),
            absl::StatusCode::kInvalidArgument);
  st = backend->ForwardObserved(*fresh, tokens, 41, ok);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("tap_queries"), std::string_view::npos) << st;
  auto quant = *backend->NewSequence(
      64, *ParseKvPlanSpec("window:2:8", w.config));
  st = backend->ForwardObserved(*quant, tokens, 8, ok);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("layers[0]"), std::string_view::npos) << st;
  EXPECT_TRUE(backend->ForwardObserved(*fresh, tokens, 40, ok).ok());
}

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

// ---------------------------------------------------------------------------
// KV policies (quant, window) on the CPU backend.

// head_dim 32 so quant groups of 32 fit; GQA 6/2, 3 layers.
model::ModelWeights PolicyModel(uint32_t seed, int n_layers = 3) {
  return testing::TinyModel(seed, RopeStyle::kHalves, false,
                            {.n_layers = n_layers, .head_dim = 32, .hidden = 64, .ffn = 96});
}

LayerKvPolicy Quant(int bits, int group, int residual) {
  LayerKvPolicy p;
  p.kind = KvPolicyKind::kQuant;
  p.quant = {bits, group, residual};
  return p;
}

LayerKvPolicy Window(int sink, int recent) {
  LayerKvPolicy p;
  p.kind = KvPolicyKind::kWindow;
  p.window = {sink, recent};
  return p;
}

// Runs `tokens` through a fresh sequence in calls of the given sizes (all
// logits), returning each call's logits.
std::vector<std::vector<float>> RunChunks(Backend& backend, const KvPlan& plan,
                                          const std::vector<int32_t>& tokens,
                                          const std::vector<int>& chunks,
                                          std::unique_ptr<SequenceState>* keep = nullptr) {
  auto seq = backend.NewSequence(static_cast<int>(tokens.size()) + 3, plan);
  EXPECT_TRUE(seq.ok()) << seq.status();
  if (!seq.ok()) return {};
  std::vector<std::vector<float>> out;
  int at = 0;
  for (int n : chunks) {
    std::vector<float> logits(3, NAN);
    const auto st = backend.Forward(**seq, absl::MakeConstSpan(tokens).subspan(at, n), true, &logits);
    EXPECT_TRUE(st.ok()) << st;
    EXPECT_EQ(logits.size(), static_cast<size_t>(n) * backend.config().vocab);
    out.push_back(std::move(logits));
    at += n;
  }
  EXPECT_EQ(at, static_cast<int>(tokens.size()));
  EXPECT_EQ((*seq)->length(), at);
  if (keep != nullptr) *keep = std::move(*seq);
  return out;
}

float MaxDiff(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  float m = 0;
  EXPECT_EQ(a.size(), b.size());
  for (size_t c = 0; c < std::min(a.size(), b.size()); ++c) {
    size_t where = 0;
    EXPECT_EQ(a[c].size(), b[c].size());
    m = std::max(m, MaxAbsDiff(a[c].data(), b[c].data(), std::min(a[c].size(), b[c].size()), &where));
  }
  return m;
}

void ExpectBitIdentical(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b,
                        const char* what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t c = 0; c < a.size(); ++c) {
    ASSERT_EQ(a[c].size(), b[c].size()) << what << " call " << c;
    for (size_t i = 0; i < a[c].size(); ++i) {
      ASSERT_EQ(std::memcmp(&a[c][i], &b[c][i], sizeof(float)), 0)
          << what << ": call " << c << " index " << i << ": " << a[c][i] << " vs " << b[c][i];
    }
  }
}

// Calls covering every path: a 1-token first call (a prefill chunk for a
// non-dense layer), a GEMM chunk, a GEMV-sized chunk (3), a 5-token chunk,
// then decode steps.
const std::vector<int> kMixedChunks = {1, 149, 3, 5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
constexpr int kMixedTotal = 176;

TEST(CpuBackendKvPolicy, QuantWithResidualCoveringTheSequenceMatchesDenseExactly) {
  const auto w = PolicyModel(21);
  auto backend = *CreateCpuBackend(w, {.threads = 2});
  const auto tokens = RandomTokens(kMixedTotal, w.config.vocab, 22);
  ASSERT_EQ(std::accumulate(kMixedChunks.begin(), kMixedChunks.end(), 0), kMixedTotal);
  const auto dense = RunChunks(*backend, KvPlan::Dense(3), tokens, kMixedChunks);
  // residual 256 > 176: nothing is ever quantized.
  const auto quant = RunChunks(*backend, KvPlan::Uniform(3, Quant(1, 32, 256), "q"), tokens, kMixedChunks);
  ASSERT_GT(std::fabs(dense[1][100]), 1e-4f) << "logits are trivial";
  ExpectBitIdentical(dense, quant, "quant r256 vs dense");
}

TEST(CpuBackendKvPolicy, WindowHoldingEverythingMatchesDenseExactly) {
  const auto w = PolicyModel(23);
  auto backend = *CreateCpuBackend(w, {.threads = 2});
  const auto tokens = RandomTokens(kMixedTotal, w.config.vocab, 24);
  const auto dense = RunChunks(*backend, KvPlan::Dense(3), tokens, kMixedChunks);
  // sink + recent == the length exactly, and one larger than the capacity.
  ExpectBitIdentical(dense,
                     RunChunks(*backend, KvPlan::Uniform(3, Window(4, kMixedTotal - 4), "w"), tokens, kMixedChunks),
                     "window 4+172 vs dense");
  ExpectBitIdentical(dense, RunChunks(*backend, KvPlan::Uniform(3, Window(0, 1020), "w"), tokens, kMixedChunks),
                     "window 0+1020 vs dense");
}

// One-shot prefill of 160 tokens (full precision), then 40 decode steps over
// a cache with residual 32: 4-bit stays close to dense, 1-bit does not.
// Measured over the 40 steps x 97 logits (max |logit| 4.7; errors compound
// through 3 random layers): mean |diff| 1-bit 1.04, 2-bit 0.43, 4-bit 0.081;
// max 6.3 / 2.6 / 0.50; argmax agrees with dense 3 / 16 / 39 of 40 steps.
// Required: 4-bit mean < 0.15, max < 1, argmax >= 36/40; 1-bit mean > 0.5;
// both measures strictly ordered by bits.
TEST(CpuBackendKvPolicy, FourBitStaysCloseToDenseAndOneBitDiffers) {
  const auto w = PolicyModel(25);
  auto backend = *CreateCpuBackend(w, {.threads = 2});
  const auto tokens = RandomTokens(200, w.config.vocab, 26);
  std::vector<int> chunks = {160};
  chunks.resize(41, 1);
  const auto dense = RunChunks(*backend, KvPlan::Dense(3), tokens, chunks);
  float diff[5] = {}, mean[5] = {};
  int agree[5] = {};
  for (int bits : {1, 2, 4}) {
    const auto q = RunChunks(*backend, KvPlan::Uniform(3, Quant(bits, 32, 32), "q"), tokens, chunks);
    // The one-shot prefill attended in full precision: identical to dense.
    ExpectBitIdentical({dense[0]}, {q[0]}, "one-shot prefill");
    diff[bits] = MaxDiff({dense.begin() + 1, dense.end()}, {q.begin() + 1, q.end()});
    double sum = 0;
    for (size_t st = 1; st < q.size(); ++st) {
      for (size_t i = 0; i < q[st].size(); ++i) sum += std::fabs(q[st][i] - dense[st][i]);
      agree[bits] += std::max_element(q[st].begin(), q[st].end()) - q[st].begin() ==
               std::max_element(dense[st].begin(), dense[st].end()) - dense[st].begin();
    }
    mean[bits] = static_cast<float>(sum / (40.0 * w.config.vocab));
    std::printf("bits %d: mean |diff| %.4g, argmax agrees %d/40\n", bits, mean[bits], agree[bits]);
  }
  float max_logit = 0;
  for (const auto& c : dense) for (float x : c) max_logit = std::max(max_logit, std::fabs(x));
  std::printf("decode max |logit - dense|: 1-bit %.4g, 2-bit %.4g, 4-bit %.4g (max |logit| %.3g)\n", diff[1],
              diff[2], diff[4], max_logit);
  EXPECT_LT(mean[4], 0.15f);
  EXPECT_LT(diff[4], 1.0f);
  EXPECT_GE(agree[4], 36);
  EXPECT_GT(mean[1], 0.5f);
  EXPECT_LT(diff[4], diff[2]);
  EXPECT_LT(diff[2], diff[1]);
  EXPECT_LT(mean[4], mean[2]);
  EXPECT_LT(mean[2], mean[1]);
}

// One layer: logits of the last token from the reference ops, with the
// attention of that token supplied by `attend` (q: [n_heads][head_dim] after
// RoPE; k, v: every position's full-precision K/V, [kv_head][n][head_dim]).
using AttendFn = std::function<void(const std::vector<float>& q, const std::vector<float>& k,
                                    const std::vector<float>& v, float* out)>;
std::vector<float> OneLayerLastLogits(const ModelWeights& w, const std::vector<int32_t>& tokens,
                                      const AttendFn& attend) {
  const auto& c = w.config;
  const auto& L = w.layers[0];
  const int n = static_cast<int>(tokens.size()), H = c.hidden, hd = c.head_dim;
  const auto inv_freq = ref::RopeInvFreq(c);
  auto matvec = [](const model::Tensor& W, const float* x, float* y) {
    for (int64_t o = 0; o < W.rows(); ++o) {
      double acc = 0;
      for (int64_t i = 0; i < W.cols(); ++i) acc += static_cast<double>(W.data[o * W.cols() + i]) * x[i];
      y[o] = static_cast<float>(acc);
    }
  };
  std::vector<float> k(static_cast<size_t>(c.n_kv_heads) * n * hd), v(k.size()), q(c.n_heads * hd);
  std::vector<float> x(H), xn(H), tk(c.n_kv_heads * hd), tv(tk.size());
  for (int i = 0; i < n; ++i) {
    std::copy_n(&w.tok_embd.data[tokens[i] * H], H, x.data());
    ref::RmsNorm(x.data(), L.attn_norm.data.data(), H, c.rms_eps, xn.data());
    matvec(L.wk, xn.data(), tk.data());
    matvec(L.wv, xn.data(), tv.data());
    for (int h = 0; h < c.n_kv_heads; ++h) {
      ref::ApplyRope(&tk[h * hd], hd, i, inv_freq, c.rope_style);
      std::copy_n(&tk[h * hd], hd, &k[(static_cast<size_t>(h) * n + i) * hd]);
      std::copy_n(&tv[h * hd], hd, &v[(static_cast<size_t>(h) * n + i) * hd]);
    }
    if (i == n - 1) {
      matvec(L.wq, xn.data(), q.data());
      for (int h = 0; h < c.n_heads; ++h) ref::ApplyRope(&q[h * hd], hd, i, inv_freq, c.rope_style);
    }
  }
  std::vector<float> attn(c.n_heads * hd, NAN), o(H), gate(c.ffn), up(c.ffn), logits(c.vocab);
  attend(q, k, v, attn.data());
  matvec(L.wo, attn.data(), o.data());
  for (int j = 0; j < H; ++j) x[j] += o[j];
  ref::RmsNorm(x.data(), L.ffn_norm.data.data(), H, c.rms_eps, xn.data());
  matvec(L.w_gate, xn.data(), gate.data());
  matvec(L.w_up, xn.data(), up.data());
  ref::SwiGlu(gate.data(), up.data(), c.ffn);
  matvec(L.w_down, gate.data(), o.data());
  for (int j = 0; j < H; ++j) x[j] += o[j];
  ref::RmsNorm(x.data(), w.output_norm.data.data(), H, c.rms_eps, xn.data());
  matvec(w.head(), xn.data(), logits.data());
  return logits;
}

// Softmax attention of one query head over the listed positions, in double.
void AttendPositions(const float* q, const float* k, const float* v, int hd, const std::vector<int>& pos,
                     float* out) {
  std::vector<double> s(pos.size()), o(hd, 0.0);
  double mx = -INFINITY, sum = 0;
  for (size_t j = 0; j < pos.size(); ++j) {
    double dot = 0;
    for (int c = 0; c < hd; ++c) dot += static_cast<double>(q[c]) * k[pos[j] * hd + c];
    s[j] = dot / std::sqrt(static_cast<double>(hd));
    mx = std::max(mx, s[j]);
  }
  for (size_t j = 0; j < pos.size(); ++j) {
    const double e = std::exp(s[j] - mx);
    sum += e;
    for (int c = 0; c < hd; ++c) o[c] += e * v[pos[j] * hd + c];
  }
  for (int c = 0; c < hd; ++c) out[c] = static_cast<float>(o[c] / sum);
}

// Decode of a quant layer (K blocks and V rows already quantized) equals the
// reference forward whose attention is dequantize-then-attend (double) on
// the backend's own store, so codes cannot differ.
TEST(CpuBackendKvPolicy, QuantDecodeMatchesDequantizeThenAttendOnItsStore) {
  const auto w = PolicyModel(27, /*n_layers=*/1);
  const auto& c = w.config;
  auto backend = *CreateCpuBackend(w, {.threads = 2});
  const auto tokens = RandomTokens(101, c.vocab, 28);
  std::unique_ptr<SequenceState> seq;
  std::vector<int> chunks = {97, 1, 1, 1, 1};
  const auto got = RunChunks(*backend, KvPlan::Uniform(1, Quant(1, 32, 32), "q1"), tokens, chunks, &seq);
  const QuantKvCpu* store = CpuQuantStore(*seq, 0);
  ASSERT_NE(store, nullptr);
  ASSERT_EQ(store->length(), 101);
  ASSERT_EQ(QuantizedKeys(101, 32), 96);
  const auto expected = OneLayerLastLogits(w, tokens, [&](const auto& q, const auto&, const auto&, float* out) {
    DequantizeThenAttend(*store, q.data(), c.n_heads, 101, 1.0f / std::sqrt(32.0f), out);
  });
  size_t where = 0;
  const float d = MaxAbsDiff(got.back().data(), expected.data(), c.vocab, &where);
  EXPECT_LT(d, 1e-4f) << "at " << where << ": " << got.back()[where] << " vs " << expected[where];
  // And it is not dense attention.
  const auto full = OneLayerLastLogits(w, tokens, [&](const auto& q, const auto& k, const auto& v, float* out) {
    std::vector<int> all(101);
    for (int i = 0; i < 101; ++i) all[i] = i;
    for (int h = 0; h < c.n_heads; ++h) {
      const size_t kv = static_cast<size_t>(h / 3) * 101 * 32;
      AttendPositions(&q[h * 32], &k[kv], &v[kv], 32, all, out + h * 32);
    }
  });
  EXPECT_GT(MaxAbsDiff(got.back().data(), full.data(), c.vocab, &where), 100 * d);
  EXPECT_EQ(CpuQuantStore(*seq, 1), nullptr);
}

// Decode of a window layer past sink + recent attends over the sink and the
// last `recent` positions only.
TEST(CpuBackendKvPolicy, WindowDecodeAttendsToSinkAndRecentOnly) {
  const auto w = PolicyModel(29, /*n_layers=*/1);
  const auto& c = w.config;
  auto backend = *CreateCpuBackend(w, {.threads = 2});
  for (int len : {21, 22, 60}) {  // S+W = 20: one past, two past, many past (ring wrapped)
    const auto tokens = RandomTokens(len, c.vocab, 30);
    std::vector<int> chunks = {10};
    chunks.resize(len - 9, 1);
    const auto got = RunChunks(*backend, KvPlan::Uniform(1, Window(4, 16), "w"), tokens, chunks);
    std::vector<int> kept = {0, 1, 2, 3};
    for (int p = len - 16; p < len; ++p) kept.push_back(p);
    const auto expected = OneLayerLastLogits(w, tokens, [&](const auto& q, const auto& k, const auto& v, float* out) {
      for (int h = 0; h < c.n_heads; ++h) {
        const size_t kv = static_cast<size_t>(h / 3) * len * 32;
        AttendPositions(&q[h * 32], &k[kv], &v[kv], 32, kept, out + h * 32);
      }
    });
    size_t where = 0;
    EXPECT_LT(MaxAbsDiff(got.back().data(), expected.data(), c.vocab, &where), 1e-4f) << "len " << len;
  }
}

// Chunked prefill: the first chunk is exact (nothing stored yet); later
// chunks see the history as stored, so with 1-bit codes (residual 32) or a
// short window they differ from the one-shot prefill, which equals dense.
// When the history fits the residual / window, chunked equals dense chunked.
TEST(CpuBackendKvPolicy, ChunkedPrefillSeesTheStoredHistory) {
  const auto w = PolicyModel(31);
  auto backend = *CreateCpuBackend(w, {.threads = 2});
  const auto tokens = RandomTokens(200, w.config.vocab, 32);
  const int V = w.config.vocab;
  const auto dense_one = RunChunks(*backend, KvPlan::Dense(3), tokens, {200});
  const auto dense_two = RunChunks(*backend, KvPlan::Dense(3), tokens, {100, 100});
  for (const LayerKvPolicy& p : {Quant(1, 32, 32), Window(4, 28)}) {
    const KvPlan plan = KvPlan::Uniform(3, p, "p");
    ExpectBitIdentical(dense_one, RunChunks(*backend, plan, tokens, {200}), "one-shot == dense");
    const auto two = RunChunks(*backend, plan, tokens, {100, 100});
    ExpectBitIdentical({dense_two[0]}, {two[0]}, "first chunk == dense");
    size_t where = 0;
    const float d = MaxAbsDiff(two[1].data(), dense_two[1].data(), 100 * V, &where);
    std::printf("%s: second chunk max |logit - dense| %.4g\n", plan.Summary().c_str(), d);
    EXPECT_GT(d, 0.01f) << plan.Summary();
  }
  // History within the residual (256) / window (4 + 252): chunked == dense chunked.
  ExpectBitIdentical(dense_two, RunChunks(*backend, KvPlan::Uniform(3, Quant(1, 32, 256), "q"), tokens, {100, 100}),
                     "quant r256 chunked");
  ExpectBitIdentical(dense_two, RunChunks(*backend, KvPlan::Uniform(3, Window(4, 252), "w"), tokens, {100, 100}),
                     "window chunked");
}

TEST(CpuBackendKvPolicy, KvBytesFollowTheFormulas) {
  const auto w = PolicyModel(33, /*n_layers=*/4);
  const auto& c = w.config;
  auto backend = *CreateCpuBackend(w, {.threads = 1});
  KvPlan plan = KvPlan::Dense(4);
  plan.name = "mixed";
  plan.layers[0] = Quant(2, 32, 64);
  plan.layers[1] = Window(4, 20);
  plan.layers[3] = Window(8, 1020);  // more than the capacity: capped
  const int cap = 100;
  auto seq = *backend->NewSequence(cap, plan);
  const auto b = seq->kv_bytes();
  ASSERT_EQ(b.size(), 4u);
  const int64_t nkv = c.n_kv_heads, hd = c.head_dim;
  // quant: key groups ceil(100/32) = 4, W = 2 words; V 2 words x 1 group per token.
  const int64_t quant = nkv * ((4 * hd * 2 + cap * 1 * 2) * 4 + (4 * hd + cap * 1) * 4 + 2 * 64 * hd * 4);
  EXPECT_EQ(b[0].kind, KvPolicyKind::kQuant);
  EXPECT_EQ(b[0].device_bytes, quant);
  EXPECT_EQ(b[1].device_bytes, 2 * nkv * 24 * hd * 4);
  EXPECT_EQ(b[2].device_bytes, 2 * nkv * cap * hd * 4);
  EXPECT_EQ(b[3].device_bytes, 2 * nkv * cap * hd * 4);
  const auto est = EstimateKvBytes(plan, c, cap, 4);
  for (int l = 0; l < 4; ++l) {
    EXPECT_EQ(b[l].kind, est[l].kind) << l;
    EXPECT_EQ(b[l].device_bytes, est[l].device_bytes) << l;
    EXPECT_EQ(b[l].host_bytes, 0) << l;
  }
}

TEST(CpuBackendKvPolicy, AcceptsBothSparseIndexesAndKeepsNonDenseSequencesOnTruncate) {
  const auto w = PolicyModel(35);
  auto backend = *CreateCpuBackend(w, {.threads = 1});
  KvPlan sparse = KvPlan::Dense(3);
  sparse.layers[1].kind = KvPolicyKind::kSparse;  // index "gpu" by default
  EXPECT_TRUE(backend->NewSequence(50, sparse).ok());
  sparse.layers[1].sparse.index = "faithful";
  EXPECT_TRUE(backend->NewSequence(50, sparse).ok());
  KvPlan bad = KvPlan::Uniform(3, Quant(3, 32, 64), "bad");
  EXPECT_EQ(backend->NewSequence(50, bad).status().code(), absl::StatusCode::kInvalidArgument);

  auto seq = *backend->NewSequence(50, KvPlan::Uniform(3, Quant(1, 32, 32), "q"));
  std::vector<float> logits;
  ASSERT_TRUE(backend->Forward(*seq, RandomTokens(40, w.config.vocab, 36), false, &logits).ok());
  seq->Truncate(10);
  EXPECT_EQ(seq->length(), 40) << "quant layers cannot forget";
  auto dense = *backend->NewSequence(50);
  ASSERT_TRUE(backend->Forward(*dense, RandomTokens(40, w.config.vocab, 36), false, &logits).ok());
  dense->Truncate(10);
  EXPECT_EQ(dense->length(), 10);
  // Capacity overflow leaves the quant sequence unchanged.
  EXPECT_EQ(backend->Forward(*seq, RandomTokens(11, w.config.vocab, 37), false, &logits).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(seq->length(), 40);
  EXPECT_EQ(CpuQuantStore(*seq, 0)->length(), 40);
}

// ---------------------------------------------------------------------------
// Sparse (TailorKV) layers on the CPU backend.

LayerKvPolicy Sparse(int sink, int recent, int top_k, int channels) {
  LayerKvPolicy p;
  p.kind = KvPolicyKind::kSparse;
  p.sparse = {sink, recent, top_k, channels, "faithful"};
  return p;
}

// Prefill chunks (1, 149, 3, 5), decode steps, then chunks of 4 and 2 after
// decoding (appended to the generated rows) and more steps.
const std::vector<int> kSparseChunks = {1, 149, 3, 5, 1, 1, 1, 4, 1, 1, 2, 1, 1, 1, 1, 1};
constexpr int kSparseTotal = 174;

// Top-K covering every candidate (or sink + recent covering the prompt)
// gathers every position in order: bit-identical to dense, chunked prefill
// and prefill after decode included (not merely within fp32 reassociation).
TEST(CpuBackendSparse, TopKCoveringThePromptMatchesDenseExactly) {
  const auto w = PolicyModel(41);
  auto backend = *CreateCpuBackend(w, {.threads = 2});
  const auto tokens = RandomTokens(kSparseTotal, w.config.vocab, 42);
  ASSERT_EQ(std::accumulate(kSparseChunks.begin(), kSparseChunks.end(), 0), kSparseTotal);
  const auto dense = RunChunks(*backend, KvPlan::Dense(3), tokens, kSparseChunks);
  ASSERT_GT(std::fabs(dense[1][100]), 1e-4f) << "logits are trivial";
  // Prompt 158 tokens: 4 + 8 kept, 146 candidates.
  ExpectBitIdentical(dense, RunChunks(*backend, KvPlan::Uniform(3, Sparse(4, 8, 146, 3), "s"), tokens, kSparseChunks),
                     "sparse k146 (== candidates) vs dense");
  ExpectBitIdentical(dense, RunChunks(*backend, KvPlan::Uniform(3, Sparse(0, 1, 1000, 1), "s"), tokens, kSparseChunks),
                     "sparse k1000 vs dense");
  ExpectBitIdentical(dense, RunChunks(*backend, KvPlan::Uniform(3, Sparse(8, 150, 1, 2), "s"), tokens, kSparseChunks),
                     "sparse 8+150 (no candidates) vs dense");
  LayerKvPolicy gpu = Sparse(4, 8, 146, 3);
  gpu.sparse.index = "gpu";
  ExpectBitIdentical(dense, RunChunks(*backend, KvPlan::Uniform(3, gpu, "s"), tokens, kSparseChunks),
                     "sparse k146 index gpu vs dense");
  // One candidate short of covering: the decode steps differ.
  const auto short_k = RunChunks(*backend, KvPlan::Uniform(3, Sparse(4, 8, 145, 3), "s"), tokens, kSparseChunks);
  ExpectBitIdentical({dense.begin(), dense.begin() + 4}, {short_k.begin(), short_k.begin() + 4}, "prefill");
  EXPECT_GT(MaxDiff({dense.begin() + 4, dense.end()}, {short_k.begin() + 4, short_k.end()}), 0.0f);
}

// An FP8 host tier with Top-K covering the prompt: a one-chunk prefill is
// still exact (the chunk attends before it is rounded), later chunks and
// decode steps read E4M3-rounded K/V (3 mantissa bits: a few percent of a
// logit), and the host tier counts one byte a value.
TEST(CpuBackendSparse, Fp8HostTierRoundsWhatItKeeps) {
  const auto w = PolicyModel(53);
  auto backend = *CreateCpuBackend(w, {.threads = 2});
  const auto tokens = RandomTokens(kSparseTotal, w.config.vocab, 54);
  const auto dense = RunChunks(*backend, KvPlan::Dense(3), tokens, kSparseChunks);
  LayerKvPolicy p = Sparse(4, 8, 146, 3);
  p.sparse.host_bits = 8;
  std::unique_ptr<SequenceState> seq;
  const auto fp8 = RunChunks(*backend, KvPlan::Uniform(3, p, "s8"), tokens, kSparseChunks, &seq);
  ExpectBitIdentical({dense[0]}, {fp8[0]}, "first chunk");
  float ref = 0;
  for (const auto& l : dense) for (float x : l) ref = std::max(ref, std::fabs(x));
  const float d = MaxDiff(dense, fp8);
  std::printf("fp8 host tier, Top-K covering: max |logit - dense| %.4g of max %.4g\n", d, ref);
  EXPECT_GT(d, 0.0f) << "later chunks read rounded history";
  EXPECT_LT(d, 0.1f * ref);
  const auto b = seq->kv_bytes();
  EXPECT_EQ(b[0].host_bytes, 2LL * w.config.n_kv_heads * seq->capacity() * w.config.head_dim);
}

// A small Top-K: the one-shot prefill still equals dense, decode steps stay
// finite and depart from dense.
TEST(CpuBackendSparse, SmallTopKDiffersButStaysFinite) {
  const auto w = PolicyModel(43);
  auto backend = *CreateCpuBackend(w, {.threads = 2});
  const auto tokens = RandomTokens(200, w.config.vocab, 44);
  std::vector<int> chunks = {160};
  chunks.resize(41, 1);
  const auto dense = RunChunks(*backend, KvPlan::Dense(3), tokens, chunks);
  const auto sparse = RunChunks(*backend, KvPlan::Uniform(3, Sparse(2, 4, 6, 4), "s"), tokens, chunks);
  ExpectBitIdentical({dense[0]}, {sparse[0]}, "one-shot prefill");
  for (size_t st = 1; st < sparse.size(); ++st) {
    for (float x : sparse[st]) ASSERT_TRUE(std::isfinite(x)) << "step " << st;
  }
  const float d = MaxDiff({dense.begin() + 1, dense.end()}, {sparse.begin() + 1, sparse.end()});
  std::printf("sparse 2+4 k6 d4, 40 steps: max |logit - dense| %.4g\n", d);
  EXPECT_GT(d, 1e-3f);
}

// TailorKV's selection, written independently in double: per KV head the
// group-mean query, max|K| over the prompt, the top channels, the Top-K by
// the partial dot product; attention over sink + Top-K + recent + every
// generated token.
std::vector<std::vector<int>> IndependentSelection(const std::vector<float>& q, const std::vector<float>& k,
                                                   int n_heads, int n_kv, int hd, int len, int prompt,
                                                   const SparseParams& sp) {
  const int group = n_heads / n_kv;
  const int sink = std::min(sp.sink, prompt), recent = std::min(sp.recent, prompt - sink);
  std::vector<std::vector<int>> out(n_kv);
  for (int g = 0; g < n_kv; ++g) {
    std::vector<double> qm(hd, 0.0), mx(hd, 0.0);
    for (int h = g * group; h < (g + 1) * group; ++h) {
      for (int d = 0; d < hd; ++d) qm[d] += q[h * hd + d] / static_cast<double>(group);
    }
    const float* kg = &k[static_cast<size_t>(g) * len * hd];
    for (int p = 0; p < prompt; ++p) {
      for (int d = 0; d < hd; ++d) mx[d] = std::max(mx[d], std::fabs(static_cast<double>(kg[p * hd + d])));
    }
    std::vector<int> ch(hd);
    std::iota(ch.begin(), ch.end(), 0);
    std::stable_sort(ch.begin(), ch.end(),
                     [&](int a, int b) { return std::fabs(qm[a]) * mx[a] > std::fabs(qm[b]) * mx[b]; });
    ch.resize(sp.channels);
    std::vector<std::pair<double, int>> cand;
    for (int p = sink; p < prompt - recent; ++p) {
      double s = 0;
      for (int d : ch) s += qm[d] * kg[p * hd + d];
      cand.push_back({-s, p});
    }
    std::sort(cand.begin(), cand.end());
    cand.resize(std::min<size_t>(cand.size(), sp.top_k));
    for (const auto& [s, p] : cand) out[g].push_back(p);
    std::sort(out[g].begin(), out[g].end());
  }
  return out;
}

TEST(CpuBackendSparse, DecodeMatchesIndependentSelectionAndAttendsEveryGeneratedToken) {
  const auto w = PolicyModel(45, /*n_layers=*/1);
  const auto& c = w.config;
  auto backend = *CreateCpuBackend(w, {.threads = 2});
  const SparseParams sp{3, 7, 11, 5, "faithful"};
  for (int generated : {1, 2, 25}) {
    const int prompt = 100, len = prompt + generated;
    const auto tokens = RandomTokens(len, c.vocab, 46);
    std::vector<int> chunks = {prompt};
    chunks.resize(1 + generated, 1);
    std::unique_ptr<SequenceState> seq;
    LayerKvPolicy l;
    l.kind = KvPolicyKind::kSparse;
    l.sparse = sp;
    const auto got = RunChunks(*backend, KvPlan::Uniform(1, l, "s"), tokens, chunks, &seq);
    std::vector<std::vector<int>> expected_sel;
    const auto expected = OneLayerLastLogits(w, tokens, [&](const auto& q, const auto& k, const auto& v, float* out) {
      expected_sel = IndependentSelection(q, k, c.n_heads, c.n_kv_heads, 32, len, prompt, sp);
      for (int h = 0; h < c.n_heads; ++h) {
        const int g = h / 3;
        std::vector<int> pos = {0, 1, 2};
        pos.insert(pos.end(), expected_sel[g].begin(), expected_sel[g].end());
        for (int p = prompt - 7; p < len; ++p) pos.push_back(p);  // recent + every generated token
        const size_t kv = static_cast<size_t>(g) * len * 32;
        AttendPositions(&q[h * 32], &k[kv], &v[kv], 32, pos, out + h * 32);
      }
    });
    const auto sel = CpuSparseLastSelection(*seq, 0);
    ASSERT_EQ(sel.size(), 2u);
    for (int g = 0; g < 2; ++g) {
      EXPECT_EQ(sel[g], expected_sel[g]) << "kv head " << g << ", generated " << generated;
      ASSERT_EQ(sel[g].size(), 11u);
      EXPECT_GE(sel[g].front(), 3);
      EXPECT_LT(sel[g].back(), prompt - 7);
    }
    EXPECT_NE(sel[0], sel[1]) << "heads select on their own";
    size_t where = 0;
    const float d = MaxAbsDiff(got.back().data(), expected.data(), c.vocab, &where);
    EXPECT_LT(d, 1e-4f) << "generated " << generated << " at " << where << ": " << got.back()[where] << " vs "
                        << expected[where];
    // Dropping the generated tokens (or the selection) changes the answer.
    const auto without_generated =
        OneLayerLastLogits(w, tokens, [&](const auto& q, const auto& k, const auto& v, float* out) {
          for (int h = 0; h < c.n_heads; ++h) {
            const int g = h / 3;
            std::vector<int> pos = {0, 1, 2};
            pos.insert(pos.end(), expected_sel[g].begin(), expected_sel[g].end());
            for (int p = prompt - 7; p < prompt; ++p) pos.push_back(p);
            pos.push_back(len - 1);  // the token itself always attends to itself
            const size_t kv = static_cast<size_t>(g) * len * 32;
            AttendPositions(&q[h * 32], &k[kv], &v[kv], 32, pos, out + h * 32);
          }
        });
    if (generated > 1) {
      EXPECT_GT(MaxAbsDiff(got.back().data(), without_generated.data(), c.vocab, &where), 100 * d);
    }
  }
}

// Index "gpu" with every channel: the fixed channel set is all of them and
// the speculative query of a one-layer model is its own query (layer 0
// speculates from its own input), so the selection is the exact Top-K of
// q_mean . k, which the independent faithful selection with all channels
// also is. The channels it fixes with fewer channels come from the last
// prompt token's query (checked through CpuSparseChannels).
TEST(CpuBackendSparse, GpuIndexSelectsWithTheSpeculativeQueryOnFixedChannels) {
  const auto w = PolicyModel(51, /*n_layers=*/1);
  const auto& c = w.config;
  auto backend = *CreateCpuBackend(w, {.threads = 2});
  const int prompt = 90, generated = 3, len = prompt + generated;
  const auto tokens = RandomTokens(len, c.vocab, 52);
  std::vector<int> chunks = {40, 50};
  chunks.resize(2 + generated, 1);
  LayerKvPolicy l;
  l.kind = KvPolicyKind::kSparse;
  l.sparse = {2, 5, 9, 32, "gpu"};
  std::unique_ptr<SequenceState> seq;
  const auto got = RunChunks(*backend, KvPlan::Uniform(1, l, "s"), tokens, chunks, &seq);
  SparseParams all = l.sparse;
  std::vector<std::vector<int>> expected_sel;
  const auto expected = OneLayerLastLogits(w, tokens, [&](const auto& q, const auto& k, const auto& v, float* out) {
    expected_sel = IndependentSelection(q, k, c.n_heads, c.n_kv_heads, 32, len, prompt, all);
    for (int h = 0; h < c.n_heads; ++h) {
      const int g = h / 3;
      std::vector<int> pos = {0, 1};
      pos.insert(pos.end(), expected_sel[g].begin(), expected_sel[g].end());
      for (int p = prompt - 5; p < len; ++p) pos.push_back(p);
      const size_t kv = static_cast<size_t>(g) * len * 32;
      AttendPositions(&q[h * 32], &k[kv], &v[kv], 32, pos, out + h * 32);
    }
  });
  const auto sel = CpuSparseLastSelection(*seq, 0);
  ASSERT_EQ(sel.size(), 2u);
  for (int g = 0; g < 2; ++g) {
    EXPECT_EQ(sel[g], expected_sel[g]) << "kv head " << g;
    EXPECT_EQ(sel[g].size(), 9u);
  }
  size_t where = 0;
  EXPECT_LT(MaxAbsDiff(got.back().data(), expected.data(), c.vocab, &where), 1e-4f) << where;

  // Five channels: fixed when the prompt ends, from the last prompt token's
  // group-mean query and max|K| over the prompt.
  l.sparse.channels = 5;
  std::unique_ptr<SequenceState> seq5;
  RunChunks(*backend, KvPlan::Uniform(1, l, "s"), tokens, chunks, &seq5);
  const std::vector<int32_t> prompt_tokens(tokens.begin(), tokens.begin() + prompt);
  std::vector<std::vector<int>> expected_chans(2);
  OneLayerLastLogits(w, prompt_tokens, [&](const auto& q, const auto& k, const auto&, float*) {
    for (int g = 0; g < 2; ++g) {
      std::vector<double> score(32);
      for (int d = 0; d < 32; ++d) {
        double qm = 0, mx = 0;
        for (int h = g * 3; h < g * 3 + 3; ++h) qm += q[h * 32 + d] / 3.0;
        for (int p = 0; p < prompt; ++p) mx = std::max(mx, std::fabs(static_cast<double>(k[(static_cast<size_t>(g) * prompt + p) * 32 + d])));
        score[d] = std::fabs(qm) * mx;
      }
      std::vector<int> ch(32);
      std::iota(ch.begin(), ch.end(), 0);
      std::stable_sort(ch.begin(), ch.end(), [&](int a, int b) { return score[a] > score[b]; });
      ch.resize(5);
      std::sort(ch.begin(), ch.end());
      expected_chans[g] = ch;
    }
  });
  const auto chans = CpuSparseChannels(*seq5, 0);
  ASSERT_EQ(chans.size(), 2u);
  EXPECT_EQ(chans[0], expected_chans[0]);
  EXPECT_EQ(chans[1], expected_chans[1]);
  EXPECT_NE(chans[0], chans[1]) << "heads choose on their own";
  EXPECT_TRUE(CpuSparseChannels(*seq5, 1).empty());
}

// Index "gpu" of layer 1 (after a dense layer 0), every channel kept, so the
// index scores are exact for its query:
//   query "real" selects what the faithful index (real query, every channel)
//   selects, step for step, with the same logits;
//   with layer 0's MLP silenced (its output zero), the stream after layer
//   0's attention is layer 1's input, so query "after-attention" is the real
//   query and selects the same; query "previous" (layer 0's input under
//   layer 0's norm) selects otherwise.
TEST(CpuBackendSparse, RealAndAfterAttentionQueriesOfASecondLayer) {
  auto w = PolicyModel(61, /*n_layers=*/2);
  const auto& c = w.config;
  const int prompt = 90, generated = 4, len = prompt + generated;
  const auto tokens = RandomTokens(len, c.vocab, 62);
  std::vector<int> chunks = {50, 40};
  chunks.resize(2 + generated, 1);
  auto run = [&](const ModelWeights& weights, const std::string& index, const std::string& query,
                 std::vector<std::vector<int>>* sel) {
    auto backend = *CreateCpuBackend(weights, {.threads = 2});
    KvPlan plan = KvPlan::Dense(2);
    plan.layers[1].kind = KvPolicyKind::kSparse;
    plan.layers[1].sparse = {2, 5, 9, 32, index};
    plan.layers[1].sparse.query = query;
    EXPECT_TRUE(plan.Validate(c).ok()) << plan.Validate(c);
    std::unique_ptr<SequenceState> seq;
    auto out = RunChunks(*backend, plan, tokens, chunks, &seq);
    *sel = CpuSparseLastSelection(*seq, 1);
    EXPECT_EQ(sel->size(), 2u);
    return out.back();
  };
  std::vector<std::vector<int>> real_sel, faithful_sel;
  const auto real = run(w, "gpu", "real", &real_sel);
  const auto faithful = run(w, "faithful", "previous", &faithful_sel);
  EXPECT_EQ(real_sel, faithful_sel);
  size_t where = 0;
  EXPECT_LT(MaxAbsDiff(real.data(), faithful.data(), c.vocab, &where), 1e-4f) << where;

  std::fill(w.layers[0].w_down.data.begin(), w.layers[0].w_down.data.end(), 0.0f);
  std::vector<std::vector<int>> r0, late0, prev0;
  const auto real_silent = run(w, "gpu", "real", &r0);
  const auto late_silent = run(w, "gpu", "after-attention", &late0);
  run(w, "gpu", "previous", &prev0);
  EXPECT_EQ(late0, r0);
  EXPECT_LT(MaxAbsDiff(late_silent.data(), real_silent.data(), c.vocab, &where), 1e-4f) << where;
  EXPECT_NE(prev0, r0) << "the speculation from layer 0's input should select other tokens";
}

// Refine: the later query's Top-K among the Top-(refine x K) of TailorKV's
// speculation. A pool covering every candidate changes nothing (the same
// selection as without refine); a pool of exactly K leaves nothing to
// choose (the speculation's own selection, query "previous").
TEST(CpuBackendSparse, RefinePicksAmongTheSpeculationsCandidates) {
  const auto w = PolicyModel(101, /*n_layers=*/2);
  const auto& c = w.config;
  const int prompt = 150, generated = 3, len = prompt + generated;
  const auto tokens = RandomTokens(len, c.vocab, 102);
  std::vector<int> chunks = {prompt};
  chunks.resize(1 + generated, 1);
  auto selection = [&](const std::string& query, int refine) {
    auto backend = *CreateCpuBackend(w, {.threads = 2});
    KvPlan plan = KvPlan::Dense(2);
    plan.layers[1].kind = KvPolicyKind::kSparse;
    plan.layers[1].sparse = {2, 5, 9, 8, "gpu"};
    plan.layers[1].sparse.query = query;
    plan.layers[1].sparse.refine = refine;
    EXPECT_TRUE(plan.Validate(c).ok()) << plan.Validate(c);
    std::unique_ptr<SequenceState> seq;
    RunChunks(*backend, plan, tokens, chunks, &seq);
    return CpuSparseLastSelection(*seq, 1);
  };
  const auto late = selection("after-attention", 0);
  const auto previous = selection("previous", 0);
  ASSERT_NE(late, previous) << "the two queries select alike here: the test shows nothing";
  EXPECT_EQ(selection("after-attention", 16), late);     // 16 x 9 > 143 candidates
  EXPECT_EQ(selection("after-attention", 1), previous);  // the pool is the selection
  const auto two = selection("after-attention", 2);
  EXPECT_EQ(two.size(), 2u);
  for (const auto& s : two) EXPECT_EQ(s.size(), 9u);
}

// A one-layer model (whose speculative query is its real query) with an
// every-channel index "gpu" of `index_bits`: its last decode step's
// selection, and IndependentSelection's over the keys as `round` leaves them
// ([kv][len][32], rounded in place) and over the exact keys.
struct RoundedSelections {
  std::vector<std::vector<int>> got, rounded, exact;
};
RoundedSelections SelectOnRoundedKeys(uint32_t seed, int prompt, int top_k, int index_bits,
                                      const std::function<void(std::vector<float>&, int)>& round) {
  const auto w = PolicyModel(seed, /*n_layers=*/1);
  const auto& c = w.config;
  auto backend = *CreateCpuBackend(w, {.threads = 2});
  const int generated = 2, len = prompt + generated;
  const auto tokens = RandomTokens(len, c.vocab, seed + 1);
  std::vector<int> chunks = {prompt};
  chunks.resize(1 + generated, 1);
  LayerKvPolicy l;
  l.kind = KvPolicyKind::kSparse;
  l.sparse = {2, 5, top_k, 32, "gpu"};
  l.sparse.index_bits = index_bits;
  std::unique_ptr<SequenceState> seq;
  RunChunks(*backend, KvPlan::Uniform(1, l, "s"), tokens, chunks, &seq);
  RoundedSelections out;
  OneLayerLastLogits(w, tokens, [&](const auto& q, const auto& k, const auto&, float*) {
    std::vector<float> rounded = k;
    round(rounded, len);
    out.rounded = IndependentSelection(q, rounded, c.n_heads, c.n_kv_heads, 32, len, prompt, l.sparse);
    out.exact = IndependentSelection(q, k, c.n_heads, c.n_kv_heads, 32, len, prompt, l.sparse);
  });
  out.got = CpuSparseLastSelection(*seq, 0);
  return out;
}

// An FP8 index ranks the prompt keys by their FP8 values: the selection is
// the exact Top-K over the FP8-rounded keys.
TEST(CpuBackendSparse, Fp8IndexSelectsOnRoundedKeys) {
  const auto r = SelectOnRoundedKeys(71, 500, 150, 8, [](std::vector<float>& k, int) {
    for (float& x : k) x = Fp8E4M3ToFloat(FloatToFp8E4M3(x));
  });
  EXPECT_EQ(r.got, r.rounded);
  EXPECT_NE(r.rounded, r.exact) << "the rounding changes nothing here: the test shows nothing";
}

// A 4-bit index ranks the prompt keys by their block-rounded values: keys
// rounded per channel over blocks of 64 positions (RoundIndexBlock4); 300
// prompt tokens leave a partial last block.
TEST(CpuBackendSparse, FourBitIndexSelectsOnBlockRoundedKeys) {
  constexpr int prompt = 300;
  const auto r = SelectOnRoundedKeys(91, prompt, 40, 4, [](std::vector<float>& k, int len) {
    const int n_kv = static_cast<int>(k.size() / (static_cast<size_t>(len) * 32));
    for (int g = 0; g < n_kv; ++g) {
      float* base = &k[static_cast<size_t>(g) * len * 32];
      for (int b = 0; b < prompt; b += kIndexBlock) {
        const int n = std::min(kIndexBlock, prompt - b);
        for (int x = 0; x < 32; ++x) RoundIndexBlock4(base + static_cast<size_t>(b) * 32 + x, n, 32);
      }
    }
  });
  EXPECT_EQ(r.got, r.rounded);
  EXPECT_NE(r.rounded, r.exact) << "the rounding changes nothing here: the test shows nothing";
}

// Group score "max": a one-layer model (its speculative query is its real
// query) with every channel selects per KV head the Top-K of max over its
// query heads of q_h . k, not of the group mean's score; the two differ here.
TEST(CpuBackendSparse, GroupMaxScoresEachHeadsOwnQuery) {
  const auto w = PolicyModel(81, /*n_layers=*/1);
  const auto& c = w.config;
  const int group = c.n_heads / c.n_kv_heads;
  auto backend = *CreateCpuBackend(w, {.threads = 2});
  const int prompt = 200, generated = 2, len = prompt + generated;
  const auto tokens = RandomTokens(len, c.vocab, 82);
  std::vector<int> chunks = {prompt};
  chunks.resize(1 + generated, 1);
  LayerKvPolicy l;
  l.kind = KvPolicyKind::kSparse;
  l.sparse = {2, 5, 20, 32, "gpu"};
  l.sparse.group_score = "max";
  std::unique_ptr<SequenceState> seq;
  RunChunks(*backend, KvPlan::Uniform(1, l, "s"), tokens, chunks, &seq);
  std::vector<std::vector<int>> want(c.n_kv_heads), mean_sel;
  OneLayerLastLogits(w, tokens, [&](const auto& q, const auto& k, const auto&, float*) {
    for (int g = 0; g < c.n_kv_heads; ++g) {
      std::vector<std::pair<double, int>> cand;
      for (int p = 2; p < prompt - 5; ++p) {
        double best = -1e300;
        for (int h = g * group; h < (g + 1) * group; ++h) {
          double s = 0;
          for (int d = 0; d < 32; ++d) s += static_cast<double>(q[h * 32 + d]) * k[(static_cast<size_t>(g) * len + p) * 32 + d];
          best = std::max(best, s);
        }
        cand.push_back({-best, p});
      }
      std::sort(cand.begin(), cand.end());
      for (int i = 0; i < 20; ++i) want[g].push_back(cand[i].second);
      std::sort(want[g].begin(), want[g].end());
    }
    mean_sel = IndependentSelection(q, k, c.n_heads, c.n_kv_heads, 32, len, prompt, l.sparse);
  });
  EXPECT_EQ(CpuSparseLastSelection(*seq, 0), want);
  EXPECT_NE(want, mean_sel) << "the group mean would select the same: the test shows nothing";
}

// A few planted keys dominate on the query's outlier channels: the
// selection picks exactly them, whatever the other channels hold.
TEST(CpuBackendSparse, SelectionPicksPlantedKeys) {
  constexpr int hd = 24, n = 301;
  std::mt19937 rng(47);
  std::normal_distribution<float> noise(0.0f, 0.3f);
  std::vector<float> q(hd), keys(static_cast<size_t>(n) * hd), max_abs(hd, 0.0f);
  for (float& x : q) x = noise(rng);
  q[5] = 4.0f;
  q[17] = -3.0f;  // outlier channels of both signs
  for (float& x : keys) x = noise(rng);
  const std::vector<int> planted = {7, 40, 41, 199, 300};
  for (int p : planted) {
    keys[p * hd + 5] = 6.0f;
    keys[p * hd + 17] = -5.0f;
  }
  // A key that is large only on a channel the query ignores.
  keys[120 * hd + 2] = 50.0f;
  q[2] = 0.0f;
  for (int p = 0; p < n; ++p) {
    for (int d = 0; d < hd; ++d) max_abs[d] = std::max(max_abs[d], std::fabs(keys[p * hd + d]));
  }
  std::vector<int> sel;
  std::vector<float> scores;
  SparseSelectCpu(q.data(), max_abs.data(), keys.data(), hd, 0, n, /*channels=*/2, /*top_k=*/5, &sel, &scores);
  EXPECT_EQ(sel, planted);
  ASSERT_EQ(scores.size(), static_cast<size_t>(n));
  EXPECT_FLOAT_EQ(scores[7], 4.0f * 6.0f + 3.0f * 5.0f);
  // A window [first, end) excluding some planted keys: the rest, then the best others.
  SparseSelectCpu(q.data(), max_abs.data(), keys.data(), hd, 10, 300, 2, 3, &sel);
  EXPECT_EQ(sel, (std::vector<int>{40, 41, 199}));
  // Top-K beyond the window selects all of it; an empty window nothing.
  SparseSelectCpu(q.data(), max_abs.data(), keys.data(), hd, 290, 296, 2, 50, &sel);
  EXPECT_EQ(sel, (std::vector<int>{290, 291, 292, 293, 294, 295}));
  SparseSelectCpu(q.data(), max_abs.data(), keys.data(), hd, 5, 5, 2, 50, &sel);
  EXPECT_TRUE(sel.empty());
  // Ties: equal scores keep the smaller positions, equal channel scores the
  // smaller channels (channel 0 only: keys differ there, not on channel 1).
  std::vector<float> flat(static_cast<size_t>(10) * 2, 1.0f), ones(2, 1.0f);
  SparseSelectCpu(ones.data(), ones.data(), flat.data(), 2, 0, 10, 1, 3, &sel);
  EXPECT_EQ(sel, (std::vector<int>{0, 1, 2}));
  flat[8 * 2 + 0] = 2.0f;  // position 8 wins on channel 0
  flat[3 * 2 + 1] = 9.0f;  // position 3 only on channel 1, which is not picked
  SparseSelectCpu(ones.data(), ones.data(), flat.data(), 2, 0, 10, 1, 2, &sel, &scores);
  EXPECT_EQ(sel, (std::vector<int>{0, 8}));
  EXPECT_EQ(scores[3], 1.0f);
  // NaN scores rank last.
  flat[0] = NAN;
  SparseSelectCpu(ones.data(), ones.data(), flat.data(), 2, 0, 10, 1, 2, &sel);
  EXPECT_EQ(sel, (std::vector<int>{1, 8}));
}

// channels == head_dim: the approximate scores are the exact dot products
// of the group-mean query (up to fp32 summation order) and the selection is
// the exact Top-K; fewer channels give different scores.
TEST(CpuBackendSparse, AllChannelsMakeTheScoresExact) {
  constexpr int hd = 32, n = 257, k = 19;
  std::mt19937 rng(48);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> q(hd), keys(static_cast<size_t>(n) * hd), max_abs(hd, 0.0f);
  for (float& x : q) x = dist(rng);
  for (float& x : keys) x = dist(rng);
  for (int p = 0; p < n; ++p) {
    for (int d = 0; d < hd; ++d) max_abs[d] = std::max(max_abs[d], std::fabs(keys[p * hd + d]));
  }
  std::vector<std::pair<double, int>> exact;
  std::vector<double> exact_score(n);
  for (int p = 0; p < n; ++p) {
    double s = 0;
    for (int d = 0; d < hd; ++d) s += static_cast<double>(q[d]) * keys[p * hd + d];
    exact_score[p] = s;
    exact.push_back({-s, p});
  }
  std::sort(exact.begin(), exact.end());
  std::vector<int> want;
  for (int i = 0; i < k; ++i) want.push_back(exact[i].second);
  std::sort(want.begin(), want.end());
  std::vector<int> sel;
  std::vector<float> scores;
  SparseSelectCpu(q.data(), max_abs.data(), keys.data(), hd, 0, n, hd, k, &sel, &scores);
  EXPECT_EQ(sel, want);
  double worst = 0;
  for (int p = 0; p < n; ++p) worst = std::max(worst, std::fabs(scores[p] - exact_score[p]));
  EXPECT_LT(worst, 1e-4);
  SparseSelectCpu(q.data(), max_abs.data(), keys.data(), hd, 0, n, 4, k, &sel, &scores);
  worst = 0;
  for (int p = 0; p < n; ++p) worst = std::max(worst, std::fabs(scores[p] - exact_score[p]));
  EXPECT_GT(worst, 0.5);
}

// An in-memory RemoteRowStore (the node's side, kv-host's
// KvHostDataService, is tested over TCP in kv-host/daemon): slices as byte
// vectors, every call counted, a switch that makes the node fail.
class FakeRemoteRows final : public kvhost::RemoteRowStore {
 public:
  absl::StatusOr<std::vector<uint64_t>> Reserve(const std::string& session, absl::Span<const uint64_t> sizes) override {
    std::vector<uint64_t> ids;
    for (uint64_t n : sizes) {
      slices[next] = std::vector<std::byte>(n, std::byte{0x7F});  // poisoned: only written rows may be read
      sessions[session].push_back(next);
      ids.push_back(next++);
    }
    return ids;
  }
  absl::Status Write(uint64_t id, uint64_t offset, absl::Span<const std::byte> data) override {
    ++writes;
    auto& sl = slices.at(id);
    if (offset + data.size() > sl.size()) return absl::OutOfRangeError("offset");
    std::copy(data.begin(), data.end(), sl.begin() + offset);
    return absl::OkStatus();
  }
  absl::Status Gather(absl::Span<const kvhost::RowRequest> reqs, absl::Span<std::byte> out) override {
    ++gathers;
    if (!fail.ok()) return fail;
    std::byte* at = out.data();
    for (const auto& r : reqs) {
      const auto& sl = slices.at(r.slice_id);
      for (uint32_t row : r.rows) {
        const uint64_t from = r.offset + static_cast<uint64_t>(row) * r.stride;
        if (from + r.row_bytes > sl.size()) return absl::OutOfRangeError("row");
        at = std::copy(sl.begin() + from, sl.begin() + from + r.row_bytes, at);
      }
    }
    return at == out.data() + out.size() ? absl::OkStatus() : absl::InternalError("out size");
  }
  absl::StatusOr<uint64_t> CloseSession(const std::string& session) override {
    ++closes;
    uint64_t freed = 0;
    for (uint64_t id : sessions[session]) freed += slices[id].size(), slices.erase(id);
    sessions.erase(session);
    return freed;
  }
  std::map<uint64_t, std::vector<std::byte>> slices;
  std::map<std::string, std::vector<uint64_t>> sessions;
  uint64_t next = 1;
  int writes = 0, gathers = 0, closes = 0;
  absl::Status fail;
};

TEST(CpuBackendSparse, RemoteHostTierGivesTheSameLogitsBitForBit) {
  const auto w = PolicyModel(71);
  auto local = *CreateCpuBackend(w, {.threads = 2});
  FakeRemoteRows node;
  auto remote = *CreateCpuBackend(w, {.threads = 2, .remote_rows = &node});
  const auto tokens = RandomTokens(103, w.config.vocab, 72);
  // Prompt in two chunks, decode steps, a continued prompt of 6 after them
  // (every prompt row read back from the node), more decode steps.
  std::vector<int> chunks = {40, 50, 1, 1, 1, 6, 1, 1, 1, 1};
  for (const std::string index_bits : {"16", "8"}) {
    LayerKvPolicy l;
    l.kind = KvPolicyKind::kSparse;
    l.sparse = {2, 5, 9, 12, "gpu"};
    l.sparse.index_bits = std::stoi(index_bits);
    const KvPlan plan = KvPlan::Uniform(3, l, "s");
    const auto want = RunChunks(*local, plan, tokens, chunks);
    const int gathers_before = node.gathers;
    std::unique_ptr<SequenceState> seq;
    const auto got = RunChunks(*remote, plan, tokens, chunks, &seq);
    ExpectBitIdentical(want, got, ("remote vs local host tier, index bits " + index_bits).c_str());
    // The prompt's rows written once per layer and head (K and V), one
    // gather per layer and decode step (7), one for the continued prompt.
    EXPECT_GE(node.gathers - gathers_before, 3 * 8);
    EXPECT_EQ(node.sessions.size(), 1u);
    const auto bytes = seq->kv_bytes();
    EXPECT_GT(bytes[0].host_bytes, 0) << "the tier's bytes are counted where they are";
    seq.reset();
    EXPECT_TRUE(node.sessions.empty()) << "the session closes with the sequence";
  }
  EXPECT_EQ(node.writes, 2 * 3 * 2 * w.config.n_kv_heads);
}

TEST(CpuBackendSparse, RemoteHostTierRefusesFaithfulAndReportsTheNodesErrors) {
  const auto w = PolicyModel(73);
  FakeRemoteRows node;
  auto remote = *CreateCpuBackend(w, {.threads = 2, .remote_rows = &node});
  LayerKvPolicy l;
  l.kind = KvPolicyKind::kSparse;
  l.sparse = {2, 5, 9, 12, "faithful"};
  auto faithful = remote->NewSequence(64, KvPlan::Uniform(3, l, "f"));
  ASSERT_FALSE(faithful.ok());
  EXPECT_EQ(faithful.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(faithful.status().message().find("faithful"), std::string::npos) << faithful.status();
  l.sparse.index = "gpu";
  auto seq = remote->NewSequence(64, KvPlan::Uniform(3, l, "g"));
  ASSERT_TRUE(seq.ok()) << seq.status();
  const auto tokens = RandomTokens(42, w.config.vocab, 74);
  std::vector<float> logits;
  ASSERT_TRUE(remote->Forward(**seq, absl::MakeConstSpan(tokens).subspan(0, 40), false, &logits).ok());
  node.fail = absl::UnavailableError("node gone");
  const auto st = remote->Forward(**seq, absl::MakeConstSpan(tokens).subspan(40, 1), false, &logits);
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  EXPECT_NE(st.message().find("remote host tier"), std::string::npos) << st;
  EXPECT_THAT(remote->Forward(**seq, absl::MakeConstSpan(tokens).subspan(40, 1), false, &logits).code(),
              absl::StatusCode::kUnavailable);
}

// Three sparse layers on the "gpu" index: what a remote host tier serves.
KvPlan GpuIndexPlan() {
  LayerKvPolicy l;
  l.kind = KvPolicyKind::kSparse;
  l.sparse = {2, 5, 9, 12, "gpu"};
  return KvPlan::Uniform(3, l, "g");
}

// A co-located store with room for one 64-token sequence of GpuIndexPlan
// (three host tiers): the next one goes to the remote node.
absl::StatusOr<std::unique_ptr<kvhost::InProcessStore>> StoreForOneSequence(const ModelWeights& w) {
  const int64_t one = 3 * 2 * static_cast<int64_t>(w.config.n_kv_heads) * 64 * w.config.head_dim * 4;
  kvhost::InProcessStoreOptions so;
  so.budget_bytes = so.arena_bytes = (one + 4096 * 4) / 4096 * 4096;
  return kvhost::InProcessStore::Create(so);
}

TEST(CpuBackendSparse, CoLocatedHostTierFirstRemoteWhenItIsFull) {
  const auto w = PolicyModel(75);
  FakeRemoteRows node;
  const KvPlan plan = GpuIndexPlan();
  auto store = StoreForOneSequence(w);
  ASSERT_TRUE(store.ok()) << store.status();
  auto backend = *CreateCpuBackend(w, {.threads = 2, .host_store = store->get(), .remote_rows = &node});
  auto first = backend->NewSequence(64, plan);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_TRUE(node.sessions.empty()) << "the co-located store had room";
  auto second = backend->NewSequence(64, plan);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(node.sessions.size(), 1u) << "the co-located store was full: the node took it";
  // Both generate the same logits as a sequence with its own memory.
  auto local = *CreateCpuBackend(w, {.threads = 2});
  const auto tokens = RandomTokens(60, w.config.vocab, 76);
  const std::vector<int> chunks = {50, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
  const auto want = RunChunks(*local, plan, tokens, chunks);
  for (auto* seq : {&*first, &*second}) {
    std::vector<std::vector<float>> got;
    int at = 0;
    for (int n : chunks) {
      std::vector<float> logits;
      ASSERT_TRUE(backend->Forward(**seq, absl::MakeConstSpan(tokens).subspan(at, n), true, &logits).ok());
      got.push_back(std::move(logits));
      at += n;
    }
    ExpectBitIdentical(want, got, "co-located or remote");
  }
}

TEST(CpuBackendSparse, ANodesFailureEndsOnlyItsOwnSequencesInABatch) {
  const auto w = PolicyModel(77);
  FakeRemoteRows node;
  const KvPlan plan = GpuIndexPlan();
  auto store = StoreForOneSequence(w);
  ASSERT_TRUE(store.ok()) << store.status();
  auto backend = *CreateCpuBackend(w, {.threads = 2, .host_store = store->get(), .remote_rows = &node});
  auto local_seq = *backend->NewSequence(64, plan);   // co-located
  auto remote_seq = *backend->NewSequence(64, plan);  // on the node
  ASSERT_EQ(node.sessions.size(), 1u);
  auto reference = *CreateCpuBackend(w, {.threads = 2});
  auto ref_seq = *reference->NewSequence(64, plan);
  const auto tokens = RandomTokens(45, w.config.vocab, 78);
  std::vector<float> logits;
  for (auto* b : {backend.get(), reference.get()}) {
    for (auto* seq : b == backend.get() ? std::vector<SequenceState*>{local_seq.get(), remote_seq.get()}
                                        : std::vector<SequenceState*>{ref_seq.get()}) {
      ASSERT_TRUE(b->Forward(*seq, absl::MakeConstSpan(tokens).subspan(0, 40), false, &logits).ok());
    }
  }
  node.fail = absl::UnavailableError("node gone");
  SequenceState* both[] = {local_seq.get(), remote_seq.get()};
  SequenceState* alone[] = {ref_seq.get()};
  for (int step = 40; step < 45; ++step) {
    const int32_t two[] = {tokens[step], tokens[step]};
    std::vector<absl::Status> per_seq;
    std::vector<float> got, want;
    ASSERT_TRUE(backend->DecodeBatchIsolated(both, two, &got, &per_seq).ok());
    ASSERT_EQ(per_seq.size(), 2u);
    EXPECT_TRUE(per_seq[0].ok()) << per_seq[0];
    if (step == 40) {
      EXPECT_EQ(per_seq[1].code(), absl::StatusCode::kUnavailable) << per_seq[1];
    }
    ASSERT_TRUE(reference->DecodeBatch(alone, absl::MakeConstSpan(two, 1), &want).ok());
    const size_t vocab = static_cast<size_t>(w.config.vocab);
    ExpectBitIdentical({want}, {std::vector<float>(got.begin(), got.begin() + vocab)},
                       "the co-located sequence beside a failing one");
  }
}

TEST(CpuBackendSparse, KvBytesAndTruncate) {
  const auto w = PolicyModel(49, /*n_layers=*/3);
  const auto& c = w.config;
  auto backend = *CreateCpuBackend(w, {.threads = 1});
  KvPlan plan = KvPlan::Dense(3);
  plan.name = "mixed";
  plan.layers[0] = Quant(2, 32, 64);
  plan.layers[1] = Sparse(4, 20, 8, 3);
  plan.layers[2] = Sparse(8, 1020, 8, 3);  // sink + recent beyond the capacity: capped
  const int cap = 100, prompt = 70;
  auto seq = *backend->NewSequence(cap, plan);
  const int64_t nkv = c.n_kv_heads, hd = c.head_dim;
  const auto est = EstimateKvBytes(plan, c, cap, 4);
  auto b = seq->kv_bytes();
  ASSERT_EQ(b.size(), 3u);
  EXPECT_EQ(b[1].kind, KvPolicyKind::kSparse);
  EXPECT_EQ(b[1].host_bytes, 2 * nkv * cap * hd * 4);
  EXPECT_EQ(b[1].device_bytes, 2 * nkv * 24 * hd * 4 + nkv * hd * 4);
  EXPECT_EQ(b[2].device_bytes, 2 * nkv * cap * hd * 4 + nkv * hd * 4);
  for (int l = 0; l < 3; ++l) {
    EXPECT_EQ(b[l].kind, est[l].kind) << l;
    EXPECT_EQ(b[l].device_bytes, est[l].device_bytes) << l;
    EXPECT_EQ(b[l].host_bytes, est[l].host_bytes) << l;
  }
  // The engine's probe (capacity 1) and other capacities match the estimate too.
  for (int other : {1, 7, 640}) {
    const auto held = (*backend->NewSequence(other, plan))->kv_bytes();
    const auto want = EstimateKvBytes(plan, c, other, 4);
    for (int l = 0; l < 3; ++l) {
      EXPECT_EQ(held[l].device_bytes, want[l].device_bytes) << "capacity " << other << " layer " << l;
      EXPECT_EQ(held[l].host_bytes, want[l].host_bytes) << "capacity " << other << " layer " << l;
    }
  }
  std::vector<float> logits;
  const auto tokens = RandomTokens(prompt + 2, c.vocab, 50);
  ASSERT_TRUE(backend->Forward(*seq, absl::MakeConstSpan(tokens).first(prompt), false, &logits).ok());
  EXPECT_EQ(seq->kv_bytes()[1].device_bytes, b[1].device_bytes) << "the prompt has not ended yet";
  ASSERT_TRUE(backend->Forward(*seq, absl::MakeConstSpan(tokens).subspan(prompt, 1), false, &logits).ok());
  // The prompt ended: generated rows for the rest of the capacity.
  const auto after = seq->kv_bytes();
  EXPECT_EQ(after[1].device_bytes, b[1].device_bytes + 2 * nkv * (cap - prompt) * hd * 4);
  EXPECT_EQ(after[1].host_bytes, b[1].host_bytes);
  EXPECT_EQ(after[2].device_bytes, b[2].device_bytes + 2 * nkv * (cap - prompt) * hd * 4);
  // Sparse layers cannot forget: Truncate leaves the sequence as it is.
  seq->Truncate(10);
  EXPECT_EQ(seq->length(), prompt + 1);
  ASSERT_TRUE(backend->Forward(*seq, absl::MakeConstSpan(tokens).subspan(prompt + 1, 1), false, &logits).ok());
  EXPECT_EQ(seq->length(), prompt + 2);
  for (float x : logits) ASSERT_TRUE(std::isfinite(x));
  // Overflowing the capacity leaves it unchanged too.
  const auto more = RandomTokens(cap, c.vocab, 51);
  EXPECT_EQ(backend->Forward(*seq, absl::MakeConstSpan(more).first(cap - prompt - 1), false, &logits).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(seq->length(), prompt + 2);
  ASSERT_TRUE(backend->Forward(*seq, absl::MakeConstSpan(more).first(cap - prompt - 2), false, &logits).ok());
  EXPECT_EQ(seq->length(), cap);
}

// A prompt of k * chunk + 1 tokens prefilled in chunks ends with a one-token
// chunk: with Mode::kPrefill it is prompt, not a decode step, so the prompt
// ends where it really ends and the decode that follows is the one a
// one-call prefill gives. With kAuto it would be read as a decode step (the
// prompt ends one token early), which the byte count shows.
TEST(CpuBackendSparse, OneTokenLastPrefillChunkIsPromptNotADecodeStep) {
  const auto w = PolicyModel(57, /*n_layers=*/3);
  const auto& c = w.config;
  auto backend = *CreateCpuBackend(w, {.threads = 1});
  KvPlan plan = KvPlan::Dense(3);
  plan.name = "sparse";
  plan.layers[1] = Sparse(4, 8, 6, 3);
  plan.layers[2] = Sparse(2, 8, 5, 4);
  plan.layers[2].sparse.index = "gpu";
  const int cap = 90, chunk = 35, prompt = 2 * chunk + 1, steps = 3;
  const auto tokens = RandomTokens(prompt + steps, c.vocab, 58);
  const auto all = absl::MakeConstSpan(tokens);
  const int64_t nkv = c.n_kv_heads, hd = c.head_dim;
  using Mode = Backend::Mode;

  auto one_call = *backend->NewSequence(cap, plan);
  auto chunked = *backend->NewSequence(cap, plan);
  auto inferred = *backend->NewSequence(cap, plan);
  const int64_t before = chunked->kv_bytes()[1].device_bytes;
  std::vector<float> want, got, guessed;
  ASSERT_TRUE(backend->Forward(*one_call, all.first(prompt), false, &want, Mode::kPrefill).ok());
  for (int at = 0; at < prompt; at += chunk) {
    const int n = std::min(chunk, prompt - at);
    ASSERT_TRUE(backend->Forward(*chunked, all.subspan(at, n), false, &got, Mode::kPrefill).ok());
    ASSERT_TRUE(backend->Forward(*inferred, all.subspan(at, n), false, &guessed).ok());
  }
  EXPECT_EQ(chunked->kv_bytes()[1].device_bytes, before) << "the prompt has not ended yet";
  EXPECT_GT(inferred->kv_bytes()[1].device_bytes, before) << "kAuto read the last chunk as a step";
  for (int s = 0; s < steps; ++s) {
    const auto token = all.subspan(prompt + s, 1);
    ASSERT_TRUE(backend->Forward(*one_call, token, false, &want, Mode::kDecode).ok());
    ASSERT_TRUE(backend->Forward(*chunked, token, false, &got, Mode::kDecode).ok());
    ASSERT_EQ(got.size(), want.size());
    size_t where = 0;
    // Same prompt end, same selections: only the prefill's chunking differs
    // (GEMM blocking), so the logits agree to fp32 rounding.
    EXPECT_LT(MaxAbsDiff(got.data(), want.data(), want.size(), &where), 1e-4f) << "step " << s;
    for (int l : {1, 2}) {
      EXPECT_EQ(CpuSparseLastSelection(*chunked, l), CpuSparseLastSelection(*one_call, l))
          << "step " << s << " layer " << l;
    }
  }
  EXPECT_EQ(CpuSparseChannels(*chunked, 2), CpuSparseChannels(*one_call, 2));
  // Generated rows reserved for capacity - prompt, the whole prompt counted.
  for (int l : {1, 2}) {
    EXPECT_EQ(chunked->kv_bytes()[l].device_bytes, one_call->kv_bytes()[l].device_bytes) << l;
  }
  EXPECT_EQ(chunked->kv_bytes()[1].device_bytes, before + 2 * nkv * (cap - prompt) * hd * 4);
  EXPECT_EQ(inferred->kv_bytes()[1].device_bytes, before + 2 * nkv * (cap - prompt + 1) * hd * 4);
}

TEST(CpuBackend, DecodeModeTakesOneTokenAfterThePrompt) {
  const auto w = PolicyModel(59, /*n_layers=*/2);
  auto backend = *CreateCpuBackend(w, {.threads = 1});
  auto seq = *backend->NewSequence(16);
  const auto tokens = RandomTokens(4, w.config.vocab, 60);
  std::vector<float> logits;
  const auto st = backend->Forward(*seq, absl::MakeConstSpan(tokens).first(1), false, &logits,
                                   Backend::Mode::kDecode);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(st.message()), ::testing::HasSubstr("mode"));
  EXPECT_EQ(seq->length(), 0);
  ASSERT_TRUE(backend->Forward(*seq, absl::MakeConstSpan(tokens).first(2), false, &logits).ok());
  EXPECT_EQ(backend->Forward(*seq, absl::MakeConstSpan(tokens).subspan(2, 2), false, &logits,
                             Backend::Mode::kDecode).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(seq->length(), 2);
  EXPECT_TRUE(backend->Forward(*seq, absl::MakeConstSpan(tokens).subspan(2, 1), false, &logits,
                               Backend::Mode::kDecode).ok());
  EXPECT_EQ(seq->length(), 3);
}

TEST(CpuReference, LlamaThreeScalingKeepsHighFrequenciesAndSlowsLowOnes) {
  model::ModelConfig c;
  c.head_dim = 128;
  c.rope_theta = 500000.0f;
  const auto plain = ref::RopeInvFreq(c);
  c.rope_scaling = {model::RopeScaling::Type::kLlama3, 8.0f, 1.0f, 4.0f, 8192, {}};
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

// A Llama 3.1 GGUF's rope_freqs.weight holds plain / llama3-scaled for each
// frequency (what llama.cpp's converter writes): dividing by those factors
// gives the llama3 frequencies back (to float rounding), and a linear factor
// still applies on top.
TEST(CpuReference, FrequencyFactorsReproduceLlamaThreeScaling) {
  model::ModelConfig c;
  c.head_dim = 128;
  c.rope_theta = 500000.0f;
  const auto plain = ref::RopeInvFreq(c);
  model::ModelConfig l3 = c;
  l3.rope_scaling.type = model::RopeScaling::Type::kLlama3;
  l3.rope_scaling.factor = 8.0f;
  const auto scaled = ref::RopeInvFreq(l3);
  for (size_t i = 0; i < plain.size(); ++i) {
    c.rope_scaling.freq_factors.push_back(static_cast<float>(static_cast<double>(plain[i]) / scaled[i]));
  }
  const auto from_factors = ref::RopeInvFreq(c);
  ASSERT_EQ(from_factors.size(), 64u);
  for (int i = 0; i < 64; ++i) EXPECT_NEAR(from_factors[i], scaled[i], 2e-7f * scaled[i]) << i;
  c.rope_scaling.type = model::RopeScaling::Type::kLinear;
  c.rope_scaling.factor = 2.0f;
  const auto both = ref::RopeInvFreq(c);
  for (int i = 0; i < 64; ++i) EXPECT_FLOAT_EQ(both[i], from_factors[i] / 2.0f) << i;
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
