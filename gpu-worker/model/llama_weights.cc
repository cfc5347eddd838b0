#include "model/llama_weights.h"

#include <cmath>
#include <limits>
#include <new>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "model/gguf_file.h"
#include "model/quant_dot.h"

namespace tailorkv::model {

absl::Status ModelConfig::Validate() const {
  auto bad = [](absl::string_view field, auto value, absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat("ModelConfig: ", field, " = ", value, " ", why));
  };
  const std::pair<const char*, int> positive[] = {
      {"n_layers", n_layers},     {"hidden", hidden},           {"n_heads", n_heads},
      {"n_kv_heads", n_kv_heads}, {"head_dim", head_dim},       {"ffn", ffn},
      {"vocab", vocab},           {"max_context", max_context},
  };
  for (const auto& [field, value] : positive) {
    if (value <= 0) return bad(field, value, "must be positive");
  }
  if (n_heads % n_kv_heads != 0) {
    return bad("n_heads", n_heads,
               absl::StrFormat("is not a multiple of n_kv_heads (%d)", n_kv_heads));
  }
  if (head_dim % 2 != 0) return bad("head_dim", head_dim, "must be even (RoPE rotates pairs)");
  if (!(std::isfinite(rope_theta) && rope_theta > 0)) {
    return bad("rope_theta", rope_theta, "must be positive and finite");
  }
  if (!(std::isfinite(rms_eps) && rms_eps > 0)) {
    return bad("rms_eps", rms_eps, "must be positive and finite");
  }
  const RopeScaling& rs = rope_scaling;
  if (rs.type != RopeScaling::Type::kNone && !(std::isfinite(rs.factor) && rs.factor > 0)) {
    return bad("rope_scaling.factor", rs.factor, "must be positive and finite");
  }
  if (!rs.freq_factors.empty()) {
    if (static_cast<int>(rs.freq_factors.size()) != head_dim / 2) {
      return bad("rope_scaling.freq_factors", static_cast<int64_t>(rs.freq_factors.size()),
                 absl::StrCat("must hold head_dim / 2 = ", head_dim / 2, " factors"));
    }
    for (size_t i = 0; i < rs.freq_factors.size(); ++i) {
      if (!(std::isfinite(rs.freq_factors[i]) && rs.freq_factors[i] > 0)) {
        return bad(absl::StrCat("rope_scaling.freq_factors[", i, "]"), rs.freq_factors[i],
                   "must be positive and finite");
      }
    }
    if (rs.type == RopeScaling::Type::kLlama3) {
      return absl::InvalidArgumentError(
          "rope_scaling: freq_factors and type llama3 together would scale the frequencies twice");
    }
  }
  if (rs.type == RopeScaling::Type::kLlama3) {
    if (!(rs.low_freq_factor > 0 && rs.high_freq_factor > rs.low_freq_factor)) {
      return bad("rope_scaling.high_freq_factor", rs.high_freq_factor,
                 absl::StrCat("must exceed low_freq_factor (", rs.low_freq_factor, ") > 0"));
    }
    if (rs.original_max_position <= 0) {
      return bad("rope_scaling.original_max_position", rs.original_max_position,
                 "must be positive");
    }
  }
  return absl::OkStatus();
}

