#include "runtime/quant_kv.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "model/ggml_types.h"

namespace tailorkv::runtime {
namespace {

constexpr float kHalfMax = 65504.0f;

// Broken preconditions of QuantKvCpu would corrupt the rings silently; the
// backend validates everything user-facing before calling in.
void Require(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "QuantKvCpu: precondition failed: %s\n", what);
    std::abort();
  }
}

}  // namespace

uint16_t FloatToHalfRoundDown(float f) {
  uint16_t h = model::FloatToHalf(f);
  if (model::HalfToFloat(h) > f) {
    if (h == 0x0000) {
      h = 0x8001;  // +0 -> the negative subnormal closest to zero
    } else if (h & 0x8000) {
      ++h;  // negative: one step away from zero
    } else {
      --h;
    }
  }
  return h;
}

uint16_t FloatToHalfRoundUp(float f) {
  uint16_t h = model::FloatToHalf(f);
  if (model::HalfToFloat(h) < f) {
    if (h == 0x8000) {
      h = 0x0001;  // -0 -> the smallest positive subnormal
    } else if (h & 0x8000) {
      --h;  // negative: one step toward zero
    } else {
      ++h;
    }
  }
  return h;
}

int64_t QuantShape::Bytes(int residual_elem_bytes) const {
  const int64_t per_head = (k_code_words_per_head() + v_code_words_per_head()) * 4 +
                           (k_params_per_head() + v_params_per_head()) * 4 +
                           2 * residual_elems_per_head() * residual_elem_bytes;
  return per_head * n_kv_heads;
}

absl::Status QuantShape::Validate() const {
  const QuantParams& p = params;
  if (n_kv_heads < 1) return absl::InvalidArgumentError(absl::StrCat("n_kv_heads must be >= 1, got ", n_kv_heads));
  if (head_dim < 1) return absl::InvalidArgumentError(absl::StrCat("head_dim must be >= 1, got ", head_dim));
  if (capacity < 1) return absl::InvalidArgumentError(absl::StrCat("capacity must be >= 1, got ", capacity));
  if (p.bits != 1 && p.bits != 2 && p.bits != 4) {
    return absl::InvalidArgumentError(absl::StrCat("bits must be 1, 2 or 4, got ", p.bits));
  }
  if (p.group != 32 && p.group != 64 && p.group != 128) {
    return absl::InvalidArgumentError(absl::StrCat("group must be 32, 64 or 128, got ", p.group));
  }
  if (head_dim % p.group != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("group (", p.group, ") must divide head_dim (", head_dim, ")"));
  }
  if (p.residual < p.group || p.residual > 4096 || p.residual % p.group != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "residual must be a multiple of group (", p.group, ") in [", p.group, ", 4096], got ", p.residual));
  }
  return absl::OkStatus();
}

QuantGroupParams QuantizeGroup(const float* x, int n, int64_t stride, int bits, uint32_t* words) {
  const float M = static_cast<float>((1u << bits) - 1u);
  float lo = INFINITY, hi = -INFINITY;
  for (int i = 0; i < n; ++i) {
    lo = std::fmin(lo, x[i * stride]);
    hi = std::fmax(hi, x[i * stride]);
  }
  const uint16_t z16 = FloatToHalfRoundDown(std::clamp(lo, -kHalfMax, kHalfMax));
  const float z = model::HalfToFloat(z16);
  const uint16_t s16 = FloatToHalfRoundUp(std::fmin(std::fmax((hi - z) / M, 0.0f), kHalfMax));
  const float s = model::HalfToFloat(s16);
  std::memset(words, 0, sizeof(uint32_t) * ((static_cast<int64_t>(n) * bits + 31) / 32));
  if (s != 0.0f) {
    for (int i = 0; i < n; ++i) {
      const float c = std::fmin(std::fmax(std::rint((x[i * stride] - z) / s), 0.0f), M);
      const int bit = i * bits;
      words[bit >> 5] |= static_cast<uint32_t>(c) << (bit & 31);
    }
  }
  return {s16, z16};
}

