// A small random Llama-shaped model for backend tests (no file needed).
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "model/ggml_types.h"
#include "model/llama_weights.h"

namespace tailorkv::runtime::testing {

inline model::Tensor RandomTensor(std::vector<int64_t> shape, std::mt19937& rng, float scale,
                                  float offset = 0.0f) {
  model::Tensor t;
  t.shape = std::move(shape);
  int64_t n = 1;
  for (int64_t d : t.shape) n *= d;
  std::normal_distribution<float> dist(0.0f, scale);
  t.data.resize(n);
  for (float& v : t.data) v = offset + dist(rng);
  return t;
}

// Sizes of a random test model. The defaults are odd on purpose: a GQA
// group of 3 (6 heads / 2 KV heads), vocab 97, 3 layers.
struct TinyShape {
  int n_layers = 3;
  int n_heads = 6;
  int n_kv_heads = 2;
  int head_dim = 8;
  int hidden = 48;
  int ffn = 72;
  int vocab = 97;
  int max_context = 640;
  float weight_scale = 0.15f;
};

inline model::ModelWeights TinyModel(uint32_t seed, model::RopeStyle style, bool tied,
                                     const TinyShape& shape = {}) {
  std::mt19937 rng(seed);
  model::ModelWeights w;
  auto& c = w.config;
  c.arch = "llama";
  c.name = "tiny";
  c.n_layers = shape.n_layers;
  c.n_heads = shape.n_heads;
  c.n_kv_heads = shape.n_kv_heads;
  c.head_dim = shape.head_dim;
  c.hidden = shape.hidden;
  c.ffn = shape.ffn;
  c.vocab = shape.vocab;
  c.max_context = shape.max_context;
  c.rope_theta = 10000.0f;
  c.rms_eps = 1e-5f;
  c.rope_style = style;
  c.tied_embeddings = tied;
  const float s = shape.weight_scale;
  w.tok_embd = RandomTensor({c.vocab, c.hidden}, rng, 1.0f);
  w.output_norm = RandomTensor({c.hidden}, rng, 0.1f, 1.0f);
  if (!tied) w.output = RandomTensor({c.vocab, c.hidden}, rng, s);
  for (int l = 0; l < c.n_layers; ++l) {
    model::LayerWeights L;
    L.attn_norm = RandomTensor({c.hidden}, rng, 0.1f, 1.0f);
    L.wq = RandomTensor({c.n_heads * c.head_dim, c.hidden}, rng, s);
    L.wk = RandomTensor({c.n_kv_heads * c.head_dim, c.hidden}, rng, s);
    L.wv = RandomTensor({c.n_kv_heads * c.head_dim, c.hidden}, rng, s);
    L.wo = RandomTensor({c.hidden, c.n_heads * c.head_dim}, rng, s);
    L.ffn_norm = RandomTensor({c.hidden}, rng, 0.1f, 1.0f);
    L.w_gate = RandomTensor({c.ffn, c.hidden}, rng, s);
    L.w_up = RandomTensor({c.ffn, c.hidden}, rng, s);
    L.w_down = RandomTensor({c.hidden, c.ffn}, rng, s);
    w.layers.push_back(std::move(L));
  }
  return w;
}

// The GPU holds bf16 weights: give a CPU reference the same rounded values
// so a comparison measures the kernels, not the weight format.
inline void RoundWeightsToBf16(model::ModelWeights& w) {
  auto round = [](model::Tensor& t) {
    for (float& v : t.data) v = model::Bf16ToFloat(model::FloatToBf16(v));
  };
  round(w.tok_embd);
  round(w.output);
  for (auto& L : w.layers) {
    for (auto* t : {&L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up, &L.w_down}) round(*t);
  }
}

// n token ids uniform in [0, vocab), seeded.
inline std::vector<int32_t> RandomTokens(int n, int vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> d(0, vocab - 1);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = d(rng);
  return t;
}

}  // namespace tailorkv::runtime::testing
