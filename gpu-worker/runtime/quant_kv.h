// Quantized KV cache of one layer (the `quant` policy): format, packing and
// the fused decode attention, on the CPU. The CUDA kernels use the same byte
// format, and their tests compare against the functions here.
//
// Quantization (KIVI / TailorKV): asymmetric, b bits, per group of G values,
// M = 2^b - 1. These exact fp32 operations (IEEE division, no fast math) are
// the contract the CUDA kernels reproduce bit for bit:
//   lo, hi = min and max of the group (fminf / fmaxf: NaNs are ignored;
//            lo = +inf, hi = -inf for a group of only NaNs)
//   z16 = fp16 of clamp(lo, -65504, 65504) rounded DOWN   (__float2half_rd)
//   z   = float(z16)
//   s16 = fp16 of clamp((hi - z) / M, 0, 65504) rounded UP (__float2half_ru),
//         clamp as fminf(fmaxf(v, 0), 65504)
//   s   = float(s16)
//   code = s16 == 0 ? 0 : (uint32) fminf(fmaxf(rintf((x - z) / s), 0), M)
//   x^   = fmaf(s, code, z)                     (one rounding)
// Rounding z down and s up keeps every finite x in [-65504, 65504] inside
// [z, z + s * M], so |x - x^| <= s/2 (plus fp32 rounding of the ops above);
// KIVI's round-to-nearest can exceed that at the clamped ends. s16 == 0 only
// when every value equals z exactly (a constant fp16-representable group),
// which is then stored exactly. Values beyond +-65504 saturate (finite but
// unbounded error); NaN inputs get code 0.
// K is quantized per channel with groups of G consecutive tokens, V per token
// with groups of G consecutive channels.
//
// Residual (R tokens, full precision): K keeps its last (len mod R) tokens
// and quantizes a whole R-token block when it fills; V keeps the last R
// tokens and quantizes the oldest as each new one arrives. So for a cache
// holding `len` tokens:
//   quantized keys   = QuantizedKeys(len)   = len - len % R
//   quantized values = QuantizedValues(len) = max(0, len - R)
// Both residuals are rings of R rows: position p lives in row p % R, and
// both hold the last min(len, R) positions (K's rows of positions already
// quantized are stale copies, kept so that the arrays depend only on the
// content, never on how it arrived: Pack in any chunks == Append one by one,
// bit for bit, every array). Rows never written stay 0; codes and params of
// groups not yet quantized stay 0.
//
// Byte format, per KV head (all arrays [kv_head] outermost, row-major):
//   W = G * b / 32 words per group;
//   k_codes  [kv_head][key_groups][head_dim][W] uint32   key_groups = capacity / G rounded up
//   k_params [kv_head][key_groups][head_dim]   {uint16 scale_f16, uint16 min_f16}
//   v_codes  [kv_head][capacity][head_dim / G][W] uint32
//   v_params [kv_head][capacity][head_dim / G] {uint16 scale_f16, uint16 min_f16}
//   k_res, v_res [kv_head][R][head_dim] full precision (fp32 here, bf16 on the GPU)
// Inside a group's W words, element i (token i of a K group, channel i of a
// V group) occupies bits [(i*b) % 32, (i*b) % 32 + b) of word (i*b) / 32.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "runtime/kv_plan.h"

namespace tailorkv::runtime {

struct QuantShape {
  int n_kv_heads = 0;
  int head_dim = 0;
  int capacity = 0;  // tokens
  QuantParams params;

  int words_per_group() const { return params.group * params.bits / 32; }
  int key_groups() const { return (capacity + params.group - 1) / params.group; }
  int value_groups() const { return head_dim / params.group; }  // per token
  int64_t k_code_words_per_head() const {
    return static_cast<int64_t>(key_groups()) * head_dim * words_per_group();
  }
  int64_t k_params_per_head() const { return static_cast<int64_t>(key_groups()) * head_dim; }
  int64_t v_code_words_per_head() const {
    return static_cast<int64_t>(capacity) * value_groups() * words_per_group();
  }
  int64_t v_params_per_head() const { return static_cast<int64_t>(capacity) * value_groups(); }
  int64_t residual_elems_per_head() const {
    return static_cast<int64_t>(params.residual) * head_dim;
  }
  // Bytes of codes + params (+ residual at `residual_elem_bytes` per value),
  // all KV heads: the cache's memory.
  int64_t Bytes(int residual_elem_bytes) const;

