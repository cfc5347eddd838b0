#include "runtime/cpu_reference.h"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace tailorkv::runtime::ref {

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
