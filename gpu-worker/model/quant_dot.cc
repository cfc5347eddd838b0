#include "model/quant_dot.h"

#include <cpuid.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "absl/container/inlined_vector.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"

// Compiled without floating-point contraction (CMakeLists.txt): the
// reference's fp32 expressions are the contract, evaluated as written.

namespace tailorkv::model {
namespace {

constexpr int64_t kQ = 32;  // values per activation block

inline uint16_t U16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
inline float Half(const uint8_t* p) { return HalfToFloat(U16(p)); }

// The activation blocks of one row, and the float row they came from (the
// F16/BF16 products read it; null when the caller gave none).
struct ActRow {
  const int8_t* q;
  const float* d;
  const int32_t* isum;
  const float* f;
};

inline float Bf16ToFloat(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Q4_K's eight 6-bit (scale, min) pairs, as DequantQ4_K decodes them.
inline void Q4KScales(const uint8_t* sc, uint8_t scale[8], uint8_t min[8]) {
  for (int j = 0; j < 4; ++j) {
    scale[j] = sc[j] & 63;
    min[j] = sc[j + 4] & 63;
    scale[j + 4] = static_cast<uint8_t>((sc[j + 8] & 0x0F) | ((sc[j] >> 6) << 4));
    min[j + 4] = static_cast<uint8_t>((sc[j + 8] >> 4) | ((sc[j + 4] >> 6) << 4));
  }
}

// ---- Reference: the contract in quant_dot.h, scalar. ----

// F16 / BF16: float products of the float activations, added in order.
float RefF16(const uint8_t* w, const ActRow& x, int64_t n) {
  float acc = 0.0f;
  for (int64_t k = 0; k < n; ++k) acc += Half(w + 2 * k) * x.f[k];
  return acc;
}

float RefBF16(const uint8_t* w, const ActRow& x, int64_t n) {
  float acc = 0.0f;
  for (int64_t k = 0; k < n; ++k) acc += Bf16ToFloat(U16(w + 2 * k)) * x.f[k];
  return acc;
}

float RefQ4_0(const uint8_t* w, const ActRow& x, int64_t nb) {
  float acc = 0.0f;
  for (int64_t b = 0; b < nb; ++b, w += 18) {
    const uint8_t* qs = w + 2;
    const int8_t* xq = x.q + b * kQ;
    int32_t s = 0;
    for (int j = 0; j < 16; ++j) s += ((qs[j] & 15) - 8) * xq[j] + ((qs[j] >> 4) - 8) * xq[j + 16];
    acc += Half(w) * x.d[b] * static_cast<float>(s);
  }
  return acc;
}

float RefQ4_1(const uint8_t* w, const ActRow& x, int64_t nb) {
  float acc = 0.0f;
  for (int64_t b = 0; b < nb; ++b, w += 20) {
    const uint8_t* qs = w + 4;
    const int8_t* xq = x.q + b * kQ;
    int32_t s = 0;
    for (int j = 0; j < 16; ++j) s += (qs[j] & 15) * xq[j] + (qs[j] >> 4) * xq[j + 16];
    acc += Half(w) * x.d[b] * static_cast<float>(s) + Half(w + 2) * (x.d[b] * static_cast<float>(x.isum[b]));
  }
  return acc;
}

float RefQ8_0(const uint8_t* w, const ActRow& x, int64_t nb) {
  float acc = 0.0f;
  for (int64_t b = 0; b < nb; ++b, w += 34) {
    const int8_t* qs = reinterpret_cast<const int8_t*>(w + 2);
    const int8_t* xq = x.q + b * kQ;
    int32_t s = 0;
    for (int j = 0; j < 32; ++j) s += qs[j] * xq[j];
    acc += Half(w) * x.d[b] * static_cast<float>(s);
  }
  return acc;
}

float RefQ4_K(const uint8_t* w, const ActRow& x, int64_t nsb) {
  float acc = 0.0f;
  for (int64_t sb = 0; sb < nsb; ++sb, w += 144) {
    const float d = Half(w), dmin = Half(w + 2);
    uint8_t scale[8], min[8];
    Q4KScales(w + 4, scale, min);
    const uint8_t* qs = w + 16;
    for (int j = 0; j < 8; ++j) {
      const int64_t b = sb * 8 + j;
      const uint8_t* q = qs + 32 * (j / 2);
      const int shift = 4 * (j & 1);
      const int8_t* xq = x.q + b * kQ;
      int32_t s = 0;
      for (int l = 0; l < 32; ++l) s += ((q[l] >> shift) & 15) * xq[l];
      acc += x.d[b] * (d * static_cast<float>(scale[j]) * static_cast<float>(s) -
                       dmin * static_cast<float>(min[j]) * static_cast<float>(x.isum[b]));
    }
  }
  return acc;
}

// Q6_K's value l (< 32) of activation block j (< 4) of half `half`.
inline int Q6KValue(const uint8_t* ql, const uint8_t* qh, int j, int l) {
  const int lo = (ql[l + 32 * (j & 1)] >> (4 * (j >> 1))) & 15;
  const int hi = (qh[l] >> (2 * j)) & 3;
  return (lo | (hi << 4)) - 32;
}

float RefQ6_K(const uint8_t* w, const ActRow& x, int64_t nsb) {
  float acc = 0.0f;
  for (int64_t sb = 0; sb < nsb; ++sb, w += 210) {
    const float d = Half(w + 208);
    for (int half = 0; half < 2; ++half) {
      const uint8_t* ql = w + 64 * half;
      const uint8_t* qh = w + 128 + 32 * half;
      const int8_t* sc = reinterpret_cast<const int8_t*>(w + 192) + 8 * half;
      for (int j = 0; j < 4; ++j) {
        const int64_t b = sb * 8 + half * 4 + j;
        const int8_t* xq = x.q + b * kQ;
        int32_t s0 = 0, s1 = 0;
        for (int l = 0; l < 16; ++l) s0 += Q6KValue(ql, qh, j, l) * xq[l];
        for (int l = 16; l < 32; ++l) s1 += Q6KValue(ql, qh, j, l) * xq[l];
        acc += d * x.d[b] * static_cast<float>(sc[2 * j] * s0 + sc[2 * j + 1] * s1);
      }
    }
  }
  return acc;
}

// ---- SIMD: 8 int32 lanes of one block's products, then fp32 lanes. ----
// kVnni: dpbusd (AVX-VNNI); else maddubs + madd (AVX2). Both exact: u8
// operands <= 15 (nibbles) or the sign trick for int8 weights keep maddubs'
// 16-bit pair sums from saturating.

#define TKV_SIMD_TARGET __attribute__((target("avx2,fma,f16c,avxvnni")))

// The same value as Half() (both conversions are exact), without the call
// and the table lookup.
TKV_SIMD_TARGET inline float HalfF16c(const uint8_t* p) { return _cvtsh_ss(U16(p)); }

template <bool kVnni>
TKV_SIMD_TARGET inline __m256i DotU8S8(__m256i u, __m256i s) {
  if constexpr (kVnni) {
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
  } else {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
  }
}

// 16 bytes of nibbles -> 32 u8 in value order (low nibbles, then high).
TKV_SIMD_TARGET inline __m256i Nibbles(const uint8_t* qs) {
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i m = _mm_set1_epi8(15);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m), _mm_and_si128(q, m));
}

TKV_SIMD_TARGET inline float HSum(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

template <bool kVnni>
TKV_SIMD_TARGET float SimdQ4_0(const uint8_t* w, const ActRow& x, int64_t nb) {
  __m256 acc = _mm256_setzero_ps();
  const __m256i eight = _mm256_set1_epi8(8);
  for (int64_t b = 0; b < nb; ++b, w += 18) {
    const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + b * kQ));
    // sum (q - 8) x per lane = sum q x - sum 8 x, both exact.
    const __m256i s = _mm256_sub_epi32(DotU8S8<kVnni>(Nibbles(w + 2), xq), DotU8S8<kVnni>(eight, xq));
    acc = _mm256_fmadd_ps(_mm256_set1_ps(HalfF16c(w) * x.d[b]), _mm256_cvtepi32_ps(s), acc);
  }
  return HSum(acc);
}

