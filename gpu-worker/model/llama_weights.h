// The Llama-family model description and its float32 host weights, loaded
// from GGUF or from a Hugging Face safetensors directory.
//
// Every backend consumes ModelWeights; the loaders are the only code that
// knows file formats. Linear weights are row-major [out][in] (y = W x).
//
// Rotary convention: GGUF files of the "llama" architecture store the rows of
// Q and K permuted so that RoPE rotates adjacent pairs (x[2i], x[2i+1]);
// Hugging Face checkpoints rotate halves (x[i], x[i + d/2]). The loader does
// not un-permute; it records which convention the weights need in
// ModelConfig::rope_style, and backends apply that convention.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/ggml_types.h"

namespace tailorkv::model {

class GgufFile;

enum class RopeStyle { kAdjacentPairs, kHalves };

struct RopeScaling {
  enum class Type { kNone, kLinear, kLlama3 };
  Type type = Type::kNone;
  float factor = 1.0f;
  float low_freq_factor = 1.0f;
  float high_freq_factor = 4.0f;
  int64_t original_max_position = 8192;
  // GGUF's rope_freqs.weight (Llama 3.x files: llama3 scaling precomputed
  // per frequency, as llama.cpp applies it): frequency i is divided by
  // freq_factors[i]; head_dim / 2 entries, or empty. Applied before `type`'s
  // scaling, which then must not be kLlama3 (it would scale twice).
  std::vector<float> freq_factors;
};

struct ModelConfig {
  std::string arch;  // "llama" (others of the family map onto it)
  std::string name;
  int n_layers = 0;
  int hidden = 0;
  int n_heads = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  int ffn = 0;
  int vocab = 0;
  int max_context = 0;  // trained context length
  float rope_theta = 10000.0f;
  float rms_eps = 1e-5f;
  RopeStyle rope_style = RopeStyle::kHalves;
  RopeScaling rope_scaling;
  bool tied_embeddings = false;

  // InvalidArgument naming the field when a value is impossible (non-positive
  // sizes, n_heads % n_kv_heads != 0, odd head_dim, non-positive rope_theta or
  // rms_eps, inconsistent rope_scaling). n_heads * head_dim may differ from
  // hidden: checkpoints that set head_dim explicitly do that.
  absl::Status Validate() const;
};

struct Tensor {
  std::vector<int64_t> shape;  // outermost first: a linear weight is {out, in}
  std::vector<float> data;     // float32 values; empty while `quant` holds the tensor
  // The tensor in its GGUF block format (WeightLoadOptions::keep_quantized),
  // rows of `shape.back()` values one after another: `bytes` points into the
  // file's mapping, which ModelWeights::storage keeps alive.
  struct Quant {
    GgmlType type = GgmlType::kF32;
    const uint8_t* bytes = nullptr;
    int64_t size = 0;
  } quant;
  bool quantized() const { return quant.bytes != nullptr; }
  int64_t rows() const { return shape.empty() ? 0 : shape.front(); }
  int64_t cols() const { return shape.empty() ? 0 : shape.back(); }
  // Bytes of one row of a quantized tensor.
  int64_t quant_row_bytes() const { return rows() > 0 ? quant.size / rows() : 0; }
};

struct LayerWeights {
  Tensor attn_norm;       // {hidden}
  Tensor wq, wk, wv, wo;  // {n_heads*hd, hidden}, {n_kv*hd, hidden} x2, {hidden, n_heads*hd}
  Tensor ffn_norm;        // {hidden}
  Tensor w_gate, w_up;    // {ffn, hidden}
  Tensor w_down;          // {hidden, ffn}
};

struct ModelWeights {
  ModelConfig config;
  Tensor tok_embd;     // {vocab, hidden}
  Tensor output_norm;  // {hidden}
  Tensor output;       // {vocab, hidden}; empty when config.tied_embeddings
  std::vector<LayerWeights> layers;
  // The output head: `output` or, when tied, `tok_embd`.
  const Tensor& head() const { return config.tied_embeddings ? tok_embd : output; }
  // What quantized tensors point into (the GGUF file), shared by copies.
  std::shared_ptr<const void> storage;

  // Tensors held quantized.
  int QuantizedTensors() const;
  // Dequantizes every quantized tensor to float32 `data` (for consumers that
  // take floats only, e.g. the CUDA backend's upload) and drops `storage`.
  absl::Status Dequantize();
};

struct WeightLoadOptions {
  // Keep the linear weights (and the token embedding) whose type QuantMatmul
  // takes (quant_dot.h) as views of the file instead of float32 copies; the
  // norms and any other type are dequantized as before.
  bool keep_quantized = false;
};

// Reads config from GGUF metadata ("<arch>.block_count", ...) and dequantizes
// every tensor, checking each shape against the config. Only the "llama"
// architecture is accepted (Unimplemented otherwise, and for GGUF features
// ModelConfig cannot express: YaRN, partial rotary). Llama 3.x files'
// rope_freqs.weight becomes rope_scaling.freq_factors.
// Errors name the file and the key or tensor.
absl::StatusOr<ModelConfig> ConfigFromGguf(const GgufFile& gguf);
absl::StatusOr<ModelWeights> LoadWeightsFromGguf(const GgufFile& gguf);
// With keep_quantized, the weights share ownership of `gguf` (storage).
absl::StatusOr<ModelWeights> LoadWeightsFromGguf(std::shared_ptr<const GgufFile> gguf,
                                                 const WeightLoadOptions& options);

// Reads `dir`/config.json and `dir`/*.safetensors (single file or sharded with
// model.safetensors.index.json); F32, F16 and BF16 tensors. model_type must
// be "llama" (or absent); rope_scaling "llama3" and "linear" are recorded in
// config.rope_scaling. Implemented in safetensors.cc.
absl::StatusOr<ModelWeights> LoadWeightsFromSafetensors(const std::string& dir);

}  // namespace tailorkv::model
