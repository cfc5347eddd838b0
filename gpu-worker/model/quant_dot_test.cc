#include "model/quant_dot.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace tailorkv::model {
namespace {

constexpr GgmlType kTypes[] = {GgmlType::kQ4_0, GgmlType::kQ4_1, GgmlType::kQ8_0, GgmlType::kQ4_K,
                               GgmlType::kQ6_K};
constexpr QuantKernel kSimd[] = {QuantKernel::kAvx2, QuantKernel::kAvxVnni, QuantKernel::kAvx512Vnni};

GgmlTypeTraits Traits(GgmlType t) { return *TraitsOf(static_cast<uint32_t>(t)); }

// Random bytes for the quants (every bit pattern is a valid quant) with the
// f16 scales set to finite values of either sign, as real files hold.
std::vector<uint8_t> RandomWeights(GgmlType t, int64_t rows, int64_t cols, std::mt19937& rng) {
  const GgmlTypeTraits tr = Traits(t);
  const int64_t blocks = rows * cols / tr.block_elems;
  std::vector<uint8_t> w(static_cast<size_t>(blocks * tr.block_bytes));
  std::uniform_int_distribution<int> byte(0, 255);
  for (auto& b : w) b = static_cast<uint8_t>(byte(rng));
  std::uniform_real_distribution<float> scale(-0.02f, 0.02f);
  auto put = [&](uint8_t* p, float v) {
    const uint16_t h = FloatToHalf(v);
    std::memcpy(p, &h, 2);
  };
  for (int64_t b = 0; b < blocks; ++b) {
    uint8_t* p = w.data() + b * tr.block_bytes;
    switch (t) {
      case GgmlType::kQ4_0:
      case GgmlType::kQ8_0:
        put(p, scale(rng));
        break;
      case GgmlType::kQ4_1:
      case GgmlType::kQ4_K:
        put(p, scale(rng));
        put(p + 2, scale(rng));
        break;
      case GgmlType::kQ6_K:
        put(p + 208, scale(rng));
        break;
      default:
        break;
    }
  }
  return w;
}

std::vector<float> RandomActs(int64_t n, std::mt19937& rng) {
  std::normal_distribution<float> v(0.0f, 1.5f);
  std::vector<float> x(static_cast<size_t>(n));
  for (auto& e : x) e = v(rng);
  // A block of zeros and one with a single outlier: the scale's edge cases.
  for (int i = 0; i < 32 && i < n; ++i) x[static_cast<size_t>(i)] = 0.0f;
  if (n >= 64) x[40] = 300.0f;
  return x;
}

// Dequantized weights and activations, multiplied in double, and the sum
// of |w x| (the scale of the rounding bounds).
void DoubleDot(GgmlType t, const std::vector<uint8_t>& w, int64_t rows, int64_t cols, const Q8Activations& x,
               std::vector<double>* y, std::vector<double>* mag) {
  const int64_t row_bytes = cols / Traits(t).block_elems * Traits(t).block_bytes;
  std::vector<float> wr(static_cast<size_t>(cols));
  y->assign(static_cast<size_t>(x.rows * rows), 0.0);
  mag->assign(y->size(), 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    ASSERT_TRUE(Dequantize(t, w.data() + r * row_bytes, static_cast<size_t>(row_bytes), wr.data(), cols).ok());
    for (int64_t i = 0; i < x.rows; ++i) {
      double s = 0, m = 0;
      for (int64_t c = 0; c < cols; ++c) {
        const double xv = static_cast<double>(x.d[static_cast<size_t>((i * cols + c) / 32)]) *
                          x.q[static_cast<size_t>(i * cols + c)];
        s += wr[static_cast<size_t>(c)] * xv;
        m += std::fabs(wr[static_cast<size_t>(c)] * xv);
      }
      (*y)[static_cast<size_t>(i * rows + r)] = s;
      (*mag)[static_cast<size_t>(i * rows + r)] = m;
    }
  }
}

TEST(QuantizeActivationsTest, ScalesRoundsAndSumsPerBlock) {
  std::vector<float> x(64, 0.0f);
  for (int i = 0; i < 32; ++i) x[32 + i] = static_cast<float>(i - 16) * 0.5f;  // max |x| = 8
  x[33] = 0.0312f;  // 0.0312 / (8 / 127) = 0.495: rounds to 0
  Q8Activations a;
  ASSERT_TRUE(QuantizeActivations(x.data(), 1, 64, &a).ok());
  EXPECT_EQ(a.d[0], 0.0f);  // the all-zero block
  EXPECT_EQ(a.isum[0], 0);
  for (int i = 0; i < 32; ++i) EXPECT_EQ(a.q[static_cast<size_t>(i)], 0);
  EXPECT_EQ(a.d[1], 8.0f / 127.0f);
  EXPECT_EQ(a.q[32], -127);  // -8
  EXPECT_EQ(a.q[33], 0);
  EXPECT_EQ(a.q[34], static_cast<int8_t>(std::nearbyint(-7.0f * (127.0f / 8.0f))));
  int32_t sum = 0;
  for (int i = 32; i < 64; ++i) sum += a.q[static_cast<size_t>(i)];
  EXPECT_EQ(a.isum[1], sum);
}

TEST(QuantizeActivationsTest, RefusesBadShapesAndNonFiniteValues) {
  std::vector<float> x(96, 1.0f);
  Q8Activations a;
  EXPECT_EQ(QuantizeActivations(x.data(), 1, 48, &a).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(QuantizeActivations(x.data(), 0, 32, &a).code(), absl::StatusCode::kInvalidArgument);
  x[70] = std::numeric_limits<float>::quiet_NaN();
  const absl::Status s = QuantizeActivations(x.data(), 3, 32, &a);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("x[2][6]"), std::string::npos) << s;
}

// The reference decodes every format as the dequantizers do: against the
// dequantized weights times the dequantized activations, in double.
TEST(QuantMatmulTest, ReferenceMatchesTheDequantizedProduct) {
  std::mt19937 rng(11);
  for (GgmlType t : kTypes) {
    const int64_t blk = Traits(t).block_elems;
    for (int64_t cols : {blk, 3 * blk, blk == 32 ? int64_t{608} : int64_t{512}}) {
      const int64_t rows = 7;
      SCOPED_TRACE(testing::Message() << Traits(t).name << " cols " << cols);
      const auto w = RandomWeights(t, rows, cols, rng);
      const auto xf = RandomActs(2 * cols, rng);
      Q8Activations x;
      ASSERT_TRUE(QuantizeActivations(xf.data(), 2, cols, &x).ok());
      std::vector<float> y(2 * rows, std::numeric_limits<float>::quiet_NaN());
      ASSERT_TRUE(QuantMatmul(t, w.data(), static_cast<int64_t>(w.size()), rows, cols, x, y.data(), false,
                              QuantKernel::kReference)
                      .ok());
      std::vector<double> want, mag;
      DoubleDot(t, w, rows, cols, x, &want, &mag);
      for (size_t k = 0; k < y.size(); ++k) {
        EXPECT_NEAR(y[k], want[k], 1e-5 * mag[k] + 1e-30) << "output " << k;
      }
    }
  }
}

// Every SIMD kernel this CPU has against the reference, on odd shapes, in
// the threaded path too; each row's result alone equals it within a batch.
TEST(QuantMatmulTest, SimdKernelsMatchTheReference) {
  std::mt19937 rng(12);
  int ran = 0;
  for (QuantKernel k : kSimd) {
    if (!QuantKernelAvailable(k)) continue;
    for (GgmlType t : kTypes) {
      const int64_t blk = Traits(t).block_elems;
      for (auto [rows, cols] :
           {std::pair<int64_t, int64_t>{1, blk}, {6, 2 * blk}, {33, 3 * blk}, {1031, blk == 32 ? 544 : 512}}) {
        SCOPED_TRACE(testing::Message() << Traits(t).name << " kernel " << static_cast<int>(k) << " " << rows << "x"
                                        << cols);
        const auto w = RandomWeights(t, rows, cols, rng);
        const int64_t n = 3;
        const auto xf = RandomActs(n * cols, rng);
        Q8Activations x;
        ASSERT_TRUE(QuantizeActivations(xf.data(), n, cols, &x).ok());
        std::vector<float> ref(n * rows), got(n * rows, std::numeric_limits<float>::quiet_NaN());
        const int64_t wb = static_cast<int64_t>(w.size());
        ASSERT_TRUE(QuantMatmul(t, w.data(), wb, rows, cols, x, ref.data(), false, QuantKernel::kReference).ok());
        ASSERT_TRUE(QuantMatmul(t, w.data(), wb, rows, cols, x, got.data(), false, k).ok());
        std::vector<double> exact, mag;
        DoubleDot(t, w, rows, cols, x, &exact, &mag);
        for (size_t i = 0; i < got.size(); ++i) {
          ASSERT_NEAR(got[i], ref[i], 1e-5 * mag[i] + 1e-30) << "output " << i;
        }
        // Row 1 of the activations alone: bit-identical to its row in the batch.
        Q8Activations one;
        ASSERT_TRUE(QuantizeActivations(xf.data() + cols, 1, cols, &one).ok());
        std::vector<float> alone(rows);
        ASSERT_TRUE(QuantMatmul(t, w.data(), wb, rows, cols, one, alone.data(), false, k).ok());
        for (int64_t r = 0; r < rows; ++r) ASSERT_EQ(alone[r], got[rows + r]) << "row " << r;
        // A weight row alone (the one-row kernel) equals it among its
        // neighbours (rows go four at a time where a kernel has that).
        const int64_t rb = wb / rows;
        for (int64_t r : {int64_t{0}, rows / 2, rows - 1}) {
          std::vector<float> single(n);
          ASSERT_TRUE(QuantMatmul(t, w.data() + r * rb, rb, 1, cols, x, single.data(), false, k).ok());
          for (int64_t i = 0; i < n; ++i) ASSERT_EQ(single[i], got[i * rows + r]) << "weight row " << r;
        }
        ++ran;
      }
    }
  }
  if (ran == 0) GTEST_SKIP() << "this CPU has none of AVX2+FMA, AVX-VNNI, AVX-512 VNNI";
}

// Extreme quants: Q8_0 weights of -128 and 127 against activations of +-127
// (the sign trick's edge), Q6_K's 0 and 63, nibbles of 15: integer sums
// stay exact, so one block's result equals the reference's but for the
// order of fp32 operations.
TEST(QuantMatmulTest, ExtremeQuantsStayExact) {
  for (QuantKernel k : {QuantKernel::kReference, QuantKernel::kAvx2, QuantKernel::kAvxVnni, QuantKernel::kAvx512Vnni}) {
    if (!QuantKernelAvailable(k)) continue;
    for (GgmlType t : kTypes) {
      const GgmlTypeTraits tr = Traits(t);
      const int64_t cols = tr.block_elems;
      std::vector<uint8_t> w(static_cast<size_t>(tr.block_bytes), 0xFF);  // nibbles 15, int8 -1, q6 63
      if (t == GgmlType::kQ8_0) {
        for (int i = 0; i < 32; ++i) w[2 + i] = i % 2 ? 0x80 : 0x7F;  // -128, 127
      }
      // Scales of 1.0 (f16 0x3C00), mins 0, K-quant scale bytes as set below.
      auto one = [&](size_t at) { w[at] = 0x00, w[at + 1] = 0x3C; };
      switch (t) {
        case GgmlType::kQ4_0: case GgmlType::kQ8_0: one(0); break;
        case GgmlType::kQ4_1: one(0); w[2] = w[3] = 0; break;
        case GgmlType::kQ4_K: one(0); w[2] = w[3] = 0; for (int i = 4; i < 16; ++i) w[i] = 1; break;
        case GgmlType::kQ6_K: one(208); for (int i = 192; i < 208; ++i) w[i] = 1; break;
        default: break;
      }
      std::vector<float> xf(static_cast<size_t>(cols));
      for (int64_t i = 0; i < cols; ++i) xf[static_cast<size_t>(i)] = i % 3 ? 127.0f : -127.0f;
      Q8Activations x;
      ASSERT_TRUE(QuantizeActivations(xf.data(), 1, cols, &x).ok());
      std::vector<double> exact, mag;
      DoubleDot(t, w, 1, cols, x, &exact, &mag);
      float y = std::numeric_limits<float>::quiet_NaN();
      ASSERT_TRUE(QuantMatmul(t, w.data(), static_cast<int64_t>(w.size()), 1, cols, x, &y, false, k).ok());
      EXPECT_NEAR(y, exact[0], 1e-6 * mag[0]) << tr.name << " kernel " << static_cast<int>(k);
      EXPECT_NE(exact[0], 0.0) << tr.name;  // the case is not trivially zero
    }
  }
}

TEST(QuantMatmulTest, AccumulateAddsOntoTheOutput) {
  std::mt19937 rng(13);
  const int64_t rows = 5, cols = 64;
  const auto w = RandomWeights(GgmlType::kQ4_1, rows, cols, rng);
  const auto xf = RandomActs(cols, rng);
  Q8Activations x;
  ASSERT_TRUE(QuantizeActivations(xf.data(), 1, cols, &x).ok());
  std::vector<float> y(rows), acc(rows, 2.5f);
  ASSERT_TRUE(QuantMatmul(GgmlType::kQ4_1, w.data(), static_cast<int64_t>(w.size()), rows, cols, x, y.data(), false).ok());
  ASSERT_TRUE(QuantMatmul(GgmlType::kQ4_1, w.data(), static_cast<int64_t>(w.size()), rows, cols, x, acc.data(), true).ok());
  for (int64_t r = 0; r < rows; ++r) EXPECT_EQ(acc[r], 2.5f + y[r]);
}

TEST(QuantMatmulTest, AGroupGivesEachProductItsOwnResult) {
  // Mixed types and odd row counts, two activation rows; one product
  // accumulates. Outputs are poisoned first so an unwritten value shows.
  std::mt19937 rng(21);
  constexpr int64_t cols = 512, n = 2;
  const std::vector<std::pair<GgmlType, int64_t>> shapes = {
      {GgmlType::kQ4_1, 37}, {GgmlType::kQ6_K, 5}, {GgmlType::kQ8_0, 300}, {GgmlType::kQ4_K, 1}};
  const auto xf = RandomActs(n * cols, rng);
  Q8Activations x;
  ASSERT_TRUE(QuantizeActivations(xf.data(), n, cols, &x).ok());
  std::vector<std::vector<uint8_t>> w;
  std::vector<std::vector<float>> alone, grouped;
  std::vector<QuantProduct> group;
  for (size_t g = 0; g < shapes.size(); ++g) {
    const auto [type, rows] = shapes[g];
    w.push_back(RandomWeights(type, rows, cols, rng));
    const bool acc = g == 2;
    alone.emplace_back(n * rows, acc ? 0.5f : std::numeric_limits<float>::quiet_NaN());
    grouped.emplace_back(n * rows, acc ? 0.5f : std::numeric_limits<float>::quiet_NaN());
    ASSERT_TRUE(QuantMatmul(type, w[g].data(), static_cast<int64_t>(w[g].size()), rows, cols, x, alone[g].data(),
                            acc).ok());
  }
  for (size_t g = 0; g < shapes.size(); ++g) {
    group.push_back({shapes[g].first, w[g].data(), static_cast<int64_t>(w[g].size()), shapes[g].second,
                     grouped[g].data(), g == 2});
  }
  ASSERT_TRUE(QuantMatmulGroup(group, x).ok());
  for (size_t g = 0; g < shapes.size(); ++g) {
    for (size_t i = 0; i < alone[g].size(); ++i) {
      ASSERT_TRUE(std::isfinite(grouped[g][i])) << "product " << g << " value " << i;
      ASSERT_EQ(grouped[g][i], alone[g][i]) << "product " << g << " value " << i;
    }
  }
  // A bad product anywhere refuses the whole group, names it, writes nothing.
  std::vector<float> before = grouped[0];
  group[3].w_bytes -= 1;
  const absl::Status s = QuantMatmulGroup(group, x);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("product 3"), std::string::npos) << s;
  EXPECT_EQ(grouped[0], before);
  EXPECT_EQ(QuantMatmulGroup({}, x).code(), absl::StatusCode::kInvalidArgument);
}