float DequantizeValue(QuantGroupParams p, uint32_t code) {
  return std::fma(model::HalfToFloat(p.scale), static_cast<float>(code), model::HalfToFloat(p.min));
}

QuantKvCpu::QuantKvCpu(const QuantShape& shape) : shape_(shape) {
  Require(shape.Validate().ok(), "shape must be valid");
  const int64_t h = shape.n_kv_heads;
  k_codes_.assign(h * shape.k_code_words_per_head(), 0);
  k_params_.assign(h * shape.k_params_per_head(), {});
  v_codes_.assign(h * shape.v_code_words_per_head(), 0);
  v_params_.assign(h * shape.v_params_per_head(), {});
  k_res_.assign(h * shape.residual_elems_per_head(), 0.0f);
  v_res_.assign(h * shape.residual_elems_per_head(), 0.0f);
}

void QuantKvCpu::QuantizeKeyBlock(int head, int first_token, const float* k, int64_t token_stride) {
  const int G = shape_.params.group, hd = shape_.head_dim, W = shape_.words_per_group();
  for (int g = 0; g < shape_.params.residual / G; ++g) {
    const int64_t group = first_token / G + g;
    const int64_t base = head * shape_.k_params_per_head() + group * hd;
    for (int c = 0; c < hd; ++c) {
      k_params_[base + c] = QuantizeGroup(k + g * G * token_stride + c, G, token_stride,
                                          shape_.params.bits, &k_codes_[(base + c) * W]);
    }
  }
}

void QuantKvCpu::QuantizeValueRow(int head, int pos, const float* v) {
  const int G = shape_.params.group, W = shape_.words_per_group(), ng = shape_.value_groups();
  const int64_t base = head * shape_.v_params_per_head() + static_cast<int64_t>(pos) * ng;
  for (int g = 0; g < ng; ++g) {
    v_params_[base + g] = QuantizeGroup(v + g * G, G, 1, shape_.params.bits, &v_codes_[(base + g) * W]);
  }
}

void QuantKvCpu::Pack(const float* k_full, const float* v_full, int64_t head_stride, int start,
                      int end) {
  Require(start == length_, "Pack: start == length()");
  Require(start <= end && end <= shape_.capacity, "Pack: start <= end <= capacity");
  const int R = shape_.params.residual, hd = shape_.head_dim;
  const int64_t res = shape_.residual_elems_per_head();
  for (int h = 0; h < shape_.n_kv_heads; ++h) {
    const float* K = k_full + h * head_stride;
    const float* V = v_full + h * head_stride;
    for (int b = QuantizedKeys(start, R); b < QuantizedKeys(end, R); b += R) {
      QuantizeKeyBlock(h, b, K + static_cast<int64_t>(b) * hd, hd);
    }
    // Both rings end up holding positions [end - R, end) as Append leaves
    // them; rows of positions before `start` already do.
    for (int p = std::max(end - R, start); p < end; ++p) {
      std::memcpy(&k_res_[h * res + static_cast<int64_t>(p % R) * hd], K + static_cast<int64_t>(p) * hd,
                  sizeof(float) * hd);
    }
    for (int p = QuantizedValues(start, R); p < QuantizedValues(end, R); ++p) {
      QuantizeValueRow(h, p, V + static_cast<int64_t>(p) * hd);
    }
    for (int p = std::max(end - R, start); p < end; ++p) {
      std::memcpy(&v_res_[h * res + static_cast<int64_t>(p % R) * hd], V + static_cast<int64_t>(p) * hd,
                  sizeof(float) * hd);
    }
  }
  length_ = end;
}

