// Quantized KV cache of one layer (the `quant` policy): format, packing and
// the fused decode attention, on the CPU. The CUDA kernels use the same byte
// format, and their tests compare against the functions here.
//
// Quantization (KIVI / TailorKV): asymmetric, b bits, per group of G values:
//   min z = min(x), scale s = (max(x) - z) / (2^b - 1), both stored as fp16;
//   code = clamp(rint((x - z16) / s16), 0, 2^b - 1) computed in fp32 from the
//   fp16-rounded z16, s16 (codes are 0 when s16 == 0); x^ = z16 + s16 * code.
// K is quantized per channel with groups of G consecutive tokens, V per token
// with groups of G consecutive channels.
//
// Residual (R tokens, full precision): K keeps its last (len mod R) tokens
// and quantizes a whole R-token block when it fills; V keeps the last R
// tokens and quantizes the oldest as each new one arrives. So for a cache
// holding `len` tokens:
//   quantized keys   = QuantizedKeys(len)   = len - len % R
//   quantized values = QuantizedValues(len) = max(0, len - R)
// Both residuals are rings of R rows: position p lives in row p % R.
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
float DequantizeValue(QuantGroupParams p, uint32_t code);

class QuantKvCpu {
 public:
  explicit QuantKvCpu(const QuantShape& shape);  // shape must be valid

  const QuantShape& shape() const { return shape_; }
  int64_t bytes() const { return shape_.Bytes(sizeof(float)); }

  // Makes the cache hold [0, end) from full-precision K/V of positions
  // [0, end) (k_full/v_full: [kv_head][rows >= end][head_dim], head stride
  // `head_stride` floats), where positions [0, start) were already stored by
  // earlier calls and are bit-identical in k_full/v_full (Materialize gives
  // exactly that). Quantizes the K blocks and V rows that leave the residual
  // and refills both residual rings.
  void Pack(const float* k_full, const float* v_full, int64_t head_stride, int start, int end);

  // Appends position `pos` (== current length) for every KV head:
  // k, v: [kv_head][head_dim]. Same result as Pack(.., pos, pos + 1).
  void Append(int pos, const float* k, const float* v);

  // The values attention sees for positions [0, len): dequantized codes and
  // the residual, written like Pack's inputs.
  void Materialize(int len, float* k_full, float* v_full, int64_t head_stride) const;

  // Fused decode attention over positions [0, len) for one query token:
  // q: [n_heads][head_dim] (query head h uses KV head h / (n_heads / n_kv_heads)),
  // out: [n_heads][head_dim]. Scores are scale * q.k with K dequantized on
  // the fly (q . (z + s * code) = z * sum(q) + s * sum(q * code) per group),
  // one fp32 softmax over quantized and residual tokens, then
  // sum p * V likewise; no dequantized copy is made.
  void Attend(const float* q, int n_heads, int len, float scale, float* out) const;

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
  std::vector<uint32_t> k_codes_, v_codes_;
  std::vector<QuantGroupParams> k_params_, v_params_;
  std::vector<float> k_res_, v_res_;
};

// Test reference: Materialize(len) then plain softmax attention
// (ref::AttentionHead) on the dequantized copy.
void DequantizeThenAttend(const QuantKvCpu& cache, const float* q, int n_heads, int len,
                          float scale, float* out);

}  // namespace tailorkv::runtime