template <bool kVnni>
TKV_SIMD_TARGET float SimdQ4_1(const uint8_t* w, const ActRow& x, int64_t nb) {
  __m256 acc = _mm256_setzero_ps();
  float mins = 0.0f;
  for (int64_t b = 0; b < nb; ++b, w += 20) {
    const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + b * kQ));
    const __m256i s = DotU8S8<kVnni>(Nibbles(w + 4), xq);
    acc = _mm256_fmadd_ps(_mm256_set1_ps(HalfF16c(w) * x.d[b]), _mm256_cvtepi32_ps(s), acc);
    mins += HalfF16c(w + 2) * (x.d[b] * static_cast<float>(x.isum[b]));
  }
  return HSum(acc) + mins;
}

template <bool kVnni>
TKV_SIMD_TARGET float SimdQ8_0(const uint8_t* w, const ActRow& x, int64_t nb) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b, w += 34) {
    const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + b * kQ));
    const __m256i wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2));
    // |w| as u8 times x with w's sign: products exact, |w| <= 128.
    const __m256i s = DotU8S8<kVnni>(_mm256_abs_epi8(wq), _mm256_sign_epi8(xq, wq));
    acc = _mm256_fmadd_ps(_mm256_set1_ps(HalfF16c(w) * x.d[b]), _mm256_cvtepi32_ps(s), acc);
  }
  return HSum(acc);
}