void QuantKvCpu::Append(int pos, const float* k, const float* v) {
  Require(pos == length_, "Append: pos == length()");
  Require(pos < shape_.capacity, "Append: pos < capacity");
  const int R = shape_.params.residual, hd = shape_.head_dim;
  const int64_t res = shape_.residual_elems_per_head();
  for (int h = 0; h < shape_.n_kv_heads; ++h) {
    float* kr = &k_res_[h * res];
    float* vr = &v_res_[h * res];
    std::memcpy(kr + static_cast<int64_t>(pos % R) * hd, k + static_cast<int64_t>(h) * hd, sizeof(float) * hd);
    // A full ring holds positions [pos + 1 - R, pos] in rows 0..R-1, in order.
    if ((pos + 1) % R == 0) QuantizeKeyBlock(h, pos + 1 - R, kr, hd);
    float* row = vr + static_cast<int64_t>(pos % R) * hd;
    if (pos >= R) QuantizeValueRow(h, pos - R, row);  // the row's old token leaves the ring
    std::memcpy(row, v + static_cast<int64_t>(h) * hd, sizeof(float) * hd);
  }
  length_ = pos + 1;
}

void QuantKvCpu::Materialize(int len, float* k_full, float* v_full, int64_t head_stride) const {
  Require(len == length_, "Materialize: len == length()");
  const int R = shape_.params.residual, hd = shape_.head_dim, G = shape_.params.group;
  const int bits = shape_.params.bits, W = shape_.words_per_group(), ng = shape_.value_groups();
  const int64_t res = shape_.residual_elems_per_head();
  const int qk = QuantizedKeys(len, R), qv = QuantizedValues(len, R);
  for (int h = 0; h < shape_.n_kv_heads; ++h) {
    float* K = k_full + h * head_stride;
    float* V = v_full + h * head_stride;
    for (int j = 0; j < qk / G; ++j) {
      const int64_t base = h * shape_.k_params_per_head() + static_cast<int64_t>(j) * hd;
      for (int c = 0; c < hd; ++c) {
        const QuantGroupParams p = k_params_[base + c];
        const uint32_t* words = &k_codes_[(base + c) * W];
        for (int t = 0; t < G; ++t) {
          K[static_cast<int64_t>(j * G + t) * hd + c] = DequantizeValue(p, GroupCode(words, t, bits));
        }
      }
    }
    for (int p = qk; p < len; ++p) {
      std::memcpy(K + static_cast<int64_t>(p) * hd, &k_res_[h * res + static_cast<int64_t>(p % R) * hd],
                  sizeof(float) * hd);
    }
    for (int p = 0; p < qv; ++p) {
      const int64_t base = h * shape_.v_params_per_head() + static_cast<int64_t>(p) * ng;
      for (int g = 0; g < ng; ++g) {
        const QuantGroupParams prm = v_params_[base + g];
        const uint32_t* words = &v_codes_[(base + g) * W];
        for (int i = 0; i < G; ++i) {
          V[static_cast<int64_t>(p) * hd + g * G + i] = DequantizeValue(prm, GroupCode(words, i, bits));
        }
      }
    }
    for (int p = qv; p < len; ++p) {
      std::memcpy(V + static_cast<int64_t>(p) * hd, &v_res_[h * res + static_cast<int64_t>(p % R) * hd],
                  sizeof(float) * hd);
    }
  }
}

void QuantKvCpu::Attend(const float* q, int n_heads, int len, float scale, float* out) const {
  Require(n_heads % shape_.n_kv_heads == 0, "Attend: n_heads is a multiple of n_kv_heads");
  std::vector<float> scores(std::max(len, 1));
  const int group = n_heads / shape_.n_kv_heads, hd = shape_.head_dim;
  for (int h = 0; h < n_heads; ++h) {
    AttendHead(q + static_cast<int64_t>(h) * hd, h / group, len, scale, scores.data(),
               out + static_cast<int64_t>(h) * hd);
  }
}

