#include "runtime/quant_kv.h"

#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>

#include "absl/strings/str_cat.h"
#include "model/ggml_types.h"

namespace tailorkv::runtime {
namespace {

using model::HalfToFloat;

float Scale(QuantGroupParams p) { return HalfToFloat(p.scale); }
float Min(QuantGroupParams p) { return HalfToFloat(p.min); }

// |x - x^| <= s/2 plus the fp32 roundings of (x - z) / s and fmaf.
float ErrorBound(QuantGroupParams p, float x) {
  return Scale(p) * 0.5f * (1 + 1e-6f) + 4 * FLT_EPSILON * (std::fabs(x) + std::fabs(Min(p)));
}

struct Quantized {
  QuantGroupParams p;
  std::vector<uint32_t> words;
  std::vector<float> deq;
};

Quantized Quantize(const std::vector<float>& x, int bits) {
  Quantized q;
  const int n = static_cast<int>(x.size());
  q.words.assign((n * bits + 31) / 32 + 1, 0xDEADBEEFu);  // one guard word past the end
  q.p = QuantizeGroup(x.data(), n, 1, bits, q.words.data());
  EXPECT_EQ(q.words.back(), 0xDEADBEEFu) << "wrote past ceil(n * bits / 32) words";
  for (int i = 0; i < n; ++i) q.deq.push_back(DequantizeValue(q.p, GroupCode(q.words.data(), i, bits)));
  return q;
}

TEST(QuantizeGroup, ConstantGroupIsExactWhenRepresentable) {
  for (int bits : {1, 2, 4}) {
    for (float c : {0.0f, -0.0f, 0.5f, -3.25f, 1024.0f}) {
      const Quantized q = Quantize(std::vector<float>(64, c), bits);
      EXPECT_EQ(q.p.scale, 0) << c;
      EXPECT_EQ(Min(q.p), c);
      for (size_t w = 0; w + 1 < q.words.size(); ++w) EXPECT_EQ(q.words[w], 0u);
      for (float d : q.deq) ASSERT_EQ(d, c);
    }
    // 0.1 has no fp16 form: z rounds down, s is one fp16 step or less, and
    // the value stays within s/2.
    const Quantized q = Quantize(std::vector<float>(64, 0.1f), bits);
    EXPECT_LT(Min(q.p), 0.1f);
    EXPECT_GT(Scale(q.p), 0.0f);
    EXPECT_LT(Scale(q.p), 1e-4f);
    for (float d : q.deq) ASSERT_LE(std::fabs(d - 0.1f), ErrorBound(q.p, 0.1f));
  }
}

TEST(QuantizeGroup, TwoRepresentableValuesAreExact) {
  std::vector<float> x(32);
  for (int i = 0; i < 32; ++i) x[i] = (i % 3 == 0) ? 2.25f : -1.5f;
  for (int bits : {1, 2, 4}) {
    const Quantized q = Quantize(x, bits);
    EXPECT_EQ(Min(q.p), -1.5f);
    EXPECT_EQ(Scale(q.p), 3.75f / ((1 << bits) - 1)) << bits;  // 3.75, 1.25, 0.25: all fp16
    for (int i = 0; i < 32; ++i) {
      ASSERT_EQ(GroupCode(q.words.data(), i, bits), (i % 3 == 0) ? (1u << bits) - 1 : 0u);
      ASSERT_EQ(q.deq[i], x[i]) << "bits " << bits << " i " << i;
    }
  }
}

TEST(QuantizeGroup, ExtremeMagnitudesStayBoundedAndFinite) {
  std::mt19937 rng(5);
  std::normal_distribution<float> n01;
  std::vector<std::vector<float>> cases;
  auto make = [&](float offset, float spread) {
    std::vector<float> x(64);
    for (float& v : x) v = offset + spread * n01(rng);
    cases.push_back(x);
  };
  make(0, 1e-6f);       // fp16 subnormal range for z and s
  make(0, 3e-8f);       // below the smallest fp16 subnormal
  make(1000, 0.01f);    // offset far above the spread (nearest rounding of z would break s/2)
  make(-30000, 2.0f);
  make(0, 20000);       // spread near the fp16 limit
  std::vector<float> edge(64, 65504.0f);
  edge[3] = -65504.0f;  // s = 131008 / M: above fp16 max for bits 1, saturates
  for (int bits : {1, 2, 4}) {
    for (size_t k = 0; k < cases.size(); ++k) {
      const Quantized q = Quantize(cases[k], bits);
      for (size_t i = 0; i < cases[k].size(); ++i) {
        ASSERT_LE(std::fabs(q.deq[i] - cases[k][i]), ErrorBound(q.p, cases[k][i]))
            << "case " << k << " bits " << bits << " i " << i << ": " << cases[k][i] << " -> " << q.deq[i];
      }
    }
    const Quantized e = Quantize(edge, bits);
    EXPECT_EQ(Min(e.p), -65504.0f);
    for (float d : e.deq) EXPECT_TRUE(std::isfinite(d));
    if (bits > 1) {
      // s = 131008 / M still fits fp16; rounded up, the top may pass 65504.
      EXPECT_LE(std::fabs(e.deq[0] - 65504.0f), ErrorBound(e.p, 65504.0f)) << bits;
    } else {
      EXPECT_EQ(Scale(e.p), 65504.0f) << "scale saturates instead of becoming inf";
    }
    // Beyond fp16 range: saturated, finite, ordered.
    std::vector<float> huge(64, 0.0f);
    huge[0] = -1e9f;
    huge[1] = 1e9f;
    huge[2] = INFINITY;
    huge[3] = NAN;
    const Quantized h = Quantize(huge, bits);
    for (float d : h.deq) EXPECT_TRUE(std::isfinite(d)) << bits;
    EXPECT_EQ(h.deq[0], -65504.0f);
    EXPECT_EQ(GroupCode(h.words.data(), 3, bits), 0u) << "NaN gets code 0";
    EXPECT_EQ(GroupCode(h.words.data(), 2, bits), (1u << bits) - 1) << "+inf gets the top code";
  }
}

// Values equal to their codes (0 and M both present, so z = 0, s = 1):
// the words must be the codes packed from bit 0, element i at bit i*b.
TEST(QuantizeGroup, CodesArePackedLittleEndianWithinWords) {
  for (int bits : {1, 2, 4}) {
    for (int n : {32, 64, 128}) {
      const uint32_t M = (1u << bits) - 1;
      std::mt19937 rng(bits * 1000 + n);
      std::vector<uint32_t> codes(n);
      for (auto& c : codes) c = rng() & M;
      codes[5] = 0;
      codes[n - 1] = M;
      std::vector<float> x(codes.begin(), codes.end());
      const Quantized q = Quantize(x, bits);
      ASSERT_EQ(Min(q.p), 0.0f);
      ASSERT_EQ(Scale(q.p), 1.0f);
      std::vector<uint32_t> expected(n * bits / 32, 0);
      for (int i = 0; i < n; ++i) expected[i * bits / 32] |= codes[i] << (i * bits % 32);
      for (int w = 0; w < n * bits / 32; ++w) ASSERT_EQ(q.words[w], expected[w]) << "bits " << bits << " word " << w;
    }
  }
  // Spot checks of the layout itself: 4-bit element 8 starts word 1; 1-bit
  // element 31 is the top bit of word 0.
  std::vector<float> x(32, 0.0f);
  x[8] = 15;
  EXPECT_EQ(Quantize(x, 4).words[1], 0xFu);
  x.assign(32, 0.0f);
  x[31] = 1;
  EXPECT_EQ(Quantize(x, 1).words[0], 0x80000000u);
  x.assign(32, 0.0f);
  x[17] = 3;
  EXPECT_EQ(Quantize(x, 2).words[1], 0x3u << 2);
}

TEST(QuantizeGroup, RandomDataWithinHalfAStep) {
  std::mt19937 rng(17);
  std::normal_distribution<float> n01;
  int64_t checked = 0;
  for (int trial = 0; trial < 300; ++trial) {
    const int bits = 1 << (trial % 3);
    const float offset = 4 * n01(rng), spread = std::min(std::exp(3 * n01(rng)), 2000.0f);
    std::vector<float> x(64);
    for (float& v : x) v = offset + spread * n01(rng);
    const Quantized q = Quantize(x, bits);
    for (int i = 0; i < 64; ++i, ++checked) {
      ASSERT_LE(std::fabs(q.deq[i] - x[i]), ErrorBound(q.p, x[i])) << "trial " << trial << " i " << i;
    }
  }
  EXPECT_EQ(checked, 300 * 64);
}

TEST(QuantShape, BytesAndValidate) {
  QuantShape s{.n_kv_heads = 3, .head_dim = 64, .capacity = 1000, .params = {2, 32, 128}};
  ASSERT_TRUE(s.Validate().ok());
  // key groups ceil(1000/32) = 32, W = 2: K codes 32*64*2 words, K params
  // 32*64; V codes 1000*2*2, V params 1000*2; residual 2*128*64 floats.
  const int64_t per_head = (32 * 64 * 2 + 1000 * 2 * 2) * 4 + (32 * 64 + 1000 * 2) * 4 + 2 * 128 * 64 * 4;
  EXPECT_EQ(s.Bytes(4), 3 * per_head);
  EXPECT_EQ(s.Bytes(2), 3 * (per_head - 128 * 64 * 4));
  auto bad = [&](auto mutate, const char* field) {
    QuantShape b = s;
    mutate(b);
    const absl::Status st = b.Validate();
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_NE(st.message().find(field), std::string::npos) << st;
  };
  bad([](QuantShape& b) { b.params.bits = 3; }, "bits");
  bad([](QuantShape& b) { b.params.group = 16; }, "group");
  bad([](QuantShape& b) { b.head_dim = 96; b.params.group = 64; }, "head_dim");
  bad([](QuantShape& b) { b.params.residual = 96; b.params.group = 64; }, "residual");
  bad([](QuantShape& b) { b.params.residual = 4096 + 32; }, "residual");
  bad([](QuantShape& b) { b.capacity = 0; }, "capacity");
  bad([](QuantShape& b) { b.n_kv_heads = 0; }, "n_kv_heads");
}

// K with per-channel offsets and a few outlier channels (as real keys have),
// V plain normal; [kv_head][len][head_dim].
struct KvData {
  std::vector<float> k, v;
};
KvData RandomKv(int n_kv, int len, int hd, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n01;
  KvData d;
  d.k.resize(static_cast<size_t>(n_kv) * len * hd);
  d.v.resize(d.k.size());
  std::vector<float> offset(hd), spread(hd);
  for (int c = 0; c < hd; ++c) {
    offset[c] = 2 * n01(rng);
    spread[c] = (c % 17 == 3) ? 6.0f : 1.0f;
  }
  for (size_t i = 0; i < d.k.size(); ++i) {
    const int c = static_cast<int>(i % hd);
    d.k[i] = offset[c] + spread[c] * n01(rng);
    d.v[i] = n01(rng);
  }
  return d;
}

std::vector<float> RandomVec(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n01;
  std::vector<float> x(n);
  for (float& v : x) v = n01(rng);
  return x;
}

// Full-precision attention in double on unquantized data.
std::vector<float> ExactAttend(const KvData& d, int n_kv, int len, int hd, const float* q, int n_heads,
                               float scale) {
  std::vector<float> out(static_cast<size_t>(n_heads) * hd);
  const int group = n_heads / n_kv;
  for (int h = 0; h < n_heads; ++h) {
    const float* K = &d.k[static_cast<size_t>(h / group) * len * hd];
    const float* V = &d.v[static_cast<size_t>(h / group) * len * hd];
    std::vector<double> s(len), o(hd, 0.0);
    double mx = -INFINITY, sum = 0;
    for (int t = 0; t < len; ++t) {
      double dot = 0;
      for (int c = 0; c < hd; ++c) dot += static_cast<double>(q[h * hd + c]) * K[t * hd + c];
      s[t] = dot * scale;
      mx = std::max(mx, s[t]);
    }
    for (int t = 0; t < len; ++t) {
      const double e = std::exp(s[t] - mx);
      sum += e;
      for (int c = 0; c < hd; ++c) o[c] += e * V[t * hd + c];
    }
    for (int c = 0; c < hd; ++c) out[h * hd + c] = static_cast<float>(o[c] / sum);
  }
  return out;
}

struct AttendCase {
  int n_heads, n_kv, hd;
};

// Fused attention against Materialize + double-precision attention, every
// length across R and G boundaries, every bits/group/residual. Outputs are
// O(1) and scores up to ~20 (offset, outlier key channels), so fp32
// accumulation over 1337 tokens costs ~1e-5: measured max |diff| 1.5e-5,
// tolerance 1e-4.
TEST(QuantKvCpu, AttendMatchesDequantizeThenAttend) {
  constexpr float kTol = 1e-4f;
  float worst = 0;
  int cases = 0;
  for (const AttendCase ac : {AttendCase{9, 3, 64}, AttendCase{32, 8, 128}}) {
    const int max_len = 1337;
    const KvData d = RandomKv(ac.n_kv, max_len, ac.hd, 100 + ac.hd);
    for (int len : {1, 63, 127, 128, 129, 1000, 1337}) {
      for (int bits : {1, 2, 4}) {
        for (int G : {32, 64, 128}) {
          for (int R : {64, 128, 256}) {
            if (R % G != 0 || ac.hd % G != 0) continue;
            // The big shape runs a rotating subset (every combination at head_dim 64).
            if (ac.hd == 128 && (len + bits + G + R) % 3 != 0) continue;
            QuantShape shape{.n_kv_heads = ac.n_kv, .head_dim = ac.hd, .capacity = max_len, .params = {bits, G, R}};
            QuantKvCpu cache(shape);
            cache.Pack(d.k.data(), d.v.data(), static_cast<int64_t>(max_len) * ac.hd, 0, len);
            const auto q = RandomVec(static_cast<size_t>(ac.n_heads) * ac.hd, len * 7 + bits);
            const float scale = 1.0f / std::sqrt(static_cast<float>(ac.hd));
            std::vector<float> got(q.size(), NAN), want(q.size(), NAN);
            cache.Attend(q.data(), ac.n_heads, len, scale, got.data());
            DequantizeThenAttend(cache, q.data(), ac.n_heads, len, scale, want.data());
            float m = 0;
            size_t at = 0;
            for (size_t i = 0; i < got.size(); ++i) {
              const float diff = std::fabs(got[i] - want[i]);
              if (!(diff <= m)) {
                m = std::isnan(diff) ? INFINITY : diff;
                at = i;
              }
            }
            ASSERT_LE(m, kTol) << "heads " << ac.n_heads << "/" << ac.n_kv << " hd " << ac.hd << " len " << len
                               << " bits " << bits << " G " << G << " R " << R << " at " << at << ": "
                               << got[at] << " vs " << want[at];
            worst = std::max(worst, m);
            ++cases;
          }
        }
      }
    }
  }
  std::printf("Attend vs DequantizeThenAttend: %d cases, max |diff| %.3g\n", cases, worst);
  EXPECT_GT(cases, 150);
}

void ExpectSameArrays(const QuantKvCpu& a, const QuantKvCpu& b, const std::string& what) {
  auto eq = [&](const auto& x, const auto& y, const char* name) {
    ASSERT_EQ(x.size(), y.size()) << what << " " << name;
    for (size_t i = 0; i < x.size(); ++i) {
      ASSERT_EQ(std::memcmp(&x[i], &y[i], sizeof(x[i])), 0) << what << ": " << name << " differs at " << i;
    }
  };
  eq(a.k_codes(), b.k_codes(), "k_codes");
  eq(a.k_params(), b.k_params(), "k_params");
  eq(a.v_codes(), b.v_codes(), "v_codes");
  eq(a.v_params(), b.v_params(), "v_params");
  eq(a.k_res(), b.k_res(), "k_res");
  eq(a.v_res(), b.v_res(), "v_res");
}

bool AnyNonZeroCode(const QuantKvCpu& c) {
  for (uint32_t w : c.k_codes()) if (w) return true;
  return false;
}

TEST(QuantKvCpu, AppendOneByOneEqualsOneShotPackBitExact) {
  for (const QuantParams p : {QuantParams{1, 32, 64}, QuantParams{2, 64, 128}, QuantParams{4, 32, 96}}) {
    const int n_kv = 3, hd = 64, len = 333, cap = 350;
    const KvData d = RandomKv(n_kv, cap, hd, 7 + p.bits);
    QuantShape shape{.n_kv_heads = n_kv, .head_dim = hd, .capacity = cap, .params = p};
    QuantKvCpu packed(shape), appended(shape);
    packed.Pack(d.k.data(), d.v.data(), static_cast<int64_t>(cap) * hd, 0, len);
    std::vector<float> k(n_kv * hd), v(n_kv * hd);
    for (int pos = 0; pos < len; ++pos) {
      for (int h = 0; h < n_kv; ++h) {
        std::copy_n(&d.k[(static_cast<size_t>(h) * cap + pos) * hd], hd, &k[h * hd]);
        std::copy_n(&d.v[(static_cast<size_t>(h) * cap + pos) * hd], hd, &v[h * hd]);
      }
      appended.Append(pos, k.data(), v.data());
    }
    ASSERT_TRUE(AnyNonZeroCode(packed));
    EXPECT_EQ(appended.length(), len);
    ExpectSameArrays(packed, appended, absl::StrCat("bits ", p.bits, " G ", p.group, " R ", p.residual));
  }
}

// Chunked Pack fed with Materialize(start) + the chunk's original rows gives
// the arrays of one Pack of the original data (everything not yet quantized
// is exact, so each value is quantized once, from its exact value), and
// mixing in Appends changes nothing either.
TEST(QuantKvCpu, ChunkedPackWithMaterializedHistoryEqualsOneShot) {
  const int n_kv = 2, hd = 128, cap = 700;
  const QuantParams p{2, 64, 128};
  const KvData d = RandomKv(n_kv, cap, hd, 77);
  QuantShape shape{.n_kv_heads = n_kv, .head_dim = hd, .capacity = cap, .params = p};
  const int64_t stride = static_cast<int64_t>(cap) * hd;
  QuantKvCpu one_shot(shape);
  one_shot.Pack(d.k.data(), d.v.data(), stride, 0, 699);
  for (const std::vector<int>& cuts : {std::vector<int>{1, 129, 130, 400, 699}, std::vector<int>{127, 128, 256, 699},
                                       std::vector<int>{300, 301, 302, 699}}) {
    QuantKvCpu chunked(shape);
    int start = 0;
    for (int end : cuts) {
      std::vector<float> k(d.k.size(), NAN), v(d.v.size(), NAN);
      chunked.Materialize(start, k.data(), v.data(), stride);
      for (int h = 0; h < n_kv; ++h) {
        std::copy(&d.k[h * stride + start * hd], &d.k[h * stride + end * hd], &k[h * stride + start * hd]);
        std::copy(&d.v[h * stride + start * hd], &d.v[h * stride + end * hd], &v[h * stride + start * hd]);
      }
      if (end - start == 1 && start % 2 == 0) {
        std::vector<float> kk(n_kv * hd), vv(n_kv * hd);
        for (int h = 0; h < n_kv; ++h) {
          std::copy_n(&k[h * stride + start * hd], hd, &kk[h * hd]);
          std::copy_n(&v[h * stride + start * hd], hd, &vv[h * hd]);
        }
        chunked.Append(start, kk.data(), vv.data());
      } else {
        chunked.Pack(k.data(), v.data(), stride, start, end);
      }
      start = end;
    }
    ExpectSameArrays(one_shot, chunked, absl::StrCat("cuts ending ", cuts[0]));
  }
}

// Materialize: residual rows exact, quantized rows within s/2 of the
// original, rows >= len untouched.
TEST(QuantKvCpu, MaterializeIsExactInTheResidualAndBoundedElsewhere) {
  const int n_kv = 3, hd = 64, len = 521, rows = 530;
  const QuantParams p{2, 32, 128};
  const KvData d = RandomKv(n_kv, rows, hd, 91);
  QuantShape shape{.n_kv_heads = n_kv, .head_dim = hd, .capacity = rows, .params = p};
  QuantKvCpu cache(shape);
  const int64_t stride = static_cast<int64_t>(rows) * hd;
  cache.Pack(d.k.data(), d.v.data(), stride, 0, len);
  std::vector<float> k(d.k.size(), NAN), v(d.v.size(), NAN);
  cache.Materialize(len, k.data(), v.data(), stride);
  const int qk = QuantizedKeys(len, p.residual), qv = QuantizedValues(len, p.residual);
  ASSERT_EQ(qk, 512);
  ASSERT_EQ(qv, 393);
  int64_t inexact = 0;
  for (int h = 0; h < n_kv; ++h) {
    for (int t = 0; t < rows; ++t) {
      for (int c = 0; c < hd; ++c) {
        const int64_t i = h * stride + static_cast<int64_t>(t) * hd + c;
        if (t >= len) {
          ASSERT_TRUE(std::isnan(k[i]) && std::isnan(v[i])) << "row " << t << " written";
          continue;
        }
        if (t >= qk) {
          ASSERT_EQ(k[i], d.k[i]);
        } else {
          const QuantGroupParams kp = cache.k_params()[h * shape.k_params_per_head() + (t / p.group) * hd + c];
          ASSERT_LE(std::fabs(k[i] - d.k[i]), ErrorBound(kp, d.k[i])) << "K h " << h << " t " << t << " c " << c;
          inexact += k[i] != d.k[i];
        }
        if (t >= qv) {
          ASSERT_EQ(v[i], d.v[i]);
        } else {
          const QuantGroupParams vp =
              cache.v_params()[h * shape.v_params_per_head() + static_cast<int64_t>(t) * shape.value_groups() + c / p.group];
          ASSERT_LE(std::fabs(v[i] - d.v[i]), ErrorBound(vp, d.v[i])) << "V h " << h << " t " << t << " c " << c;
        }
      }
    }
  }
  EXPECT_GT(inexact, 512 * hd) << "most quantized keys differ from the original";
}

// On random data, more bits -> attention output closer to full precision.
TEST(QuantKvCpu, MoreBitsAreCloserToFullPrecision) {
  const int n_heads = 12, n_kv = 4, hd = 64, len = 1000;
  const KvData d = RandomKv(n_kv, len, hd, 2024);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  double err[5] = {};
  for (int bits : {1, 2, 4}) {
    QuantKvCpu cache({.n_kv_heads = n_kv, .head_dim = hd, .capacity = len, .params = {bits, 64, 128}});
    cache.Pack(d.k.data(), d.v.data(), static_cast<int64_t>(len) * hd, 0, len);
    double sq = 0;
    for (int trial = 0; trial < 8; ++trial) {
      // Sharper queries (x3) so the softmax is not near-uniform.
      auto q = RandomVec(static_cast<size_t>(n_heads) * hd, 500 + trial);
      for (float& x : q) x *= 3;
      const auto exact = ExactAttend(d, n_kv, len, hd, q.data(), n_heads, scale);
      std::vector<float> got(exact.size(), NAN);
      cache.Attend(q.data(), n_heads, len, scale, got.data());
      for (size_t i = 0; i < got.size(); ++i) sq += (got[i] - exact[i]) * (got[i] - exact[i]);
    }
    err[bits] = std::sqrt(sq / (8.0 * n_heads * hd));
  }
  std::printf("attention RMS error vs full precision: 1-bit %.4g, 2-bit %.4g, 4-bit %.4g\n", err[1], err[2], err[4]);
  EXPECT_LT(err[4], err[2]);
  EXPECT_LT(err[2], err[1]);
  EXPECT_LT(err[4], 0.5 * err[2]);
  EXPECT_GT(err[1], 1e-3) << "1-bit must differ measurably";
}

TEST(QuantKvCpu, PoisonedOutputsAreFullyWritten) {
  const int n_heads = 9, n_kv = 3, hd = 64, len = 200;
  const KvData d = RandomKv(n_kv, len, hd, 3);
  QuantKvCpu cache({.n_kv_heads = n_kv, .head_dim = hd, .capacity = len, .params = {1, 64, 64}});
  cache.Pack(d.k.data(), d.v.data(), static_cast<int64_t>(len) * hd, 0, len);
  const auto q = RandomVec(static_cast<size_t>(n_heads) * hd, 4);
  std::vector<float> out(q.size(), NAN);
  cache.Attend(q.data(), n_heads, len, 0.125f, out.data());
  for (size_t i = 0; i < out.size(); ++i) ASSERT_TRUE(std::isfinite(out[i])) << i;
  std::vector<float> k(d.k.size(), NAN), v(d.v.size(), NAN);
  cache.Materialize(len, k.data(), v.data(), static_cast<int64_t>(len) * hd);
  for (size_t i = 0; i < k.size(); ++i) ASSERT_TRUE(std::isfinite(k[i]) && std::isfinite(v[i])) << i;
}

// A single token (len 1) attends to itself: out = v exactly for every head.
TEST(QuantKvCpu, SingleTokenReturnsItsValue) {
  const int hd = 32;
  const KvData d = RandomKv(1, 1, hd, 8);
  QuantKvCpu cache({.n_kv_heads = 1, .head_dim = hd, .capacity = 5, .params = {1, 32, 32}});
  cache.Append(0, d.k.data(), d.v.data());
  const auto q = RandomVec(3 * hd, 9);
  std::vector<float> out(q.size(), NAN);
  cache.Attend(q.data(), 3, 1, 0.2f, out.data());
  for (int i = 0; i < 3 * hd; ++i) ASSERT_EQ(out[i], d.v[i % hd]);
}

}  // namespace
}  // namespace tailorkv::runtime