// Four weight rows against one activation row: each row's operations are
// exactly its one-row kernel's (same order, own accumulators), so a row's
// result does not depend on which rows it is computed with; the activation
// block is loaded once for the four, and the four independent chains hide
// the latency that one row's chain of fused adds exposes.
template <bool kVnni>
TKV_SIMD_TARGET void SimdQ4_0x4(const uint8_t* w, int64_t row_bytes, const ActRow& x, int64_t nb, float* out) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  const __m256i eight = _mm256_set1_epi8(8);
  for (int64_t b = 0; b < nb; ++b) {
    const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + b * kQ));
    const __m256i e = DotU8S8<kVnni>(eight, xq);
    for (int r = 0; r < 4; ++r) {
      const uint8_t* wb = w + r * row_bytes + b * 18;
      const __m256i s = _mm256_sub_epi32(DotU8S8<kVnni>(Nibbles(wb + 2), xq), e);
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(HalfF16c(wb) * x.d[b]), _mm256_cvtepi32_ps(s), acc[r]);
    }
  }
  for (int r = 0; r < 4; ++r) out[r] = HSum(acc[r]);
}

template <bool kVnni>
TKV_SIMD_TARGET void SimdQ4_1x4(const uint8_t* w, int64_t row_bytes, const ActRow& x, int64_t nb, float* out) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  float mins[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t b = 0; b < nb; ++b) {
    const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + b * kQ));
    const float sx = x.d[b] * static_cast<float>(x.isum[b]);
    for (int r = 0; r < 4; ++r) {
      const uint8_t* wb = w + r * row_bytes + b * 20;
      const __m256i s = DotU8S8<kVnni>(Nibbles(wb + 4), xq);
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(HalfF16c(wb) * x.d[b]), _mm256_cvtepi32_ps(s), acc[r]);
      mins[r] += HalfF16c(wb + 2) * sx;
    }
  }
  for (int r = 0; r < 4; ++r) out[r] = HSum(acc[r]) + mins[r];
}

template <bool kVnni>
TKV_SIMD_TARGET void SimdQ8_0x4(const uint8_t* w, int64_t row_bytes, const ActRow& x, int64_t nb, float* out) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t b = 0; b < nb; ++b) {
    const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + b * kQ));
    for (int r = 0; r < 4; ++r) {
      const uint8_t* wb = w + r * row_bytes + b * 34;
      const __m256i wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 2));
      const __m256i s = DotU8S8<kVnni>(_mm256_abs_epi8(wq), _mm256_sign_epi8(xq, wq));
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(HalfF16c(wb) * x.d[b]), _mm256_cvtepi32_ps(s), acc[r]);
    }
  }
  for (int r = 0; r < 4; ++r) out[r] = HSum(acc[r]);
}

template <bool kVnni>
TKV_SIMD_TARGET float SimdQ4_K(const uint8_t* w, const ActRow& x, int64_t nsb) {
  __m256 acc = _mm256_setzero_ps();
  float mins = 0.0f;
  const __m256i m4 = _mm256_set1_epi8(15);
  for (int64_t sb = 0; sb < nsb; ++sb, w += 144) {
    const float d = HalfF16c(w), dmin = HalfF16c(w + 2);
    uint8_t scale[8], min[8];
    Q4KScales(w + 4, scale, min);
    for (int k = 0; k < 4; ++k) {
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16 + 32 * k));
      for (int h = 0; h < 2; ++h) {
        const int j = 2 * k + h;
        const int64_t b = sb * 8 + j;
        const __m256i wq = h == 0 ? _mm256_and_si256(q, m4) : _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
        const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + b * kQ));
        const __m256i s = DotU8S8<kVnni>(wq, xq);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(x.d[b] * (d * static_cast<float>(scale[j]))),
                              _mm256_cvtepi32_ps(s), acc);
        mins += x.d[b] * (dmin * static_cast<float>(min[j]) * static_cast<float>(x.isum[b]));
      }
    }
  }
  return HSum(acc) - mins;
}

