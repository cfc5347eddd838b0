// Dequantization is checked against vectors written by
// scripts/make_dequant_vectors.py with the PyPI gguf package's dequantizer.
// Tolerance: exact. Every output float must have the same bits as gguf's
// (0 ulp) for every type: both sides compute in float32 with the same
// operation order, and ggml_types.cc is built without FP contraction.
#include "model/ggml_types.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tailorkv::model {
namespace {

std::string TestdataPath(const std::string& file) {
  return std::string(TAILORKV_SOURCE_DIR) + "/gpu-worker/model/testdata/" + file;
}

std::vector<uint8_t> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << "cannot open " << path
                         << " (regenerate with scripts/make_dequant_vectors.py)";
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

template <typename T>
T Get(const std::vector<uint8_t>& b, size_t& pos) {
  T v{};
  if (pos + sizeof(T) <= b.size()) std::memcpy(&v, b.data() + pos, sizeof(T));
  pos += sizeof(T);
  return v;
}

struct DequantVector {
  uint32_t type = 0;
  std::vector<uint8_t> src;
  std::vector<float> expected;
};

DequantVector LoadDequantVector(const std::string& type_name) {
  const std::vector<uint8_t> b = ReadFile(TestdataPath("dq_" + type_name + ".testvec"));
  DequantVector v;
  size_t pos = 0;
  if (b.size() < 16 || std::memcmp(b.data(), "TKVD", 4) != 0) {
    ADD_FAILURE() << "bad vector file for " << type_name;
    return v;
  }
  pos = 4;
  v.type = Get<uint32_t>(b, pos);
  const uint32_t n = Get<uint32_t>(b, pos);
  const uint32_t n_src = Get<uint32_t>(b, pos);
  if (b.size() != pos + n_src + size_t{n} * 4) {
    ADD_FAILURE() << "vector file for " << type_name << " has the wrong size";
    return v;
  }
  v.src.assign(b.begin() + pos, b.begin() + pos + n_src);
  v.expected.resize(n);
  std::memcpy(v.expected.data(), b.data() + pos + n_src, size_t{n} * 4);
  return v;
}

// Index of the first float whose bits differ, or -1.
int64_t FirstBitMismatch(const std::vector<float>& got, const std::vector<float>& want, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (std::bit_cast<uint32_t>(got[i]) != std::bit_cast<uint32_t>(want[i])) {
      return static_cast<int64_t>(i);
    }
  }
  return -1;
}

class DequantizeVectorsTest : public ::testing::TestWithParam<std::string> {};

TEST_P(DequantizeVectorsTest, MatchesGgufPackageBitExactly) {
  const DequantVector v = LoadDequantVector(GetParam());
  ASSERT_FALSE(v.expected.empty());
  auto traits = TraitsOf(v.type);
  ASSERT_TRUE(traits.ok()) << traits.status();
  EXPECT_EQ(traits->name, GetParam());

  // Non-trivial: most values nonzero, several distinct, all finite.
  size_t nonzero = 0;
  for (float x : v.expected) {
    ASSERT_TRUE(std::isfinite(x));
    nonzero += x != 0.0f;
  }
  EXPECT_GT(nonzero, v.expected.size() / 2) << "test vector is mostly zeros";
  EXPECT_GT(std::count_if(v.expected.begin(), v.expected.end(),
                          [&](float x) { return x != v.expected[0]; }),
            0);

  const int64_t n = static_cast<int64_t>(v.expected.size());
  const int64_t n_blocks = n / traits->block_elems;
  ASSERT_EQ(static_cast<int64_t>(v.src.size()), n_blocks * traits->block_bytes);
  const GgmlType type = static_cast<GgmlType>(v.type);

  // Whole vector (7 blocks for quantized types, 231 elements for floats),
  // then a 1-block prefix. Outputs start poisoned with NaN so an element the
  // dequantizer skips cannot pass.
  for (int64_t blocks : {n_blocks, int64_t{1}}) {
    const int64_t elems = blocks * traits->block_elems;
    std::vector<float> out(static_cast<size_t>(elems) + 1, std::numeric_limits<float>::quiet_NaN());
    ASSERT_TRUE(Dequantize(type, v.src.data(), static_cast<size_t>(blocks * traits->block_bytes),
                           out.data(), elems)
                    .ok());
    const int64_t bad = FirstBitMismatch(out, v.expected, static_cast<size_t>(elems));
    EXPECT_EQ(bad, -1) << GetParam() << " with " << blocks << " blocks: element " << bad << " is "
                       << out[bad < 0 ? 0 : bad] << ", gguf gives "
                       << v.expected[bad < 0 ? 0 : bad];
    EXPECT_TRUE(std::isnan(out[static_cast<size_t>(elems)])) << "wrote past the end";
  }
}

INSTANTIATE_TEST_SUITE_P(AllTypes, DequantizeVectorsTest,
                         ::testing::Values("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q4_K",
                                           "Q6_K"),
                         [](const auto& info) { return info.param; });