namespace {

// An optional integer key: absent yields `fallback` (or NotFound when none).
absl::StatusOr<int> IntKey(const GgufFile& g, const std::string& key,
                           std::optional<int64_t> fallback = std::nullopt) {
  int64_t v;
  if (g.Find(key) == nullptr && fallback.has_value()) {
    v = *fallback;
  } else {
    ASSIGN_OR_RETURN(v, g.GetInt(key));
  }
  if (v < 0 || v > std::numeric_limits<int>::max()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: metadata key '%s' = %d is out of range", g.path(), key, v));
  }
  return static_cast<int>(v);
}

absl::StatusOr<float> FloatKey(const GgufFile& g, const std::string& key, double fallback) {
  if (g.Find(key) == nullptr) return static_cast<float>(fallback);
  ASSIGN_OR_RETURN(double v, g.GetFloat(key));
  return static_cast<float>(v);
}

absl::Status ReadRopeScaling(const GgufFile& g, const std::string& arch, int head_dim, RopeScaling& out) {
  // Llama 3.x GGUFs carry llama3-style scaling as per-frequency factors in a
  // tensor rather than as metadata (ignoring them would silently change the
  // model past the original context).
  if (const GgufTensorInfo* t = g.FindTensor("rope_freqs.weight"); t != nullptr) {
    if (t->ne.size() != 1 || t->ne[0] != head_dim / 2) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: tensor 'rope_freqs.weight' must hold head_dim / 2 = %d factors (one dimension), has shape [%s]",
          g.path(), head_dim / 2, absl::StrJoin(t->ne, ", ")));
    }
    // Their values are checked with the rest of the config (Validate).
    ASSIGN_OR_RETURN(out.freq_factors, g.DequantizeTensor("rope_freqs.weight"));
  }
  const std::string type_key = arch + ".rope.scaling.type";
  std::string type = "none";
  if (g.Find(type_key) != nullptr) {
    ASSIGN_OR_RETURN(type, g.GetString(type_key));
  }
  if (type == "none") {
    // Older converters wrote linear scaling as a bare factor.
    const std::string legacy = arch + ".rope.scale_linear";
    if (g.Find(legacy) != nullptr) {
      ASSIGN_OR_RETURN(double f, g.GetFloat(legacy));
      if (f != 1.0) {
        out.type = RopeScaling::Type::kLinear;
        out.factor = static_cast<float>(f);
      }
    }
    return absl::OkStatus();
  }
  if (type == "linear") {
    out.type = RopeScaling::Type::kLinear;
    ASSIGN_OR_RETURN(double f, g.GetFloat(arch + ".rope.scaling.factor"));
    out.factor = static_cast<float>(f);
    return absl::OkStatus();
  }
  return absl::UnimplementedError(
      absl::StrFormat("%s: %s = '%s' is not supported (none, linear)", g.path(), type_key, type));
}

// Loads a GGUF tensor whose ggml dims are the reverse of `shape` (ggml lists
// the contiguous dimension first; we list the outermost first).
absl::StatusOr<Tensor> LoadTensor(const GgufFile& g, const std::string& name,
                                  std::vector<int64_t> shape, bool keep_quantized = false) {
  const GgufTensorInfo* info = g.FindTensor(name);
  if (info == nullptr) {
    return absl::NotFoundError(absl::StrFormat("%s: tensor '%s' is missing", g.path(), name));
  }
  const std::vector<int64_t> want_ne(shape.rbegin(), shape.rend());
  if (info->ne != want_ne) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: tensor '%s' has ggml dims [%s], expected [%s] (shape [%s] as {out, in})", g.path(),
        name, absl::StrJoin(info->ne, ", "), absl::StrJoin(want_ne, ", "),
        absl::StrJoin(shape, ", ")));
  }
  Tensor t;
  t.shape = std::move(shape);
  if (keep_quantized && t.shape.size() == 2 && QuantMatmulSupports(info->type)) {
    const absl::Span<const uint8_t> bytes = g.TensorBytes(*info);
    t.quant = {info->type, bytes.data(), static_cast<int64_t>(bytes.size())};
    return t;
  }
  ASSIGN_OR_RETURN(t.data, g.DequantizeTensor(name));
  return t;
}

}  // namespace