template <bool kVnni>
TKV_SIMD_TARGET float SimdQ6_K(const uint8_t* w, const ActRow& x, int64_t nsb) {
  __m256 acc = _mm256_setzero_ps();
  const __m256i m4 = _mm256_set1_epi8(15), m2 = _mm256_set1_epi8(3);
  const __m256i k32 = _mm256_set1_epi8(32);
  for (int64_t sb = 0; sb < nsb; ++sb, w += 210) {
    const float d = HalfF16c(w + 208);
    for (int half = 0; half < 2; ++half) {
      const uint8_t* ql = w + 64 * half;
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 128 + 32 * half));
      const int8_t* sc = reinterpret_cast<const int8_t*>(w + 192) + 8 * half;
      const __m256i ql0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql));
      const __m256i ql1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32));
      for (int j = 0; j < 4; ++j) {
        const int64_t b = sb * 8 + half * 4 + j;
        const __m256i src = (j & 1) ? ql1 : ql0;
        const __m256i lo = (j >> 1) ? _mm256_and_si256(_mm256_srli_epi16(src, 4), m4) : _mm256_and_si256(src, m4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * j), m2);
        const __m256i q = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));  // 0..63, u8
        const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + b * kQ));
        // sum (q - 32) x per lane: q x (u8 <= 63, no saturation) minus 32 x.
        const __m256i s = _mm256_sub_epi32(DotU8S8<kVnni>(q, xq), DotU8S8<kVnni>(k32, xq));
        // Lanes 0-3 hold values 0-15 (scale 2j), lanes 4-7 values 16-31.
        const __m256 scale = _mm256_set_m128(_mm_set1_ps(static_cast<float>(sc[2 * j + 1])),
                                             _mm_set1_ps(static_cast<float>(sc[2 * j])));
        acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(d * x.d[b]), scale), _mm256_cvtepi32_ps(s), acc);
      }
    }
  }
  return HSum(acc);
}

// ---- F16 / BF16 weights against float activations (AVX2 + FMA + F16C). ----
// R rows; 16 values a step in two 8-lane chains per row (each row's order
// the same whatever R). cols is a multiple of 32 (the activations' blocks).

template <bool kBf16>
TKV_SIMD_TARGET inline __m256 Load8Half(const uint8_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (kBf16) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    return _mm256_cvtph_ps(h);
  }
}

template <bool kBf16, int R>
TKV_SIMD_TARGET void SimdHalfRows(const uint8_t* w, int64_t row_bytes, const ActRow& x, int64_t n, float* out) {
  __m256 a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < n; k += 16) {
    const __m256 x0 = _mm256_loadu_ps(x.f + k), x1 = _mm256_loadu_ps(x.f + k + 8);
    for (int r = 0; r < R; ++r) {
      const uint8_t* wr = w + r * row_bytes + 2 * k;
      a0[r] = _mm256_fmadd_ps(Load8Half<kBf16>(wr), x0, a0[r]);
      a1[r] = _mm256_fmadd_ps(Load8Half<kBf16>(wr + 16), x1, a1[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = HSum(_mm256_add_ps(a0[r], a1[r]));
}

template <bool kBf16>
TKV_SIMD_TARGET float SimdHalf(const uint8_t* w, const ActRow& x, int64_t n) {
  float v;
  SimdHalfRows<kBf16, 1>(w, 0, x, n, &v);
  return v;
}

// GCC 12 warns "__Y (may be) used uninitialized" inside its own avx512fintrin.h
// (the _mm512_undefined_* its 512-bit intrinsics start from): a false
// positive on the header's code, silenced for this section only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

// ---- AVX-512 VNNI: two blocks per 512-bit operation (Q4_0, Q4_1, Q8_0). ----
// R weight rows against one activation row; each row's operations are the
// same whatever R (own accumulators, same order), so a row's result does not
// depend on its neighbours. An odd last block runs the same code with the
// second block's half zeroed (masked load: nothing read past the row).

#define TKV_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma,f16c,avxvnni")))

// 64 activation values of blocks b and b + 1 (the second zero when !two).
TKV_AVX512_TARGET inline __m512i LoadPair(const int8_t* q, bool two) {
  return two ? _mm512_loadu_si512(q) : _mm512_maskz_loadu_epi8(0xFFFFFFFFull, q);
}

// Two blocks of 16 nibble bytes -> 64 u8 as [b lo, b+1 lo, b hi, b+1 hi]
// (16 values each; `b1` null: zeros for block b + 1).
TKV_AVX512_TARGET inline __m512i NibblePair(const uint8_t* b0, const uint8_t* b1) {
  const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b0));
  const __m128i q1 = b1 != nullptr ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(b1)) : _mm_setzero_si128();
  const __m256i q = _mm256_inserti128_si256(_mm256_castsi128_si256(q0), q1, 1);
  const __m256i m = _mm256_set1_epi8(15);
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(q, m)),
                            _mm256_and_si256(_mm256_srli_epi16(q, 4), m), 1);
}

// Activations in NibblePair's order: 128-bit lanes (b lo, b hi, b+1 lo,
// b+1 hi) -> (b lo, b+1 lo, b hi, b+1 hi).
TKV_AVX512_TARGET inline __m512i NibbleOrder(__m512i x) { return _mm512_shuffle_i64x2(x, x, 0xD8); }

// Per-lane scale: s0 for block b's lanes, s1 for block b + 1's (`mask`).
TKV_AVX512_TARGET inline __m512 PairScale(__mmask16 mask, float s0, float s1) {
  return _mm512_mask_blend_ps(mask, _mm512_set1_ps(s0), _mm512_set1_ps(s1));
}