TEST(DequantizeTest, RejectsSizeMismatches) {
  std::vector<uint8_t> src(34 * 2);
  std::vector<float> dst(64);
  EXPECT_TRUE(Dequantize(GgmlType::kQ8_0, src.data(), src.size(), dst.data(), 64).ok());
  EXPECT_EQ(Dequantize(GgmlType::kQ8_0, src.data(), src.size(), dst.data(), 48).code(),
            absl::StatusCode::kInvalidArgument);  // not a multiple of 32
  EXPECT_EQ(Dequantize(GgmlType::kQ8_0, src.data(), src.size() - 1, dst.data(), 64).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Dequantize(static_cast<GgmlType>(13), src.data(), src.size(), dst.data(), 64).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(GgmlTypesTest, TraitsMatchGgmlBlockGeometry) {
  struct Want {
    GgmlType t;
    int64_t elems, bytes;
  };
  for (const Want& w :
       {Want{GgmlType::kF32, 1, 4}, Want{GgmlType::kF16, 1, 2}, Want{GgmlType::kBF16, 1, 2},
        Want{GgmlType::kQ4_0, 32, 18}, Want{GgmlType::kQ4_1, 32, 20}, Want{GgmlType::kQ8_0, 32, 34},
        Want{GgmlType::kQ4_K, 256, 144}, Want{GgmlType::kQ6_K, 256, 210}}) {
    auto t = TraitsOf(static_cast<uint32_t>(w.t));
    ASSERT_TRUE(t.ok());
    EXPECT_EQ(t->block_elems, w.elems) << t->name;
    EXPECT_EQ(t->block_bytes, w.bytes) << t->name;
  }
  for (uint32_t unknown : {4u, 5u, 6u, 7u, 9u, 10u, 11u, 13u, 15u, 29u, 31u, 1000u}) {
    EXPECT_EQ(TraitsOf(unknown).status().code(), absl::StatusCode::kInvalidArgument) << unknown;
  }
}

TEST(HalfConversionTest, MatchesNumpyAndGgufRounding) {
  const std::vector<uint8_t> b = ReadFile(TestdataPath("conv_f32.testvec"));
  ASSERT_GE(b.size(), 8u);
  ASSERT_EQ(std::memcmp(b.data(), "TKVC", 4), 0);
  size_t pos = 4;
  const uint32_t n = Get<uint32_t>(b, pos);
  ASSERT_EQ(b.size(), 8 + size_t{n} * 8);
  int f16_bad = 0, bf16_bad = 0, nonzero = 0;
  for (uint32_t i = 0; i < n; ++i) {
    float x;
    uint16_t want_h, want_b;
    std::memcpy(&x, b.data() + 8 + 4 * i, 4);
    std::memcpy(&want_h, b.data() + 8 + 4 * n + 2 * i, 2);
    std::memcpy(&want_b, b.data() + 8 + 6 * n + 2 * i, 2);
    nonzero += want_h != 0;
    const uint16_t h = FloatToHalf(x), bf = FloatToBf16(x);
    if (h != want_h && f16_bad++ < 5) {
      ADD_FAILURE() << "FloatToHalf(" << x << ") = 0x" << std::hex << h << ", numpy 0x" << want_h;
    }
    if (bf != want_b && bf16_bad++ < 5) {
      ADD_FAILURE() << "FloatToBf16(" << x << ") = 0x" << std::hex << bf << ", gguf 0x" << want_b;
    }
  }
  EXPECT_EQ(f16_bad, 0);
  EXPECT_EQ(bf16_bad, 0);
  EXPECT_GT(nonzero, static_cast<int>(n / 2));
}

TEST(HalfConversionTest, EveryHalfRoundTrips) {
  for (uint32_t i = 0; i < 65536; ++i) {
    const uint16_t h = static_cast<uint16_t>(i);
    const float f = HalfToFloat(h);
    if ((h & 0x7C00) == 0x7C00 && (h & 0x3FF) != 0) {
      ASSERT_TRUE(std::isnan(f)) << i;
      ASSERT_TRUE(std::isnan(HalfToFloat(FloatToHalf(f)))) << i;
      continue;
    }
    ASSERT_EQ(FloatToHalf(f), h) << "half 0x" << std::hex << i << " -> " << f;
  }
  EXPECT_EQ(HalfToFloat(0x3C00), 1.0f);
  EXPECT_EQ(HalfToFloat(0xC000), -2.0f);
  EXPECT_EQ(HalfToFloat(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(HalfToFloat(0x7BFF), 65504.0f);
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7C00);  // rounds up to infinity
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -26)), 0x0000);
}

TEST(HalfConversionTest, Bf16RoundTripsAndRoundsToNearestEven) {
  for (uint32_t i = 0; i < 65536; ++i) {
    const uint16_t h = static_cast<uint16_t>(i);
    const float f = Bf16ToFloat(h);
    if (std::isnan(f)) {
      ASSERT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(f))));
      continue;
    }
    ASSERT_EQ(FloatToBf16(f), h) << i;
  }
  EXPECT_EQ(FloatToBf16(std::bit_cast<float>(0x3F808000u)), 0x3F80);  // tie, even stays
  EXPECT_EQ(FloatToBf16(std::bit_cast<float>(0x3F818000u)), 0x3F82);  // tie, odd rounds up
  EXPECT_EQ(FloatToBf16(std::bit_cast<float>(0x3F808001u)), 0x3F81);
}

}  // namespace
}  // namespace tailorkv::model