// F16 and BF16 weights multiply the float activations (x.source): the
// reference adds w_k x_k in order in fp32, against double; the SIMD kernel
// within the same bound as the block types; rows alone equal rows among
// neighbours and in a group with a block type; no source is refused.
TEST(QuantMatmulTest, HalfWeightsMultiplyTheFloatActivations) {
  std::mt19937 rng(41);
  std::normal_distribution<float> v(0.0f, 0.05f);
  for (GgmlType t : {GgmlType::kF16, GgmlType::kBF16}) {
    for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1, 32}, {6, 64}, {37, 576}}) {
      SCOPED_TRACE(testing::Message() << Traits(t).name << " " << rows << "x" << cols);
      std::vector<uint8_t> w(static_cast<size_t>(rows * cols * 2));
      for (int64_t i = 0; i < rows * cols; ++i) {
        const float f = v(rng);
        const uint16_t h = t == GgmlType::kF16 ? FloatToHalf(f) : FloatToBf16(f);
        std::memcpy(w.data() + 2 * i, &h, 2);
      }
      const int64_t n = 2;
      const auto xf = RandomActs(n * cols, rng);
      Q8Activations x;
      ASSERT_TRUE(QuantizeActivations(xf.data(), n, cols, &x).ok());
      ASSERT_EQ(x.source, xf.data());
      std::vector<float> wf(static_cast<size_t>(rows * cols));
      ASSERT_TRUE(Dequantize(t, w.data(), w.size(), wf.data(), rows * cols).ok());
      const int64_t wb = static_cast<int64_t>(w.size());
      std::vector<float> ref(n * rows, std::numeric_limits<float>::quiet_NaN());
      ASSERT_TRUE(QuantMatmul(t, w.data(), wb, rows, cols, x, ref.data(), false, QuantKernel::kReference).ok());
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t r = 0; r < rows; ++r) {
          double exact = 0, mag = 0;
          float in_order = 0.0f;
          for (int64_t k = 0; k < cols; ++k) {
            const float p = wf[r * cols + k] * xf[i * cols + k];
            in_order += p;
            exact += static_cast<double>(wf[r * cols + k]) * xf[i * cols + k];
            mag += std::fabs(static_cast<double>(p));
          }
          ASSERT_EQ(ref[i * rows + r], in_order) << "reference, row " << r;
          for (QuantKernel k : kSimd) {
            if (!QuantKernelAvailable(k)) continue;
            std::vector<float> got(n * rows, std::numeric_limits<float>::quiet_NaN());
            ASSERT_TRUE(QuantMatmul(t, w.data(), wb, rows, cols, x, got.data(), false, k).ok());
            ASSERT_NEAR(got[i * rows + r], exact, 1e-5 * mag + 1e-30) << "kernel " << static_cast<int>(k);
            std::vector<float> alone(n);
            ASSERT_TRUE(QuantMatmul(t, w.data() + r * cols * 2, cols * 2, 1, cols, x, alone.data(), false, k).ok());
            ASSERT_EQ(alone[i], got[i * rows + r]) << "weight row " << r << " alone";
          }
        }
      }
      // In a group beside a block type, each product is what it is alone.
      const auto wq = RandomWeights(GgmlType::kQ4_1, 5, cols, rng);
      std::vector<float> half_alone(n * rows), q_alone(n * 5), half_g(n * rows), q_g(n * 5);
      ASSERT_TRUE(QuantMatmul(t, w.data(), wb, rows, cols, x, half_alone.data(), false).ok());
      ASSERT_TRUE(QuantMatmul(GgmlType::kQ4_1, wq.data(), static_cast<int64_t>(wq.size()), 5, cols, x, q_alone.data(),
                              false).ok());
      const std::vector<QuantProduct> group = {{t, w.data(), wb, rows, half_g.data(), false},
                                               {GgmlType::kQ4_1, wq.data(), static_cast<int64_t>(wq.size()), 5,
                                                q_g.data(), false}};
      ASSERT_TRUE(QuantMatmulGroup(group, x).ok());
      EXPECT_EQ(half_g, half_alone);
      EXPECT_EQ(q_g, q_alone);
      // Without the float rows a half product cannot run.
      Q8Activations no_source = x;
      no_source.source = nullptr;
      const absl::Status s = QuantMatmul(t, w.data(), wb, rows, cols, no_source, half_g.data(), false);
      EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
      EXPECT_NE(s.message().find("x.source"), std::string::npos) << s;
    }
  }
}