template <int R, bool kTwo>
TKV_AVX512_TARGET inline void Q4_0PairStep(const uint8_t* w, int64_t row_bytes, const ActRow& x, int64_t b,
                                           __m512 acc[R]) {
  const __m512i xp = NibbleOrder(LoadPair(x.q + b * kQ, kTwo));
  const __m512i e = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(8), xp);
  const float dx0 = x.d[b], dx1 = kTwo ? x.d[b + 1] : 0.0f;
  for (int r = 0; r < R; ++r) {
    const uint8_t* wb = w + r * row_bytes + b * 18;
    const __m512i s = _mm512_sub_epi32(
        _mm512_dpbusd_epi32(_mm512_setzero_si512(), NibblePair(wb + 2, kTwo ? wb + 20 : nullptr), xp), e);
    const __m512 sc = PairScale(0xF0F0, HalfF16c(wb) * dx0, kTwo ? HalfF16c(wb + 18) * dx1 : 0.0f);
    acc[r] = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(s), acc[r]);
  }
}

template <int R>
TKV_AVX512_TARGET void Avx512Q4_0(const uint8_t* w, int64_t row_bytes, const ActRow& x, int64_t nb, float* out) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 1 < nb; b += 2) Q4_0PairStep<R, true>(w, row_bytes, x, b, acc);
  if (b < nb) Q4_0PairStep<R, false>(w, row_bytes, x, b, acc);
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

template <int R, bool kTwo>
TKV_AVX512_TARGET inline void Q4_1PairStep(const uint8_t* w, int64_t row_bytes, const ActRow& x, int64_t b,
                                           __m512 acc[R], float mins[R]) {
  const __m512i xp = NibbleOrder(LoadPair(x.q + b * kQ, kTwo));
  const float dx0 = x.d[b], dx1 = kTwo ? x.d[b + 1] : 0.0f;
  const float sx0 = x.d[b] * static_cast<float>(x.isum[b]);
  const float sx1 = kTwo ? x.d[b + 1] * static_cast<float>(x.isum[b + 1]) : 0.0f;
  for (int r = 0; r < R; ++r) {
    const uint8_t* wb = w + r * row_bytes + b * 20;
    const __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), NibblePair(wb + 4, kTwo ? wb + 24 : nullptr), xp);
    const __m512 sc = PairScale(0xF0F0, HalfF16c(wb) * dx0, kTwo ? HalfF16c(wb + 20) * dx1 : 0.0f);
    acc[r] = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(s), acc[r]);
    mins[r] += HalfF16c(wb + 2) * sx0;
    if (kTwo) mins[r] += HalfF16c(wb + 22) * sx1;
  }
}

template <int R>
TKV_AVX512_TARGET void Avx512Q4_1(const uint8_t* w, int64_t row_bytes, const ActRow& x, int64_t nb, float* out) {
  __m512 acc[R];
  float mins[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm512_setzero_ps();
    mins[r] = 0.0f;
  }
  int64_t b = 0;
  for (; b + 1 < nb; b += 2) Q4_1PairStep<R, true>(w, row_bytes, x, b, acc, mins);
  if (b < nb) Q4_1PairStep<R, false>(w, row_bytes, x, b, acc, mins);
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]) + mins[r];
}

template <int R, bool kTwo>
TKV_AVX512_TARGET inline void Q8_0PairStep(const uint8_t* w, int64_t row_bytes, const ActRow& x, int64_t b,
                                           __m512 acc[R]) {
  const __m512i xq = LoadPair(x.q + b * kQ, kTwo);
  const float dx0 = x.d[b], dx1 = kTwo ? x.d[b + 1] : 0.0f;
  for (int r = 0; r < R; ++r) {
    const uint8_t* wb = w + r * row_bytes + b * 34;
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 2));
    const __m256i w1 = kTwo ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 36)) : _mm256_setzero_si256();
    const __m512i wq = _mm512_inserti64x4(_mm512_castsi256_si512(w0), w1, 1);
    // |w| as u8 times x with w's sign (no sign_epi8 on 512 bits: negate
    // where w < 0; w = 0 gives 0 either way). Products exact, |w| <= 128.
    const __m512i xs = _mm512_mask_sub_epi8(xq, _mm512_movepi8_mask(wq), _mm512_setzero_si512(), xq);
    const __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(wq), xs);
    const __m512 sc = PairScale(0xFF00, HalfF16c(wb) * dx0, kTwo ? HalfF16c(wb + 34) * dx1 : 0.0f);
    acc[r] = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(s), acc[r]);
  }
}

template <int R>
TKV_AVX512_TARGET void Avx512Q8_0(const uint8_t* w, int64_t row_bytes, const ActRow& x, int64_t nb, float* out) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 1 < nb; b += 2) Q8_0PairStep<R, true>(w, row_bytes, x, b, acc);
  if (b < nb) Q8_0PairStep<R, false>(w, row_bytes, x, b, acc);
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// The one-row form of a four-row kernel (DotFn's signature).
template <void (*kRows)(const uint8_t*, int64_t, const ActRow&, int64_t, float*)>
float OneRow(const uint8_t* w, const ActRow& x, int64_t nb) {
  float v;
  kRows(w, 0, x, nb, &v);
  return v;
}