  absl::Status Validate() const;  // bits/group/residual in range, group | head_dim
};

inline int QuantizedKeys(int len, int residual) { return len - len % residual; }
inline int QuantizedValues(int len, int residual) { return len > residual ? len - residual : 0; }

// {scale, min} as stored: fp16 bit patterns.
struct QuantGroupParams {
  uint16_t scale = 0;
  uint16_t min = 0;
};
static_assert(sizeof(QuantGroupParams) == 4);

// Quantizes n values x[0], x[stride], ... into one group: params and
// n * bits bits of codes written from bit 0 of `words` (whose
// ceil(n * bits / 32) words are overwritten).
QuantGroupParams QuantizeGroup(const float* x, int n, int64_t stride, int bits, uint32_t* words);
// Code of element i of a group.
inline uint32_t GroupCode(const uint32_t* words, int i, int bits) {
  const int bit = i * bits;
  return (words[bit >> 5] >> (bit & 31)) & ((1u << bits) - 1u);
}
// x^ = fmaf(s, code, z) with s, z the fp16 params as floats.
float DequantizeValue(QuantGroupParams p, uint32_t code);
// fp16 conversions with directed rounding, for finite f in [-65504, 65504]
// (what __float2half_rd / __float2half_ru give there).
uint16_t FloatToHalfRoundDown(float f);
uint16_t FloatToHalfRoundUp(float f);

class QuantKvCpu {
 public:
  explicit QuantKvCpu(const QuantShape& shape);  // shape must be valid

  const QuantShape& shape() const { return shape_; }
  // Positions stored so far (the `end` of the last Pack / Append). Pack's
  // `start`, Append's `pos` and the `len` of Materialize / Attend must equal
  // it; a call that breaks this (or exceeds capacity) is a caller bug and
  // aborts, since it would corrupt the rings silently.
  int length() const { return length_; }
  int64_t bytes() const { return shape_.Bytes(sizeof(float)); }

  // Makes the cache hold [0, end) from full-precision K/V of positions
  // [0, end) (k_full/v_full: [kv_head][rows >= end][head_dim], head stride
  // `head_stride` floats), where positions [0, start) were already stored by
  // earlier calls and are bit-identical in k_full/v_full (Materialize gives
  // exactly that). Quantizes the K blocks and V rows that leave the residual
  // and refills both residual rings. Reads history rows only where a K block
  // or V row quantized now started before `start` (those are still exact in
  // the residual), so chunked Packs fed with Materialize(start) + the chunk
  // give the same arrays as one Pack of all the original data: every value
  // is quantized once, from its exact value.
  void Pack(const float* k_full, const float* v_full, int64_t head_stride, int start, int end);

  // Appends position `pos` (== current length) for every KV head:
  // k, v: [kv_head][head_dim]. Same result as Pack(.., pos, pos + 1).
  void Append(int pos, const float* k, const float* v);

  // The values attention sees for positions [0, len) (len == length()):
  // dequantized codes (x^ above) and the exact residual, written like
  // Pack's inputs; rows >= len are not touched.
  void Materialize(int len, float* k_full, float* v_full, int64_t head_stride) const;

  // Fused decode attention over positions [0, len) (len == length()) for
  // one query token: q: [n_heads][head_dim] (query head h uses KV head
  // h / (n_heads / n_kv_heads)), out: [n_heads][head_dim]. No dequantized
  // copy is made. In fp32, per query head:
  //   key group j (tokens jG..jG+G-1), per channel c with params z_c, s_c:
  //     score_t = sum_c q_c z_c + sum_c (q_c s_c) code_{t,c}
  //   residual tokens: score_t = q . k_t;  then scores *= scale;
  //   one softmax over all len scores (max subtracted, expf);
  //   out = (sum_{t quantized} [p_t z_{t,g} + (p_t s_{t,g}) code_{t,c}]
  //          + sum_{t residual} p_t v_t) / sum_t p_t.
  // The summation order is not part of the contract: a GPU kernel matches
  // this to a tolerance, not bit-exactly.
  void Attend(const float* q, int n_heads, int len, float scale, float* out) const;
  // Attend for one query head: q_h, out_h: [head_dim] against KV head
  // `kv_head`; `scores` is len floats of caller scratch. Attend runs this
  // for every head (callers parallelize over heads with it).
  void AttendHead(const float* q_h, int kv_head, int len, float scale, float* scores,
                  float* out_h) const;

  // Raw arrays in the byte format above (the GPU tests upload these).
  const std::vector<uint32_t>& k_codes() const { return k_codes_; }
  const std::vector<QuantGroupParams>& k_params() const { return k_params_; }
  const std::vector<uint32_t>& v_codes() const { return v_codes_; }
  const std::vector<QuantGroupParams>& v_params() const { return v_params_; }
  const std::vector<float>& k_res() const { return k_res_; }
  const std::vector<float>& v_res() const { return v_res_; }

 private:
  void QuantizeKeyBlock(int head, int first_token, const float* k, int64_t token_stride);
  void QuantizeValueRow(int head, int pos, const float* v);

  QuantShape shape_;
  int length_ = 0;
  std::vector<uint32_t> k_codes_, v_codes_;
  std::vector<QuantGroupParams> k_params_, v_params_;
  std::vector<float> k_res_, v_res_;
};

// Test reference: Materialize(len) then plain softmax attention (double
// accumulation) on the dequantized copy.
void DequantizeThenAttend(const QuantKvCpu& cache, const float* q, int n_heads, int len,
                          float scale, float* out);

}  // namespace tailorkv::runtime