TEST(QuantMatmulTest, RefusesArgumentsThatDoNotFit) {
  std::mt19937 rng(14);
  const auto w = RandomWeights(GgmlType::kQ4_K, 2, 256, rng);
  const auto xf = RandomActs(256, rng);
  Q8Activations x;
  ASSERT_TRUE(QuantizeActivations(xf.data(), 1, 256, &x).ok());
  std::vector<float> y(2);
  const int64_t wb = static_cast<int64_t>(w.size());
  auto code = [&](absl::Status s) { return s.code(); };
  EXPECT_EQ(code(QuantMatmul(GgmlType::kQ4_K, w.data(), wb - 1, 2, 256, x, y.data(), false)),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(QuantMatmul(GgmlType::kQ4_K, w.data(), wb, 4, 128, x, y.data(), false)),
            absl::StatusCode::kInvalidArgument);  // 128 is not a multiple of 256
  EXPECT_EQ(code(QuantMatmul(GgmlType::kQ4_0, w.data(), wb, 16, 288, x, y.data(), false)),
            absl::StatusCode::kInvalidArgument);  // x has 256 columns
  EXPECT_EQ(code(QuantMatmul(GgmlType::kF32, w.data(), wb, 2, 256, x, y.data(), false)),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(QuantMatmul(GgmlType::kQ4_K, w.data(), wb, 0, 256, x, y.data(), false)),
            absl::StatusCode::kInvalidArgument);
  const absl::Status s = QuantMatmul(GgmlType::kQ4_K, w.data(), wb + 144, 2, 256, x, y.data(), false);
  EXPECT_NE(s.message().find("w_bytes"), std::string::npos) << s;
}

}  // namespace
}  // namespace tailorkv::model