void QuantKvCpu::AttendHead(const float* qh, int kvh, int len, float scale, float* p,
                            float* o) const {
  Require(len == length_ && len >= 1, "Attend: len == length() >= 1");
  Require(kvh >= 0 && kvh < shape_.n_kv_heads, "Attend: kv_head in range");
  const int R = shape_.params.residual, hd = shape_.head_dim, G = shape_.params.group;
  const int bits = shape_.params.bits, W = shape_.words_per_group(), ng = shape_.value_groups();
  const int64_t res = shape_.residual_elems_per_head();
  const int qk = QuantizedKeys(len, R), qv = QuantizedValues(len, R);
  // Quantized keys: per group, sum_c q_c z_c once plus (q_c s_c) * code.
  for (int j = 0; j < qk / G; ++j) {
    float* s = p + static_cast<int64_t>(j) * G;
    std::fill(s, s + G, 0.0f);
    float qz = 0.0f;
    const int64_t base = kvh * shape_.k_params_per_head() + static_cast<int64_t>(j) * hd;
    for (int c = 0; c < hd; ++c) {
      const QuantGroupParams prm = k_params_[base + c];
      qz += qh[c] * model::HalfToFloat(prm.min);
      const float qs = qh[c] * model::HalfToFloat(prm.scale);
      const uint32_t* words = &k_codes_[(base + c) * W];
      for (int t = 0; t < G; ++t) s[t] += qs * static_cast<float>(GroupCode(words, t, bits));
    }
    for (int t = 0; t < G; ++t) s[t] = (s[t] + qz) * scale;
  }
  for (int t = qk; t < len; ++t) {
    const float* k = &k_res_[kvh * res + static_cast<int64_t>(t % R) * hd];
    float dot = 0.0f;
    for (int c = 0; c < hd; ++c) dot += qh[c] * k[c];
    p[t] = dot * scale;
  }
  const float mx = *std::max_element(p, p + len);
  float sum = 0.0f;
  for (int t = 0; t < len; ++t) {
    p[t] = std::exp(p[t] - mx);
    sum += p[t];
  }
  std::fill(o, o + hd, 0.0f);
  for (int t = 0; t < qv; ++t) {
    const int64_t base = kvh * shape_.v_params_per_head() + static_cast<int64_t>(t) * ng;
    for (int g = 0; g < ng; ++g) {
      const QuantGroupParams prm = v_params_[base + g];
      const float pz = p[t] * model::HalfToFloat(prm.min);
      const float ps = p[t] * model::HalfToFloat(prm.scale);
      const uint32_t* words = &v_codes_[(base + g) * W];
      for (int i = 0; i < G; ++i) o[g * G + i] += ps * static_cast<float>(GroupCode(words, i, bits)) + pz;
    }
  }
  for (int t = qv; t < len; ++t) {
    const float* v = &v_res_[kvh * res + static_cast<int64_t>(t % R) * hd];
    for (int c = 0; c < hd; ++c) o[c] += p[t] * v[c];
  }
  const float inv = 1.0f / sum;
  for (int c = 0; c < hd; ++c) o[c] *= inv;
}

void DequantizeThenAttend(const QuantKvCpu& cache, const float* q, int n_heads, int len,
                          float scale, float* out) {
  const QuantShape& sh = cache.shape();
  const int hd = sh.head_dim, group = n_heads / sh.n_kv_heads;
  const int64_t head_stride = static_cast<int64_t>(len) * hd;
  std::vector<float> k(head_stride * sh.n_kv_heads), v(k.size());
  cache.Materialize(len, k.data(), v.data(), head_stride);
  std::vector<double> s(len), o(hd);
  for (int h = 0; h < n_heads; ++h) {
    const float* K = &k[(h / group) * head_stride];
    const float* V = &v[(h / group) * head_stride];
    const float* qh = q + static_cast<int64_t>(h) * hd;
    double mx = -INFINITY;
    for (int t = 0; t < len; ++t) {
      double dot = 0;
      for (int c = 0; c < hd; ++c) dot += static_cast<double>(qh[c]) * K[static_cast<int64_t>(t) * hd + c];
      s[t] = dot * scale;
      mx = std::max(mx, s[t]);
    }
    double sum = 0;
    std::fill(o.begin(), o.end(), 0.0);
    for (int t = 0; t < len; ++t) {
      const double e = std::exp(s[t] - mx);
      sum += e;
      for (int c = 0; c < hd; ++c) o[c] += e * V[static_cast<int64_t>(t) * hd + c];
    }
    for (int c = 0; c < hd; ++c) out[static_cast<int64_t>(h) * hd + c] = static_cast<float>(o[c] / sum);
  }
}

}  // namespace tailorkv::runtime
