#include "model/ggml_types.h"

#include <array>
#include <bit>
#include <cstring>

#include "absl/strings/str_format.h"

// This file must be compiled without floating-point contraction (see
// CMakeLists.txt): the dequantizers are bit-exact references, and a fused
// multiply-add in `d * q + m` would round differently from ggml and numpy.

namespace tailorkv::model {
namespace {

constexpr int64_t kQK = 32;    // elements per Q4_0 / Q4_1 / Q8_0 block
constexpr int64_t kQKK = 256;  // elements per K-quant super-block

struct TypeEntry {
  GgmlType type;
  GgmlTypeTraits traits;
};

constexpr std::array<TypeEntry, 8> kTypes = {{
    {GgmlType::kF32, {"F32", 1, 4}},
    {GgmlType::kF16, {"F16", 1, 2}},
    {GgmlType::kQ4_0, {"Q4_0", kQK, 2 + kQK / 2}},
    {GgmlType::kQ4_1, {"Q4_1", kQK, 4 + kQK / 2}},
    {GgmlType::kQ8_0, {"Q8_0", kQK, 2 + kQK}},
    {GgmlType::kQ4_K, {"Q4_K", kQKK, 4 + 12 + kQKK / 2}},
    {GgmlType::kQ6_K, {"Q6_K", kQKK, kQKK / 2 + kQKK / 4 + kQKK / 16 + 2}},
    {GgmlType::kBF16, {"BF16", 1, 2}},
}};

inline uint16_t LoadU16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }

float HalfToFloatSlow(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1F;
  uint32_t mant = h & 0x3FF;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);  // inf / nan (payload kept)
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;  // signed zero
  } else {
    // Subnormal half: normalize into a float32 (always representable).
    int e = 113;
    while ((mant & 0x400) == 0) {
      mant <<= 1;
      --e;
    }
    bits = sign | (static_cast<uint32_t>(e) << 23) | ((mant & 0x3FF) << 13);
  }
  return std::bit_cast<float>(bits);
}

// 65536 entries (256 KiB): a table lookup is several times faster than the
// bit manipulation, and every f16-scaled format goes through it.
const std::array<float, 65536>& HalfTable() {
  static const auto* table = [] {
    auto* t = new std::array<float, 65536>;
    for (uint32_t i = 0; i < 65536; ++i) (*t)[i] = HalfToFloatSlow(static_cast<uint16_t>(i));
    return t;
  }();
  return *table;
}

inline float H(const uint8_t* p) { return HalfTable()[LoadU16(p)]; }

void DequantF32(const uint8_t* src, float* dst, int64_t n) {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
}

void DequantF16(const uint8_t* src, float* dst, int64_t n) {
  const auto& table = HalfTable();
  for (int64_t i = 0; i < n; ++i) dst[i] = table[LoadU16(src + 2 * i)];
}

void DequantBF16(const uint8_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Bf16ToFloat(LoadU16(src + 2 * i));
}

// Block: f16 d, 16 bytes of nibbles; low nibbles are elements 0..15, high 16..31.
void DequantQ4_0(const uint8_t* src, float* dst, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, src += 18, dst += kQK) {
    const float d = H(src);
    const uint8_t* qs = src + 2;
    for (int j = 0; j < kQK / 2; ++j) {
      dst[j] = static_cast<float>((qs[j] & 0x0F) - 8) * d;
      dst[j + kQK / 2] = static_cast<float>((qs[j] >> 4) - 8) * d;
    }
  }
}

// Block: f16 d, f16 m, 16 bytes of nibbles; x = q * d + m.
void DequantQ4_1(const uint8_t* src, float* dst, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, src += 20, dst += kQK) {
    const float d = H(src);
    const float m = H(src + 2);
    const uint8_t* qs = src + 4;
    for (int j = 0; j < kQK / 2; ++j) {
      dst[j] = static_cast<float>(qs[j] & 0x0F) * d + m;
      dst[j + kQK / 2] = static_cast<float>(qs[j] >> 4) * d + m;
    }
  }
}

// Block: f16 d, 32 int8.
void DequantQ8_0(const uint8_t* src, float* dst, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, src += 34, dst += kQK) {
    const float d = H(src);
    const int8_t* qs = reinterpret_cast<const int8_t*>(src + 2);
    for (int j = 0; j < kQK; ++j) dst[j] = static_cast<float>(qs[j]) * d;
  }
}

// Super-block: f16 d, f16 dmin, 12 bytes holding eight 6-bit (scale, min)
// pairs, 128 bytes of nibbles. Each 64 elements use two sub-blocks: low
// nibbles of 32 bytes with pair 2k, high nibbles of the same bytes with 2k+1.
void DequantQ4_K(const uint8_t* src, float* dst, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, src += 144, dst += kQKK) {
    const float d = H(src);
    const float dmin = H(src + 2);
    const uint8_t* sc = src + 4;
    const uint8_t* qs = src + 16;
    uint8_t scale[8], min[8];
    for (int j = 0; j < 4; ++j) {
      scale[j] = sc[j] & 63;
      min[j] = sc[j + 4] & 63;
      scale[j + 4] = static_cast<uint8_t>((sc[j + 8] & 0x0F) | ((sc[j] >> 6) << 4));
      min[j + 4] = static_cast<uint8_t>((sc[j + 8] >> 4) | ((sc[j + 4] >> 6) << 4));
    }
    float* y = dst;
    for (int k = 0; k < 4; ++k, qs += 32, y += 64) {
      const float d1 = d * static_cast<float>(scale[2 * k]);
      const float m1 = dmin * static_cast<float>(min[2 * k]);
      const float d2 = d * static_cast<float>(scale[2 * k + 1]);
      const float m2 = dmin * static_cast<float>(min[2 * k + 1]);
      for (int l = 0; l < 32; ++l) {
        y[l] = d1 * static_cast<float>(qs[l] & 0x0F) - m1;
        y[l + 32] = d2 * static_cast<float>(qs[l] >> 4) - m2;
      }
    }
  }
}