// AVX-VNNI: CPUID leaf 7, sub-leaf 1, EAX bit 4 (clang 14's
// __builtin_cpu_supports does not know "avxvnni"). It uses the YMM state
// that the AVX2 check already found the OS saving.
bool CpuHasAvxVnni() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_count(7, 1, &a, &b, &c, &d) == 0) return false;
  return (a >> 4) & 1u;
}

// F16C: CPUID leaf 1, ECX bit 29 (clang 14's builtin does not know "f16c").
bool CpuHasF16c() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid(1, &a, &b, &c, &d) == 0) return false;
  return (c >> 29) & 1u;
}

using DotFn = float (*)(const uint8_t*, const ActRow&, int64_t);

DotFn Pick(GgmlType type, QuantKernel k) {
  // F16 / BF16: one SIMD kernel (AVX2 + FMA + F16C) whatever the SIMD level.
  if (type == GgmlType::kF16 || type == GgmlType::kBF16) {
    if (k == QuantKernel::kReference) return type == GgmlType::kF16 ? RefF16 : RefBF16;
    return type == GgmlType::kF16 ? SimdHalf<false> : SimdHalf<true>;
  }
  // AVX-512 VNNI has kernels for the 32-value types; K-quants take AVX-VNNI's.
  if (k == QuantKernel::kAvx512Vnni) {
    switch (type) {
      case GgmlType::kQ4_0:
        return OneRow<Avx512Q4_0<1>>;
      case GgmlType::kQ4_1:
        return OneRow<Avx512Q4_1<1>>;
      case GgmlType::kQ8_0:
        return OneRow<Avx512Q8_0<1>>;
      default:
        k = QuantKernel::kAvxVnni;
    }
  }
  const bool vnni = k == QuantKernel::kAvxVnni;
  const bool simd = k == QuantKernel::kAvx2 || vnni;
  switch (type) {
    case GgmlType::kQ4_0:
      return !simd ? RefQ4_0 : vnni ? SimdQ4_0<true> : SimdQ4_0<false>;
    case GgmlType::kQ4_1:
      return !simd ? RefQ4_1 : vnni ? SimdQ4_1<true> : SimdQ4_1<false>;
    case GgmlType::kQ8_0:
      return !simd ? RefQ8_0 : vnni ? SimdQ8_0<true> : SimdQ8_0<false>;
    case GgmlType::kQ4_K:
      return !simd ? RefQ4_K : vnni ? SimdQ4_K<true> : SimdQ4_K<false>;
    case GgmlType::kQ6_K:
      return !simd ? RefQ6_K : vnni ? SimdQ6_K<true> : SimdQ6_K<false>;
    default:
      return nullptr;
  }
}

// The four-row kernel for `type` and `k`, or null (then rows go one by one).
using Dot4Fn = void (*)(const uint8_t*, int64_t, const ActRow&, int64_t, float*);

Dot4Fn Pick4(GgmlType type, QuantKernel k) {
  if (type == GgmlType::kF16 || type == GgmlType::kBF16) {
    if (k == QuantKernel::kReference) return nullptr;
    return type == GgmlType::kF16 ? SimdHalfRows<false, 4> : SimdHalfRows<true, 4>;
  }
  if (k == QuantKernel::kAvx512Vnni) {
    switch (type) {
      case GgmlType::kQ4_0:
        return Avx512Q4_0<4>;
      case GgmlType::kQ4_1:
        return Avx512Q4_1<4>;
      case GgmlType::kQ8_0:
        return Avx512Q8_0<4>;
      default:
        k = QuantKernel::kAvxVnni;
    }
  }
  const bool vnni = k == QuantKernel::kAvxVnni;
  if (k != QuantKernel::kAvx2 && !vnni) return nullptr;
  switch (type) {
    case GgmlType::kQ4_0:
      return vnni ? SimdQ4_0x4<true> : SimdQ4_0x4<false>;
    case GgmlType::kQ4_1:
      return vnni ? SimdQ4_1x4<true> : SimdQ4_1x4<false>;
    case GgmlType::kQ8_0:
      return vnni ? SimdQ8_0x4<true> : SimdQ8_0x4<false>;
    default:
      return nullptr;
  }
}

}  // namespace

