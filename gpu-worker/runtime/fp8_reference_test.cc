// FloatToFp8E4M3 / Fp8E4M3ToFloat against the format's definition:
// - decoding against the closed formula (m * 2^-9, or (1 + m/8) * 2^(e-7));
// - encoding against a brute-force oracle (nearest of the 127 finite
//   magnitudes, ties to the even code) over every bf16 pattern, a seeded
//   sample of float bit patterns, and every midpoint between adjacent codes
//   (and its neighbours one float ulp away);
// - round trip of all 256 codes, known values, saturation, NaN, signed
//   zero, monotonicity over a sweep of floats.
#include "runtime/fp8_reference.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

namespace tailorkv::runtime {
namespace {

float FromBits(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

uint32_t Bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

bool IsNanCode(uint8_t c) { return (c & 0x7F) == 0x7F; }

// The value of a non-NaN code, from the format's definition (double is exact).
double Formula(uint8_t c) {
  const int e = (c >> 3) & 0xF, m = c & 7;
  const double mag = e == 0 ? std::ldexp(m, -9) : std::ldexp(1.0 + m / 8.0, e - 7);
  return (c & 0x80) ? -mag : mag;
}

// Brute force: the nearest finite magnitude code (0x00..0x7E) to |x|, ties
// to the even code (the mantissa's last bit is the code's last bit);
// |x| >= 448 saturates; NaN -> 0x7F with the sign.
uint8_t Oracle(float x) {
  const uint8_t sign = std::signbit(x) ? 0x80 : 0x00;
  if (std::isnan(x)) return sign | 0x7F;
  const double a = std::fabs(static_cast<double>(x));
  if (a >= 448.0) return sign | 0x7E;
  int best = 0;
  double best_d = a;
  for (int c = 1; c <= 0x7E; ++c) {
    const double d = std::fabs(Formula(static_cast<uint8_t>(c)) - a);
    if (d < best_d || (d == best_d && (c & 1) == 0)) {
      best = c;
      best_d = d;
    }
  }
  return sign | static_cast<uint8_t>(best);
}

void ExpectEncodes(float x, uint8_t want) {
  EXPECT_EQ(FloatToFp8E4M3(x), want) << "x = " << x << " (bits 0x" << std::hex << Bits(x) << ")";
}

TEST(Fp8Reference, DecodeMatchesFormula) {
  for (int c = 0; c < 256; ++c) {
    const uint8_t b = static_cast<uint8_t>(c);
    const float f = Fp8E4M3ToFloat(b);
    if (IsNanCode(b)) {
      EXPECT_TRUE(std::isnan(f)) << c;
      EXPECT_EQ(Bits(f), (c & 0x80 ? 0xFFC00000u : 0x7FC00000u)) << c;
    } else {
      EXPECT_EQ(static_cast<double>(f), Formula(b)) << c;
      EXPECT_EQ(std::signbit(f), (c & 0x80) != 0) << c;  // 0x80 is -0.0
    }
  }
  EXPECT_EQ(Fp8E4M3ToFloat(0x7E), 448.0f);
  EXPECT_EQ(Fp8E4M3ToFloat(0x01), std::ldexp(1.0f, -9));
  EXPECT_EQ(Fp8E4M3ToFloat(0x08), std::ldexp(1.0f, -6));
}

TEST(Fp8Reference, AllCodesRoundTrip) {
  int nan_codes = 0;
  for (int c = 0; c < 256; ++c) {
    const uint8_t b = static_cast<uint8_t>(c);
    const uint8_t back = FloatToFp8E4M3(Fp8E4M3ToFloat(b));
    if (IsNanCode(b)) {
      ++nan_codes;
      EXPECT_TRUE(IsNanCode(back)) << c;
      EXPECT_EQ(back, b) << c;  // the sign survives too
    } else {
      EXPECT_EQ(back, b) << c;
    }
  }
  EXPECT_EQ(nan_codes, 2);
}

TEST(Fp8Reference, KnownValues) {
  ExpectEncodes(1.0f, 0x38);
  ExpectEncodes(-1.0f, 0xB8);
  ExpectEncodes(448.0f, 0x7E);
  ExpectEncodes(-448.0f, 0xFE);
  ExpectEncodes(0.0f, 0x00);
  ExpectEncodes(-0.0f, 0x80);
  ExpectEncodes(std::ldexp(1.0f, -9), 0x01);           // smallest subnormal
  ExpectEncodes(std::ldexp(0.5f, -9), 0x00);           // tie with 0: even
  ExpectEncodes(-std::ldexp(0.5f, -9), 0x80);
  ExpectEncodes(std::ldexp(1.5f, -9), 0x02);           // tie between 1 and 2: even
  ExpectEncodes(std::ldexp(2.5f, -9), 0x02);           // tie between 2 and 3: even
  ExpectEncodes(std::ldexp(0.75f, -9), 0x01);
  ExpectEncodes(std::ldexp(1.0f, -6), 0x08);           // smallest normal
  ExpectEncodes(std::ldexp(7.5f, -9), 0x08);           // tie 7 * 2^-9 / 2^-6: even (0x08)
  ExpectEncodes(std::ldexp(6.5f, -9), 0x06);
  ExpectEncodes(std::nextafter(std::ldexp(0.5f, -9), 1.0f), 0x01);
  ExpectEncodes(std::numeric_limits<float>::denorm_min(), 0x00);
  ExpectEncodes(-std::numeric_limits<float>::denorm_min(), 0x80);
  ExpectEncodes(std::numeric_limits<float>::min(), 0x00);
  ExpectEncodes(2.0f, 0x40);
  ExpectEncodes(0.5f, 0x30);
  ExpectEncodes(3.0f, 0x44);
  ExpectEncodes(240.0f, 0x77);
  ExpectEncodes(256.0f, 0x78);
}

TEST(Fp8Reference, SaturationAndNaN) {
  const float inf = std::numeric_limits<float>::infinity();
  for (float x : {448.0f, 449.0f, 463.99f, 464.0f, 479.0f, 480.0f, 1000.0f, 1e30f,
                  std::numeric_limits<float>::max(), inf}) {
    ExpectEncodes(x, 0x7E);
    ExpectEncodes(-x, 0xFE);
  }
  ExpectEncodes(447.0f, 0x7E);   // nearer 448 than 416
  ExpectEncodes(432.0f, 0x7E);   // tie 416 (0x7D) / 448 (0x7E): even
  ExpectEncodes(431.0f, 0x7D);
  ExpectEncodes(std::numeric_limits<float>::quiet_NaN(), 0x7F);
  ExpectEncodes(-std::numeric_limits<float>::quiet_NaN(), 0xFF);
  ExpectEncodes(FromBits(0x7F800001u), 0x7F);  // signalling NaN payload
  ExpectEncodes(FromBits(0xFFBFFFFFu), 0xFF);
}

// Ties to even at normal values: the midpoint between adjacent codes goes to
// the even one, across a binade boundary too; one float ulp either side
// goes to the nearer code.
TEST(Fp8Reference, TiesToEvenAtNormalBoundaries) {
  ExpectEncodes(1.0625f, 0x38);   // 1 (0x38) / 1.125 (0x39)
  ExpectEncodes(1.1875f, 0x3A);   // 1.125 (0x39) / 1.25 (0x3A)
  ExpectEncodes(1.9375f, 0x40);   // 1.875 (0x3F) / 2 (0x40): carry into the exponent
  ExpectEncodes(-1.9375f, 0xC0);
  ExpectEncodes(std::nextafter(1.0625f, 2.0f), 0x39);
  ExpectEncodes(std::nextafter(1.0625f, 0.0f), 0x38);
  ExpectEncodes(std::nextafter(1.9375f, 0.0f), 0x3F);
  ExpectEncodes(std::ldexp(1.0625f, -6), 0x08);  // lowest normal binade
  ExpectEncodes(std::ldexp(1.1875f, -6), 0x0A);
}

// Every midpoint between adjacent codes, and its float neighbours.
TEST(Fp8Reference, MidpointsMatchOracle) {
  int checked = 0;
  for (int c = 0; c < 0x7E; ++c) {
    const float lo = static_cast<float>(Formula(static_cast<uint8_t>(c)));
    const float hi = static_cast<float>(Formula(static_cast<uint8_t>(c + 1)));
    const float mid = 0.5f * (lo + hi);  // exact: a few significant bits
    ASSERT_EQ(static_cast<double>(mid), 0.5 * (Formula(static_cast<uint8_t>(c)) + Formula(static_cast<uint8_t>(c + 1))));
    for (float x : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1000.0f)}) {
      for (float s : {x, -x}) {
        ExpectEncodes(s, Oracle(s));
        ++checked;
      }
    }
    EXPECT_EQ(FloatToFp8E4M3(mid), (c & 1) ? c + 1 : c) << "midpoint of " << c;
  }
  EXPECT_EQ(checked, 0x7E * 6);
}

TEST(Fp8Reference, AllBf16PatternsMatchOracle) {
  int bad = 0;
  for (uint32_t b = 0; b < 65536; ++b) {
    const float x = FromBits(b << 16);
    const uint8_t got = FloatToFp8E4M3(x), want = Oracle(x);
    if (got != want && bad++ < 10) {
      ADD_FAILURE() << "bf16 0x" << std::hex << b << ": got 0x" << int{got} << " want 0x" << int{want};
    }
    EXPECT_EQ(Bf16BitsToFp8E4M3(static_cast<uint16_t>(b)), got);
  }
  EXPECT_EQ(bad, 0);
}

TEST(Fp8Reference, RandomFloatBitsMatchOracle) {
  std::mt19937 rng(1234);
  std::uniform_int_distribution<uint32_t> any;
  std::uniform_real_distribution<float> mag(-12.0f, 10.0f);  // log2 |x|: the fp8 range and past it
  int bad = 0;
  for (int i = 0; i < 200000; ++i) {
    float x = (i % 2) ? FromBits(any(rng)) : std::exp2(mag(rng)) * ((i % 4) == 0 ? -1.0f : 1.0f);
    const uint8_t got = FloatToFp8E4M3(x), want = Oracle(x);
    if (got != want && bad++ < 10) {
      ADD_FAILURE() << "x = " << x << " (0x" << std::hex << Bits(x) << "): got 0x" << int{got}
                    << " want 0x" << int{want};
    }
  }
  EXPECT_EQ(bad, 0);
}

// Non-decreasing over increasing floats in [-500, 500] (fp8 order: a
// negative code's magnitude decreases towards zero), and the decoded value
// always the nearest, so |decode(encode(x)) - x| <= half a step.
TEST(Fp8Reference, MonotoneOverFloatSweep) {
  float prev = -std::numeric_limits<float>::infinity();
  int steps = 0;
  for (float x = -500.0f; x <= 500.0f; x = std::nextafter(x + std::fabs(x) * 1e-4f + 1e-7f, 1e9f)) {
    const float v = Fp8E4M3ToFloat(FloatToFp8E4M3(x));
    ASSERT_GE(v, prev) << "x = " << x;
    prev = v;
    ++steps;
  }
  EXPECT_GT(steps, 10000);
  EXPECT_EQ(prev, 448.0f);
}

TEST(Fp8Reference, Bf16HelpersAreExact) {
  for (int c = 0; c < 256; ++c) {
    const uint8_t b = static_cast<uint8_t>(c);
    const uint16_t h = Fp8E4M3ToBf16Bits(b);
    const float f = FromBits(static_cast<uint32_t>(h) << 16);
    if (IsNanCode(b)) {
      EXPECT_EQ(h, (c & 0x80) ? 0xFFC0 : 0x7FC0) << c;
    } else {
      EXPECT_EQ(Bits(f), Bits(Fp8E4M3ToFloat(b))) << c;  // nothing lost
    }
    EXPECT_EQ(Bf16BitsToFp8E4M3(h), b) << c;
  }
}

}  // namespace
}  // namespace tailorkv::runtime
