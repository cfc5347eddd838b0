#include "runtime/cpu_reference.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <numbers>

#include "runtime/target_clones.h"

namespace tailorkv::runtime::ref {
namespace {

// Bounds of the exp argument: exp(88.73) already overflows float, and
// exp(-103.98) already rounds to 0. The select is written like SSE's min/max
// with the bound first, so NaN passes through and -inf becomes -104.
inline float ClampExpArg(float x) {
  x = 88.8f < x ? 88.8f : x;
  return -104.0f > x ? -104.0f : x;
}

// Cephes expf for x in [-104, 88.8], branch-free so that a loop of it
// vectorizes: x = n ln2 + r with |r| <= ln2/2, exp(r) by a polynomial, times
// 2^n built from exponent bits. 2^n is applied as two factors
// 2^(n/2) 2^(n - n/2) so that n in [-150, 128] needs no special case:
// underflow to denormals rounds once, and overflow gives inf.
inline float ExpOfClamped(float x) {
  // Adding 1.5 * 2^23 rounds x log2(e) to an integer held in the low mantissa bits.
  constexpr float kRoundShift = 12582912.0f;
  const float t = x * 1.44269504088896341f + kRoundShift;
  const float n = t - kRoundShift;
  const int32_t ni = std::bit_cast<int32_t>(t) - std::bit_cast<int32_t>(kRoundShift);
  // ln2 split in two (Cephes C1 + C2): n * C1 is exact.
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t half = ni >> 1;  // arithmetic shift: floor(n / 2)
  const float scale_a = std::bit_cast<float>((half + 127) << 23);
  const float scale_b = std::bit_cast<float>((ni - half + 127) << 23);
  return p * scale_a * scale_b;
}

}  // namespace

// Rows run in chunks of kLanes with per-lane partial results: loops of
// constant trip count, which GCC's -O2 vectorizer takes whole. The clamp is a
// loop of its own: fused with the exp, GCC splits off the clamped path as a
// branch and then cannot if-convert it (float math may trap), leaving the
// loop scalar. Cloned for AVX-512 and AVX2 because -O2 targets SSE2 only.
constexpr int kLanes = 16;

TKV_TARGET_CLONES("avx512f", "avx2", "default")
float RowMax(const float* x, int n) {
  float lane_max[kLanes];
  std::fill(lane_max, lane_max + kLanes, -INFINITY);
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lane_max[l] = x[i + l] > lane_max[l] ? x[i + l] : lane_max[l];
  }
  for (int l = 0; i + l < n; ++l) lane_max[l] = x[i + l] > lane_max[l] ? x[i + l] : lane_max[l];
  return *std::max_element(lane_max, lane_max + kLanes);
}

TKV_TARGET_CLONES("avx512f", "avx2", "default")
float ExpShiftedSum(const float* x, int n, float shift, float* out) {
  float lane_sum[kLanes] = {};
  float arg[kLanes];
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) arg[l] = ClampExpArg(x[i + l] - shift);
    for (int l = 0; l < kLanes; ++l) {
      const float e = ExpOfClamped(arg[l]);
      out[i + l] = e;
      lane_sum[l] += e;
    }
  }
  for (int l = 0; i + l < n; ++l) {
    const float e = ExpOfClamped(ClampExpArg(x[i + l] - shift));
    out[i + l] = e;
    lane_sum[l] += e;
  }
  float sum = 0;
  for (float s : lane_sum) sum += s;
  return sum;
}

void RmsNorm(const float* x, const float* w, int n, float eps, float* out) {
  // Sum in double: the reference must not depend on summation order at the
  // 1e-7 level, so a GPU tree reduction can be compared against it.
  double ss = 0;
  for (int i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float inv = 1.0f / std::sqrt(static_cast<float>(ss / n) + eps);
  for (int i = 0; i < n; ++i) out[i] = x[i] * inv * w[i];
}

std::vector<float> RopeInvFreq(const model::ModelConfig& c) {
  const int half = c.head_dim / 2;
  std::vector<float> inv(half);
  for (int i = 0; i < half; ++i) {
    inv[i] = 1.0f / std::pow(c.rope_theta, static_cast<float>(2 * i) / c.head_dim);
  }
  const auto& s = c.rope_scaling;
  if (s.freq_factors.size() == inv.size()) {
    for (int i = 0; i < half; ++i) inv[i] /= s.freq_factors[i];
  }
  if (s.type == model::RopeScaling::Type::kLinear) {
    for (float& f : inv) f /= s.factor;
  } else if (s.type == model::RopeScaling::Type::kLlama3) {
    // Llama 3.1: long wavelengths are slowed by `factor`, short ones kept,
    // the band between interpolated smoothly.
    const float old_ctx = static_cast<float>(s.original_max_position);
    const float low_wavelen = old_ctx / s.low_freq_factor;
    const float high_wavelen = old_ctx / s.high_freq_factor;
    for (float& f : inv) {
      const float wavelen = 2.0f * std::numbers::pi_v<float> / f;
      if (wavelen < high_wavelen) continue;
      if (wavelen > low_wavelen) {
        f /= s.factor;
        continue;
      }
      const float smooth =
          (old_ctx / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
      f = (1.0f - smooth) * f / s.factor + smooth * f;
    }
  }
  return inv;
}

void ApplyRope(float* x, int head_dim, int pos, const std::vector<float>& inv_freq,
               model::RopeStyle style) {
  const int half = head_dim / 2;
  for (int i = 0; i < half; ++i) {
    // float32 angle, as the reference implementation computes it.
    const float angle = static_cast<float>(pos) * inv_freq[i];
    const float c = std::cos(angle), s = std::sin(angle);
    const int a = style == model::RopeStyle::kAdjacentPairs ? 2 * i : i;
    const int b = style == model::RopeStyle::kAdjacentPairs ? 2 * i + 1 : i + half;
    const float x0 = x[a], x1 = x[b];
    x[a] = x0 * c - x1 * s;
    x[b] = x0 * s + x1 * c;
  }
}

void SwiGlu(float* gate, const float* up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    gate[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void AttentionHead(const float* q, const float* k, const float* v, int n_q, int start_pos,
                   int head_dim, float* out) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  std::vector<float> p(start_pos + n_q);
  for (int i = 0; i < n_q; ++i) {
    const int len = start_pos + i + 1;
    const float* qi = q + static_cast<int64_t>(i) * head_dim;
    float mx = -INFINITY;
    for (int j = 0; j < len; ++j) {
      const float* kj = k + static_cast<int64_t>(j) * head_dim;
      float dot = 0;
      for (int d = 0; d < head_dim; ++d) dot += qi[d] * kj[d];
      p[j] = dot * scale;
      mx = std::max(mx, p[j]);
    }
    double sum = 0;
    for (int j = 0; j < len; ++j) {
      p[j] = std::exp(p[j] - mx);
      sum += p[j];
    }
    float* oi = out + static_cast<int64_t>(i) * head_dim;
    std::fill(oi, oi + head_dim, 0.0f);
    for (int j = 0; j < len; ++j) {
      const float w = static_cast<float>(p[j] / sum);
      const float* vj = v + static_cast<int64_t>(j) * head_dim;
      for (int d = 0; d < head_dim; ++d) oi[d] += w * vj[d];
    }
  }
}

}  // namespace tailorkv::runtime::ref