absl::Status QuantizeActivations(const float* x, int64_t rows, int64_t cols, Q8Activations* out) {
  if (rows < 1) return absl::InvalidArgumentError(absl::StrFormat("QuantizeActivations: rows = %d < 1", rows));
  if (cols < kQ || cols % kQ != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("QuantizeActivations: cols = %d is not a positive multiple of 32", cols));
  }
  const int64_t n = rows * cols, nb = n / kQ;
  out->rows = rows;
  out->cols = cols;
  out->source = x;
  out->q.resize(static_cast<size_t>(n));
  out->d.resize(static_cast<size_t>(nb));
  out->isum.resize(static_cast<size_t>(nb));
  for (int64_t b = 0; b < nb; ++b) {
    const float* v = x + b * kQ;
    float amax = 0.0f;
    for (int i = 0; i < kQ; ++i) {
      if (!std::isfinite(v[i])) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "QuantizeActivations: x[%d][%d] = %f is not finite", b * kQ / cols, (b * kQ) % cols + i, v[i]));
      }
      amax = std::max(amax, std::fabs(v[i]));
    }
    const float d = amax / 127.0f;
    const float id = d > 0.0f ? 1.0f / d : 0.0f;
    int32_t sum = 0;
    int8_t* q = out->q.data() + b * kQ;
    for (int i = 0; i < kQ; ++i) {
      // |v * id| <= 127 up to rounding: clamp keeps an int8 whatever the last ulp.
      const float r = std::nearbyint(v[i] * id);
      q[i] = static_cast<int8_t>(std::clamp(r, -127.0f, 127.0f));
      sum += q[i];
    }
    out->d[static_cast<size_t>(b)] = d;
    out->isum[static_cast<size_t>(b)] = sum;
  }
  return absl::OkStatus();
}

bool QuantKernelAvailable(QuantKernel kernel) {
  // Asked once: CPUID traps to the hypervisor in a VM (tens of us a call,
  // more than a small matrix's whole product).
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && CpuHasF16c();
  static const bool vnni = avx2 && CpuHasAvxVnni();
  // The K-quants under kAvx512Vnni run AVX-VNNI's kernels, so it needs both.
  static const bool vnni512 = vnni && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                              __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni");
  switch (kernel) {
    case QuantKernel::kAuto:
    case QuantKernel::kReference:
      return true;
    case QuantKernel::kAvx2:
      return avx2;
    case QuantKernel::kAvxVnni:
      return vnni;
    case QuantKernel::kAvx512Vnni:
      return vnni512;
  }
  return false;
}

QuantKernel AutoQuantKernel(GgmlType type) {
  if (!QuantMatmulSupports(type)) return QuantKernel::kReference;
  if (QuantKernelAvailable(QuantKernel::kAvx512Vnni)) return QuantKernel::kAvx512Vnni;
  if (QuantKernelAvailable(QuantKernel::kAvxVnni)) return QuantKernel::kAvxVnni;
  if (QuantKernelAvailable(QuantKernel::kAvx2)) return QuantKernel::kAvx2;
  return QuantKernel::kReference;
}

bool QuantMatmulSupports(GgmlType type) {
  switch (type) {
    case GgmlType::kQ4_0:
    case GgmlType::kQ4_1:
    case GgmlType::kQ8_0:
    case GgmlType::kQ4_K:
    case GgmlType::kQ6_K:
    case GgmlType::kF16:
    case GgmlType::kBF16:
      return true;
    default:
      return false;
  }
}

namespace {

// A checked product, ready to run.
struct ProductPlan {
  DotFn dot;
  Dot4Fn dot4;  // null: rows one by one
  const uint8_t* w;
  int64_t row_bytes, rows, n_units;
  float* y;
  bool accumulate;
};

absl::StatusOr<ProductPlan> PlanProduct(const char* fn, const QuantProduct& p, int64_t cols,
                                        const Q8Activations& x, QuantKernel kernel) {
  if (!QuantMatmulSupports(p.type)) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: type %u has no quantized kernel", fn,
                                                      static_cast<uint32_t>(p.type)));
  }
  const GgmlTypeTraits t = *TraitsOf(static_cast<uint32_t>(p.type));
  if (p.rows < 1) return absl::InvalidArgumentError(absl::StrFormat("%s: rows = %d < 1", fn, p.rows));
  if (cols < t.block_elems || cols % t.block_elems != 0) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: cols = %d is not a positive multiple of %s's block of %d",
                                                      fn, cols, t.name, t.block_elems));
  }
  const int64_t row_bytes = cols / t.block_elems * t.block_bytes;
  if (p.rows > INT64_MAX / row_bytes || p.w_bytes != p.rows * row_bytes) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: w_bytes = %d, %d rows of %d %s values need %d", fn, p.w_bytes, p.rows, cols, t.name,
                        p.rows <= INT64_MAX / row_bytes ? p.rows * row_bytes : -1));
  }
  if (x.cols != cols || x.rows < 1 || static_cast<int64_t>(x.q.size()) != x.rows * cols ||
      static_cast<int64_t>(x.d.size()) != x.rows * cols / kQ ||
      static_cast<int64_t>(x.isum.size()) != x.rows * cols / kQ) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: x holds %d rows of %d values (%d q, %d d, %d isum), want rows of cols = %d", fn, x.rows, x.cols,
        x.q.size(), x.d.size(), x.isum.size(), cols));
  }
  if (p.w == nullptr || p.y == nullptr) return absl::InvalidArgumentError(absl::StrFormat("%s: null w or y", fn));
  if ((p.type == GgmlType::kF16 || p.type == GgmlType::kBF16) && x.source == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: x.source is null: %s weights multiply the float activations", fn, t.name));
  }
  if (kernel == QuantKernel::kAuto) kernel = AutoQuantKernel(p.type);
  if (!QuantKernelAvailable(kernel)) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: kernel %d needs instructions this CPU lacks", fn,
                                                      static_cast<int>(kernel)));
  }
  return ProductPlan{Pick(p.type, kernel), Pick4(p.type, kernel), p.w, row_bytes, p.rows, cols / t.block_elems, p.y, p.accumulate};
}

