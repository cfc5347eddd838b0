#include "runtime/fp8_reference.h"

#include <cstdint>
#include <cstring>

namespace tailorkv::runtime {
namespace {

constexpr uint32_t kF32Inf = 0x7F800000u;
constexpr uint32_t kF32Max448 = 0x43E00000u;     // 448 = 1.75 * 2^8
constexpr uint32_t kF32MinNormal = 0x3C800000u;  // 2^-6, fp8's smallest normal
constexpr uint32_t kF32HalfSub = 0x3A800000u;    // 2^-10, half of fp8's smallest subnormal

uint32_t Bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

float FromBits(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// Round-to-nearest-even of q + rem / 2^shift (0 < shift < 32).
uint32_t RoundShift(uint32_t v, int shift) {
  const uint32_t q = v >> shift;
  const uint32_t rem = v & ((1u << shift) - 1);
  const uint32_t half = 1u << (shift - 1);
  return q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
}

}  // namespace

uint8_t FloatToFp8E4M3(float x) {
  const uint32_t u = Bits(x);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > kF32Inf) return sign | 0x7F;        // NaN
  if (a >= kF32Max448) return sign | 0x7E;    // saturate (inf included)
  if (a >= kF32MinNormal) {
    // Re-bias the exponent (127 -> 7) and round the 23-bit mantissa to 3
    // bits; a mantissa carry steps into the exponent, as it should. The
    // largest result is 0x7E: values in [416, 448) round to at most 448.
    return sign | static_cast<uint8_t>(RoundShift(a - (120u << 23), 20));
  }
  if (a <= kF32HalfSub) return sign;  // below or at the tie with 0: rounds to 0 (even)
  // Subnormal result: code = x / 2^-9 rounded. x = mant * 2^(e - 150) with
  // the implicit bit, so code = mant * 2^(e - 141); e is in [117, 120] here.
  const int e = static_cast<int>(a >> 23);
  const uint32_t mant = (a & 0x7FFFFFu) | 0x800000u;
  return sign | static_cast<uint8_t>(RoundShift(mant, 141 - e));  // 0..8 (8: 2^-6, normal)
}

float Fp8E4M3ToFloat(uint8_t b) {
  const uint32_t sign = static_cast<uint32_t>(b & 0x80u) << 24;
  const uint32_t mag = b & 0x7Fu;
  if (mag == 0x7F) return FromBits(sign | 0x7FC00000u);
  const uint32_t e = mag >> 3, m = mag & 7u;
  if (e == 0) {
    // m * 2^-9: exact in float (a normal float for m > 0).
    return FromBits(sign | Bits(static_cast<float>(m) * (1.0f / 512.0f)));
  }
  return FromBits(sign | ((e + 120u) << 23) | (m << 20));
}

uint8_t Bf16BitsToFp8E4M3(uint16_t bf16_bits) {
  return FloatToFp8E4M3(FromBits(static_cast<uint32_t>(bf16_bits) << 16));
}

uint16_t Fp8E4M3ToBf16Bits(uint8_t b) {
  // Exact: an fp8 value has at most 4 significant bits and its exponent is
  // inside bf16's range, so the low 16 float bits are zero (NaN: 0x7FC0).
  return static_cast<uint16_t>(Bits(Fp8E4M3ToFloat(b)) >> 16);
}

}  // namespace tailorkv::runtime