absl::StatusOr<ModelConfig> ConfigFromGguf(const GgufFile& g) {
  ModelConfig c;
  ASSIGN_OR_RETURN(c.arch, g.GetString("general.architecture"));
  // Other architectures of the family differ in ways ModelWeights cannot
  // express (qwen2: QKV biases; others: different norms or RoPE layouts).
  if (c.arch != "llama") {
    return absl::UnimplementedError(absl::StrFormat(
        "%s: general.architecture '%s' is not supported (only 'llama')", g.path(), c.arch));
  }
  if (g.Find("general.name") != nullptr) {
    ASSIGN_OR_RETURN(c.name, g.GetString("general.name"));
  }
  const std::string p = c.arch + ".";
  ASSIGN_OR_RETURN(c.n_layers, IntKey(g, p + "block_count"));
  ASSIGN_OR_RETURN(c.hidden, IntKey(g, p + "embedding_length"));
  ASSIGN_OR_RETURN(c.n_heads, IntKey(g, p + "attention.head_count"));
  ASSIGN_OR_RETURN(c.n_kv_heads, IntKey(g, p + "attention.head_count_kv", c.n_heads));
  ASSIGN_OR_RETURN(c.ffn, IntKey(g, p + "feed_forward_length"));
  ASSIGN_OR_RETURN(c.max_context, IntKey(g, p + "context_length"));

  // As in llama.cpp: the key head size defaults to hidden / heads, and the
  // rotated dimensions default to the whole head.
  const int64_t default_hd = c.n_heads > 0 ? c.hidden / c.n_heads : 0;
  ASSIGN_OR_RETURN(c.head_dim, IntKey(g, p + "attention.key_length", default_hd));
  ASSIGN_OR_RETURN(const int rope_dims, IntKey(g, p + "rope.dimension_count", c.head_dim));
  if (g.Find(p + "attention.value_length") != nullptr) {
    ASSIGN_OR_RETURN(const int v_dim, IntKey(g, p + "attention.value_length"));
    if (v_dim != c.head_dim) {
      return absl::UnimplementedError(absl::StrFormat(
          "%s: value head size %d differs from key head size %d", g.path(), v_dim, c.head_dim));
    }
  }
  if (rope_dims != c.head_dim) {
    return absl::UnimplementedError(absl::StrFormat(
        "%s: partial rotary embedding (rope.dimension_count %d < head_dim %d) is not supported",
        g.path(), rope_dims, c.head_dim));
  }
  ASSIGN_OR_RETURN(c.rope_theta, FloatKey(g, p + "rope.freq_base", 10000.0));
  ASSIGN_OR_RETURN(c.rms_eps, FloatKey(g, p + "attention.layer_norm_rms_epsilon", 1e-5));
  RETURN_IF_ERROR(ReadRopeScaling(g, c.arch, c.head_dim, c.rope_scaling));

  // Vocabulary: the embedding's row count is what the weights hold; the
  // tokenizer's token list, when present, must agree with it.
  std::optional<int64_t> vocab;
  if (const GgufTensorInfo* embd = g.FindTensor("token_embd.weight");
      embd != nullptr && embd->ne.size() == 2) {
    vocab = embd->ne[1];
  }
  if (const GgufValue* tokens = g.Find("tokenizer.ggml.tokens"); tokens != nullptr) {
    ASSIGN_OR_RETURN(std::vector<std::string> list, g.GetStringArray("tokenizer.ggml.tokens"));
    const int64_t n = static_cast<int64_t>(list.size());
    if (vocab.has_value() && *vocab != n) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: tokenizer.ggml.tokens has %d entries but token_embd.weight has %d rows", g.path(), n,
          *vocab));
    }
    vocab = n;
  }
  if (!vocab.has_value()) {
    ASSIGN_OR_RETURN(vocab, IntKey(g, p + "vocab_size"));
  }
  if (*vocab > std::numeric_limits<int>::max()) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: vocab %d too large", g.path(), *vocab));
  }
  c.vocab = static_cast<int>(*vocab);
  c.tied_embeddings = g.FindTensor("output.weight") == nullptr;
  c.rope_style = RopeStyle::kAdjacentPairs;
  if (absl::Status s = c.Validate(); !s.ok()) {
    return absl::Status(s.code(), absl::StrFormat("%s: %s", g.path(), s.message()));
  }
  return c;
}

namespace {
absl::StatusOr<ModelWeights> LoadWeights(const GgufFile& g, bool keep_quantized);
}  // namespace

absl::StatusOr<ModelWeights> LoadWeightsFromGguf(const GgufFile& g) {
  return LoadWeights(g, /*keep_quantized=*/false);
}

absl::StatusOr<ModelWeights> LoadWeightsFromGguf(std::shared_ptr<const GgufFile> gguf,
                                                 const WeightLoadOptions& options) {
  if (gguf == nullptr) return absl::InvalidArgumentError("LoadWeightsFromGguf: no file");
  ASSIGN_OR_RETURN(ModelWeights w, LoadWeights(*gguf, options.keep_quantized));
  if (w.QuantizedTensors() > 0) w.storage = std::move(gguf);
  return w;
}

namespace {
// The tensors keep_quantized may hold quantized, of `w` (const or not).
template <typename Weights>
auto QuantizableTensors(Weights& w) {
  using T = std::conditional_t<std::is_const_v<Weights>, const Tensor, Tensor>;
  std::vector<T*> v = {&w.tok_embd, &w.output};
  for (auto& l : w.layers) v.insert(v.end(), {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down});
  return v;
}
}  // namespace

int ModelWeights::QuantizedTensors() const {
  int n = 0;
  for (const Tensor* t : QuantizableTensors(*this)) n += t->quantized();
  return n;
}