absl::Status RunProducts(absl::Span<const ProductPlan> plans, const Q8Activations& x) {
  constexpr int64_t kRows = 4;  // weight rows a work unit covers
  const int64_t cols = x.cols, nb = cols / kQ, n = x.rows;
  // Units of kRows rows of all products as one index space: product g owns
  // units [first[g], first[g + 1]), its last unit possibly short.
  absl::InlinedVector<int64_t, 4> first(plans.size() + 1, 0);
  int64_t total_rows = 0;
  for (size_t g = 0; g < plans.size(); ++g) {
    first[g + 1] = first[g] + (plans[g].rows + kRows - 1) / kRows;
    total_rows += plans[g].rows;
  }
  const int64_t units = first.back();
  // Threads only where the work is worth a fork (a 576 x 192 matrix is not).
  const bool parallel = total_rows * cols >= (int64_t{1} << 18);
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t u = 0; u < units; ++u) {
    size_t g = 0;
    while (u >= first[g + 1]) ++g;
    const ProductPlan& p = plans[g];
    const int64_t r0 = (u - first[g]) * kRows, m = std::min(kRows, p.rows - r0);
    const uint8_t* w0 = p.w + r0 * p.row_bytes;
    // A unit's rows are short (a 576-value Q4_1 row is 360 bytes), too short
    // for the hardware prefetcher to run ahead of: ask for the unit after
    // next (in this product). Measured single-threaded on this machine's
    // Xeon, SmolLM2 decode: without it the kernels wait on DRAM (~3.7 GB/s,
    // 43 tokens/s); 1 to 6 units ahead all gave 58-62 tokens/s.
    if (r0 + 2 * kRows < p.rows) {
      const uint8_t* ahead = w0 + 2 * kRows * p.row_bytes;
      const int64_t bytes = std::min(kRows, p.rows - r0 - 2 * kRows) * p.row_bytes;
      for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(ahead + o);
    }
    for (int64_t i = 0; i < n; ++i) {
      const ActRow a{x.q.data() + i * cols, x.d.data() + i * nb, x.isum.data() + i * nb,
                     x.source != nullptr ? x.source + i * cols : nullptr};
      float v[kRows];
      if (m == kRows && p.dot4 != nullptr) {
        p.dot4(w0, p.row_bytes, a, p.n_units, v);
      } else {
        for (int64_t r = 0; r < m; ++r) v[r] = p.dot(w0 + r * p.row_bytes, a, p.n_units);
      }
      float* out = p.y + i * p.rows + r0;
      for (int64_t r = 0; r < m; ++r) out[r] = p.accumulate ? out[r] + v[r] : v[r];
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status QuantMatmul(GgmlType type, const uint8_t* w, int64_t w_bytes, int64_t rows, int64_t cols,
                         const Q8Activations& x, float* y, bool accumulate, QuantKernel kernel) {
  ASSIGN_OR_RETURN(const ProductPlan plan,
                   PlanProduct("QuantMatmul", QuantProduct{type, w, w_bytes, rows, y, accumulate}, cols, x, kernel));
  return RunProducts({&plan, 1}, x);
}

absl::Status QuantMatmulGroup(absl::Span<const QuantProduct> group, const Q8Activations& x, QuantKernel kernel) {
  if (group.empty()) return absl::InvalidArgumentError("QuantMatmulGroup: group is empty");
  absl::InlinedVector<ProductPlan, 4> plans;
  for (size_t g = 0; g < group.size(); ++g) {
    const std::string fn = absl::StrFormat("QuantMatmulGroup: product %d", g);
    ASSIGN_OR_RETURN(ProductPlan plan, PlanProduct(fn.c_str(), group[g], x.cols, x, kernel));
    plans.push_back(plan);
  }
  return RunProducts(plans, x);
}

}  // namespace tailorkv::model