// Super-block: 128 bytes low nibbles (ql), 64 bytes of 2-bit high parts (qh),
// 16 int8 scales (one per 16 elements), f16 d. Each half of 128 elements
// takes 64 bytes of ql, 32 of qh and 8 scales.
void DequantQ6_K(const uint8_t* src, float* dst, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, src += 210, dst += kQKK) {
    const uint8_t* ql = src;
    const uint8_t* qh = src + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(src + 192);
    const float d = H(src + 208);
    float* y = dst;
    for (int half = 0; half < 2; ++half, ql += 64, qh += 32, sc += 8, y += 128) {
      float ds[8];
      for (int i = 0; i < 8; ++i) ds[i] = d * static_cast<float>(sc[i]);
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32;
        const int q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        y[l] = ds[is] * static_cast<float>(q1);
        y[l + 32] = ds[is + 2] * static_cast<float>(q2);
        y[l + 64] = ds[is + 4] * static_cast<float>(q3);
        y[l + 96] = ds[is + 6] * static_cast<float>(q4);
      }
    }
  }
}

}  // namespace

absl::StatusOr<GgmlTypeTraits> TraitsOf(uint32_t raw_type) {
  for (const TypeEntry& e : kTypes) {
    if (static_cast<uint32_t>(e.type) == raw_type) return e.traits;
  }
  return absl::InvalidArgumentError(
      absl::StrFormat("unsupported ggml tensor type id %u (supported: F32, F16, BF16, Q4_0, "
                      "Q4_1, Q8_0, Q4_K, Q6_K)",
                      raw_type));
}

absl::Status Dequantize(GgmlType type, const uint8_t* src, size_t src_bytes, float* dst,
                        int64_t n) {
  auto traits_or = TraitsOf(static_cast<uint32_t>(type));
  if (!traits_or.ok()) return traits_or.status();
  const GgmlTypeTraits traits = *traits_or;
  if (n < 0 || n % traits.block_elems != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("Dequantize %s: %d elements is not a multiple of the block size %d",
                        traits.name, n, traits.block_elems));
  }
  const int64_t nb = n / traits.block_elems;
  const uint64_t need = static_cast<uint64_t>(nb) * static_cast<uint64_t>(traits.block_bytes);
  if (need != src_bytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "Dequantize %s: %d elements need %d bytes, got %d", traits.name, n, need, src_bytes));
  }
  if (n == 0) return absl::OkStatus();
  switch (type) {
    case GgmlType::kF32:
      DequantF32(src, dst, n);
      break;
    case GgmlType::kF16:
      DequantF16(src, dst, n);
      break;
    case GgmlType::kBF16:
      DequantBF16(src, dst, n);
      break;
    case GgmlType::kQ4_0:
      DequantQ4_0(src, dst, nb);
      break;
    case GgmlType::kQ4_1:
      DequantQ4_1(src, dst, nb);
      break;
    case GgmlType::kQ8_0:
      DequantQ8_0(src, dst, nb);
      break;
    case GgmlType::kQ4_K:
      DequantQ4_K(src, dst, nb);
      break;
    case GgmlType::kQ6_K:
      DequantQ6_K(src, dst, nb);
      break;
  }
  return absl::OkStatus();
}

float HalfToFloat(uint16_t h) { return HalfTable()[h]; }

uint16_t FloatToHalf(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  const uint32_t abs = x & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) {
    // NaN: keep the top payload bits and force quiet so it stays a NaN.
    return static_cast<uint16_t>(sign | 0x7E00 | ((abs >> 13) & 0x3FF));
  }
  if (abs >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00);  // rounds to inf
  if (abs < 0x38800000u) {
    // Result is subnormal (or zero) in half: value = m * 2^-24 with m < 1024.
    if (abs < 0x33000000u) return sign;  // below half the smallest subnormal: +-0
    const uint32_t exp = abs >> 23;
    const uint32_t mant = (abs & 0x7FFFFF) | 0x800000;
    const uint32_t shift = 126 - exp;  // 14 + (113 - exp): bits dropped to reach 2^-24 units
    uint32_t q = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (q & 1))) ++q;
    return static_cast<uint16_t>(sign | q);  // q == 1024 correctly becomes the smallest normal
  }
  // Normal: rebias exponent, round mantissa from 23 to 10 bits (nearest even);
  // a mantissa carry correctly bumps the exponent.
  uint32_t h = ((abs >> 13) - (112u << 10));
  const uint32_t rem = abs & 0x1FFF;
  if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) ++h;
  return static_cast<uint16_t>(sign | h);
}

float Bf16ToFloat(uint16_t h) { return std::bit_cast<float>(static_cast<uint32_t>(h) << 16); }

uint16_t FloatToBf16(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) {
    return static_cast<uint16_t>((x >> 16) | 0x40);  // quiet NaN, as ggml does
  }
  return static_cast<uint16_t>((x + 0x7FFF + ((x >> 16) & 1)) >> 16);
}

}  // namespace tailorkv::model