absl::Status ModelWeights::Dequantize() {
  auto one = [](Tensor& t) -> absl::Status {
    if (!t.quantized()) return absl::OkStatus();
    std::vector<float> v;
    try {
      v.resize(static_cast<size_t>(t.rows() * t.cols()));
    } catch (const std::bad_alloc&) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "ModelWeights::Dequantize: host memory exhausted: cannot allocate %d bytes of float32 for a "
          "[%d, %d] tensor",
          t.rows() * t.cols() * int64_t{sizeof(float)}, t.rows(), t.cols()));
    }
    RETURN_IF_ERROR(model::Dequantize(t.quant.type, t.quant.bytes, static_cast<size_t>(t.quant.size), v.data(),
                                      t.rows() * t.cols()));
    t.data = std::move(v);
    t.quant = {};
    return absl::OkStatus();
  };
  for (Tensor* t : QuantizableTensors(*this)) RETURN_IF_ERROR(one(*t));
  storage.reset();
  return absl::OkStatus();
}

namespace {

absl::StatusOr<ModelWeights> LoadWeights(const GgufFile& g, bool keep_quantized) {
  ModelWeights w;
  ASSIGN_OR_RETURN(w.config, ConfigFromGguf(g));
  const ModelConfig& c = w.config;
  const int64_t hidden = c.hidden, q_dim = int64_t{c.n_heads} * c.head_dim,
                kv_dim = int64_t{c.n_kv_heads} * c.head_dim;
  // A tensor whose float32 values the host cannot hold fails the load with
  // ResourceExhausted (GgufFile::DequantizeTensor), here with the float32
  // bytes held before it and those the whole model would need.
  int64_t float_bytes = 0;
  auto load = [&](const std::string& name, std::vector<int64_t> shape,
                  bool quant = false) -> absl::StatusOr<Tensor> {
    absl::StatusOr<Tensor> t = LoadTensor(g, name, std::move(shape), quant);
    if (t.ok()) {
      float_bytes += static_cast<int64_t>(t->data.size() * sizeof(float));
    } else if (t.status().code() == absl::StatusCode::kResourceExhausted) {
      // Values: q, k, v, o; gate, up, down; two norms a layer; embedding,
      // head unless tied, final norm.
      const int64_t layer = hidden * (2 * q_dim + 2 * kv_dim) + 3 * c.ffn * hidden + 2 * hidden;
      const int64_t all = 4 * (c.vocab * hidden * (c.tied_embeddings ? 1 : 2) + hidden + c.n_layers * layer);
      return absl::ResourceExhaustedError(absl::StrFormat(
          "%s (%.2f GB of float32 weights held before it; the whole model as float32 is %.2f GB)",
          t.status().message(), float_bytes / 1e9, all / 1e9));
    }
    return t;
  };
  ASSIGN_OR_RETURN(w.tok_embd, load("token_embd.weight", {c.vocab, hidden}, keep_quantized));
  ASSIGN_OR_RETURN(w.output_norm, load("output_norm.weight", {hidden}));
  if (!c.tied_embeddings) {
    ASSIGN_OR_RETURN(w.output, load("output.weight", {c.vocab, hidden}, keep_quantized));
  }
  // Layer by layer, not resize(n_layers) up front: n_layers comes from the
  // file, and a corrupt block_count (up to INT_MAX) must end in "tensor
  // missing", not in allocating INT_MAX empty layers.
  for (int i = 0; i < c.n_layers; ++i) {
    LayerWeights& l = w.layers.emplace_back();
    const std::string p = absl::StrFormat("blk.%d.", i);
    ASSIGN_OR_RETURN(l.attn_norm, load(p + "attn_norm.weight", {hidden}));
    ASSIGN_OR_RETURN(l.wq, load(p + "attn_q.weight", {q_dim, hidden}, keep_quantized));
    ASSIGN_OR_RETURN(l.wk, load(p + "attn_k.weight", {kv_dim, hidden}, keep_quantized));
    ASSIGN_OR_RETURN(l.wv, load(p + "attn_v.weight", {kv_dim, hidden}, keep_quantized));
    ASSIGN_OR_RETURN(l.wo, load(p + "attn_output.weight", {hidden, q_dim}, keep_quantized));
    ASSIGN_OR_RETURN(l.ffn_norm, load(p + "ffn_norm.weight", {hidden}));
    ASSIGN_OR_RETURN(l.w_gate, load(p + "ffn_gate.weight", {c.ffn, hidden}, keep_quantized));
    ASSIGN_OR_RETURN(l.w_up, load(p + "ffn_up.weight", {c.ffn, hidden}, keep_quantized));
    ASSIGN_OR_RETURN(l.w_down, load(p + "ffn_down.weight", {hidden, c.ffn}, keep_quantized));
  }
  return w;
}

}  // namespace

}  // namespace tailorkv::model
