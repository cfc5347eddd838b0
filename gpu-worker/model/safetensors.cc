#include "model/safetensors.h"

#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <sstream>
#include <utility>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "model/ggml_types.h"
#include "model/llama_weights.h"
#include "nlohmann/json.hpp"

namespace tailorkv::model {
namespace {

using json = nlohmann::json;

// The reference implementation refuses headers above 100 MB; so do we, which
// also bounds what a corrupt length can make us parse.
constexpr uint64_t kMaxHeaderBytes = 100u << 20;

int64_t DtypeBytes(std::string_view dtype) {
  static const std::map<std::string_view, int64_t> kSizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1},
      {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},
      {"U32", 4},  {"F32", 4}, {"F64", 8}, {"I64", 8},     {"U64", 8},
  };
  auto it = kSizes.find(dtype);
  return it == kSizes.end() ? 0 : it->second;
}

}  // namespace

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  ASSIGN_OR_RETURN(MappedFile mapping, MappedFile::Open(path));
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  f->mapping_ = std::move(mapping);
  f->data_ = f->mapping_.data();
  f->size_ = f->mapping_.size();
  RETURN_IF_ERROR(f->Parse());
  return f;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::FromBytes(
    std::string name, std::vector<uint8_t> bytes) {
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = std::move(name);
  f->owned_ = std::move(bytes);
  f->data_ = f->owned_.data();
  f->size_ = f->owned_.size();
  RETURN_IF_ERROR(f->Parse());
  return f;
}

absl::Status SafetensorsFile::Parse() {
  if (size_ < 8) {
    return absl::DataLossError(absl::StrFormat(
        "%s: file of %d bytes is too small for the 8-byte header length", path_, size_));
  }
  uint64_t header_len;
  std::memcpy(&header_len, data_, 8);
  if (header_len > size_ - 8) {
    return absl::DataLossError(absl::StrFormat(
        "%s: header length %d extends past end of file (size %d)", path_, header_len, size_));
  }
  if (header_len > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: header length %d exceeds the %d-byte limit", path_, header_len, kMaxHeaderBytes));
  }
  data_offset_ = 8 + header_len;
  const uint64_t data_size = size_ - data_offset_;
  const json header = json::parse(data_ + 8, data_ + data_offset_, /*cb=*/nullptr,
                                  /*allow_exceptions=*/false);
  if (header.is_discarded()) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: header is not valid JSON", path_));
  }
  if (!header.is_object()) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: header is not a JSON object", path_));
  }
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") continue;
    const std::string what = absl::StrFormat("%s: tensor '%s'", path_, name);
    if (!entry.is_object()) return absl::InvalidArgumentError(what + ": entry is not an object");
    SafetensorsTensorInfo info;
    info.name = name;
    auto dtype = entry.find("dtype");
    if (dtype == entry.end() || !dtype->is_string()) {
      return absl::InvalidArgumentError(what + ": missing string field 'dtype'");
    }
    info.dtype = dtype->get<std::string>();
    info.element_bytes = DtypeBytes(info.dtype);
    if (info.element_bytes == 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: unknown dtype '%s'", what, info.dtype));
    }
    auto shape = entry.find("shape");
    if (shape == entry.end() || !shape->is_array()) {
      return absl::InvalidArgumentError(what + ": missing array field 'shape'");
    }
    uint64_t n = 1;
    for (const json& d : *shape) {
      if (!d.is_number_unsigned()) {
        return absl::InvalidArgumentError(what + ": shape holds a non-negative-integer value");
      }
      const uint64_t dim = d.get<uint64_t>();
      if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
          (dim != 0 && n > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / dim)) {
        return absl::InvalidArgumentError(what + ": product of shape overflows int64");
      }
      n *= dim;
      info.shape.push_back(static_cast<int64_t>(dim));
    }
    info.n_elements = n;
    auto offsets = entry.find("data_offsets");
    if (offsets == entry.end() || !offsets->is_array() || offsets->size() != 2 ||
        !(*offsets)[0].is_number_unsigned() || !(*offsets)[1].is_number_unsigned()) {
      return absl::InvalidArgumentError(
          what + ": 'data_offsets' must be an array of two non-negative integers");
    }
    info.begin = (*offsets)[0].get<uint64_t>();
    info.end = (*offsets)[1].get<uint64_t>();
    if (info.begin > info.end) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: data_offsets [%d, %d] are reversed", what, info.begin, info.end));
    }
    if (info.end > data_size) {
      return absl::DataLossError(absl::StrFormat(
          "%s: data_offsets [%d, %d] extend past the %d-byte data section (file size %d)", what,
          info.begin, info.end, data_size, size_));
    }
    // Checking n against the data size first keeps n * element_bytes from overflowing.
    const uint64_t elem = static_cast<uint64_t>(info.element_bytes);
    if (n > data_size / elem || info.end - info.begin != n * elem) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: data_offsets [%d, %d] hold %d bytes but dtype %s and shape [%s] need %d elements "
          "x %d bytes",
          what, info.begin, info.end, info.end - info.begin, info.dtype,
          absl::StrJoin(info.shape, ", "), n, info.element_bytes));
    }
    tensors_.push_back(std::move(info));
  }
  return absl::OkStatus();
}

const SafetensorsTensorInfo* SafetensorsFile::Find(std::string_view name) const {
  for (const SafetensorsTensorInfo& t : tensors_) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

absl::Span<const uint8_t> SafetensorsFile::TensorBytes(const SafetensorsTensorInfo& t) const {
  return {data_ + data_offset_ + t.begin, static_cast<size_t>(t.end - t.begin)};
}

absl::StatusOr<std::vector<float>> SafetensorsFile::ToFloat(std::string_view name) const {
  const SafetensorsTensorInfo* t = Find(name);
  if (t == nullptr) {
    return absl::NotFoundError(absl::StrFormat("%s: tensor '%s' not found", path_, name));
  }
  GgmlType type;
  if (t->dtype == "F32") {
    type = GgmlType::kF32;
  } else if (t->dtype == "F16") {
    type = GgmlType::kF16;
  } else if (t->dtype == "BF16") {
    type = GgmlType::kBF16;
  } else {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: tensor '%s' has dtype %s; only F32, F16 and BF16 are supported", path_,
                        name, t->dtype));
  }
  std::vector<float> out(static_cast<size_t>(t->n_elements));
  const absl::Span<const uint8_t> bytes = TensorBytes(*t);
  RETURN_IF_ERROR(Dequantize(type, bytes.data(), bytes.size(), out.data(),
                             static_cast<int64_t>(t->n_elements)));
  return out;
}

// ---------------------------------------------------------------------------
// Hugging Face Llama checkpoints.

namespace {

absl::StatusOr<std::string> ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrFormat("%s: cannot open", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrFormat("%s: read error", path));
  return ss.str();
}

absl::StatusOr<json> ReadJson(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadWholeFile(path));
  json j = json::parse(text, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: not a valid JSON object", path));
  }
  return j;
}

// Field readers: a missing or null field yields `fallback`, or NotFound when
// there is none; a value of the wrong type is InvalidArgument.
absl::StatusOr<int64_t> IntField(const json& j, const std::string& file, const char* key,
                                 std::optional<int64_t> fallback = std::nullopt) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (fallback) return *fallback;
    return absl::NotFoundError(absl::StrFormat("%s: required field '%s' is missing", file, key));
  }
  if (!it->is_number_integer()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: field '%s' must be an integer", file, key));
  }
  return it->get<int64_t>();
}

absl::StatusOr<double> FloatField(const json& j, const std::string& file, const char* key,
                                  std::optional<double> fallback = std::nullopt) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (fallback) return *fallback;
    return absl::NotFoundError(absl::StrFormat("%s: required field '%s' is missing", file, key));
  }
  if (!it->is_number()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: field '%s' must be a number", file, key));
  }
  return it->get<double>();
}

absl::StatusOr<bool> BoolField(const json& j, const std::string& file, const char* key,
                               bool fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: field '%s' must be a boolean", file, key));
  }
  return it->get<bool>();
}

absl::StatusOr<int> ToInt(int64_t v, const std::string& file, const char* key) {
  if (v < 0 || v > std::numeric_limits<int>::max()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: field '%s' = %d out of range", file, key, v));
  }
  return static_cast<int>(v);
}

absl::StatusOr<ModelConfig> ConfigFromHfJson(const json& j, const std::string& file) {
  ModelConfig c;
  c.arch = "llama";
  if (auto mt = j.find("model_type"); mt != j.end() && !mt->is_null()) {
    if (!mt->is_string() || mt->get<std::string>() != "llama") {
      return absl::UnimplementedError(
          absl::StrFormat("%s: model_type %s is not supported (only \"llama\")", file, mt->dump()));
    }
  }
  for (const char* bias_key : {"attention_bias", "mlp_bias"}) {
    ASSIGN_OR_RETURN(bool bias, BoolField(j, file, bias_key, false));
    if (bias) {
      return absl::UnimplementedError(
          absl::StrFormat("%s: %s = true is not supported (no bias tensors)", file, bias_key));
    }
  }
  if (auto n = j.find("_name_or_path"); n != j.end() && n->is_string())
    c.name = n->get<std::string>();
  ASSIGN_OR_RETURN(int64_t hidden, IntField(j, file, "hidden_size"));
  ASSIGN_OR_RETURN(c.hidden, ToInt(hidden, file, "hidden_size"));
  ASSIGN_OR_RETURN(int64_t layers, IntField(j, file, "num_hidden_layers"));
  ASSIGN_OR_RETURN(c.n_layers, ToInt(layers, file, "num_hidden_layers"));
  ASSIGN_OR_RETURN(int64_t heads, IntField(j, file, "num_attention_heads"));
  ASSIGN_OR_RETURN(c.n_heads, ToInt(heads, file, "num_attention_heads"));
  ASSIGN_OR_RETURN(int64_t kv_heads, IntField(j, file, "num_key_value_heads", heads));
  ASSIGN_OR_RETURN(c.n_kv_heads, ToInt(kv_heads, file, "num_key_value_heads"));
  const int64_t default_hd = heads > 0 ? hidden / heads : 0;
  ASSIGN_OR_RETURN(int64_t head_dim, IntField(j, file, "head_dim", default_hd));
  ASSIGN_OR_RETURN(c.head_dim, ToInt(head_dim, file, "head_dim"));
  ASSIGN_OR_RETURN(int64_t ffn, IntField(j, file, "intermediate_size"));
  ASSIGN_OR_RETURN(c.ffn, ToInt(ffn, file, "intermediate_size"));
  ASSIGN_OR_RETURN(int64_t vocab, IntField(j, file, "vocab_size"));
  ASSIGN_OR_RETURN(c.vocab, ToInt(vocab, file, "vocab_size"));
  // Defaults are those of transformers' LlamaConfig.
  ASSIGN_OR_RETURN(int64_t ctx, IntField(j, file, "max_position_embeddings", 2048));
  ASSIGN_OR_RETURN(c.max_context, ToInt(ctx, file, "max_position_embeddings"));
  ASSIGN_OR_RETURN(double theta, FloatField(j, file, "rope_theta", 10000.0));
  c.rope_theta = static_cast<float>(theta);
  ASSIGN_OR_RETURN(double eps, FloatField(j, file, "rms_norm_eps", 1e-6));
  c.rms_eps = static_cast<float>(eps);
  ASSIGN_OR_RETURN(c.tied_embeddings, BoolField(j, file, "tie_word_embeddings", false));
  c.rope_style = RopeStyle::kHalves;

  if (auto rs = j.find("rope_scaling"); rs != j.end() && !rs->is_null()) {
    if (!rs->is_object()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: rope_scaling must be an object", file));
    }
    std::string type;
    for (const char* key : {"rope_type", "type"}) {
      if (auto t = rs->find(key); t != rs->end() && t->is_string()) {
        type = t->get<std::string>();
        break;
      }
    }
    const std::string rs_file = file + " rope_scaling";
    if (type == "llama3") {
      c.rope_scaling.type = RopeScaling::Type::kLlama3;
      ASSIGN_OR_RETURN(double factor, FloatField(*rs, rs_file, "factor"));
      ASSIGN_OR_RETURN(double low, FloatField(*rs, rs_file, "low_freq_factor"));
      ASSIGN_OR_RETURN(double high, FloatField(*rs, rs_file, "high_freq_factor"));
      ASSIGN_OR_RETURN(int64_t orig, IntField(*rs, rs_file, "original_max_position_embeddings"));
      c.rope_scaling.factor = static_cast<float>(factor);
      c.rope_scaling.low_freq_factor = static_cast<float>(low);
      c.rope_scaling.high_freq_factor = static_cast<float>(high);
      c.rope_scaling.original_max_position = orig;
    } else if (type == "linear") {
      c.rope_scaling.type = RopeScaling::Type::kLinear;
      ASSIGN_OR_RETURN(double factor, FloatField(*rs, rs_file, "factor"));
      c.rope_scaling.factor = static_cast<float>(factor);
    } else if (type != "default" && !type.empty()) {
      return absl::UnimplementedError(absl::StrFormat(
          "%s: rope_scaling type '%s' is not supported (llama3, linear)", file, type));
    } else if (type.empty()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: rope_scaling has neither 'rope_type' nor 'type'", file));
    }
  }
  RETURN_IF_ERROR(c.Validate());
  return c;
}

// Maps every tensor name to the shard holding it, and owns the open shards.
class ShardSet {
 public:
  absl::Status Open(const std::string& dir) {
    const std::string index_path = dir + "/model.safetensors.index.json";
    if (std::ifstream(index_path).good()) {
      ASSIGN_OR_RETURN(json index, ReadJson(index_path));
      auto map = index.find("weight_map");
      if (map == index.end() || !map->is_object()) {
        return absl::InvalidArgumentError(
            absl::StrFormat("%s: missing object 'weight_map'", index_path));
      }
      for (const auto& [name, shard] : map->items()) {
        if (!shard.is_string()) {
          return absl::InvalidArgumentError(
              absl::StrFormat("%s: weight_map['%s'] is not a file name", index_path, name));
        }
        const std::string file = shard.get<std::string>();
        // Shards must live in `dir`: the index must not reach other files.
        if (file.empty() || file.find('/') != std::string::npos || file == "." || file == "..") {
          return absl::InvalidArgumentError(absl::StrFormat(
              "%s: weight_map['%s'] = '%s' is not a plain file name", index_path, name, file));
        }
        ASSIGN_OR_RETURN(const SafetensorsFile* f, OpenShard(dir + "/" + file));
        where_[name] = f;
      }
      return absl::OkStatus();
    }
    ASSIGN_OR_RETURN(const SafetensorsFile* f, OpenShard(dir + "/model.safetensors"));
    for (const SafetensorsTensorInfo& t : f->tensors()) where_[t.name] = f;
    return absl::OkStatus();
  }

  bool Has(const std::string& name) const { return where_.count(name) != 0; }

  absl::StatusOr<Tensor> Load(const std::string& name, std::vector<int64_t> shape) const {
    auto it = where_.find(name);
    if (it == where_.end()) {
      return absl::NotFoundError(absl::StrFormat("tensor '%s' not found in the checkpoint", name));
    }
    const SafetensorsFile& f = *it->second;
    const SafetensorsTensorInfo* info = f.Find(name);
    if (info == nullptr) {
      return absl::NotFoundError(absl::StrFormat(
          "%s: tensor '%s' (listed in the index) is not in this shard", f.path(), name));
    }
    if (info->shape != shape) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: tensor '%s' has shape [%s], expected [%s]", f.path(), name,
                          absl::StrJoin(info->shape, ", "), absl::StrJoin(shape, ", ")));
    }
    Tensor t;
    t.shape = std::move(shape);
    ASSIGN_OR_RETURN(t.data, f.ToFloat(name));
    return t;
  }

 private:
  absl::StatusOr<const SafetensorsFile*> OpenShard(const std::string& path) {
    auto it = shards_.find(path);
    if (it != shards_.end()) return it->second.get();
    ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> f, SafetensorsFile::Open(path));
    const SafetensorsFile* raw = f.get();
    shards_.emplace(path, std::move(f));
    return raw;
  }

  std::map<std::string, std::unique_ptr<SafetensorsFile>> shards_;
  std::map<std::string, const SafetensorsFile*> where_;
};

}  // namespace

absl::StatusOr<ModelWeights> LoadWeightsFromSafetensors(const std::string& dir) {
  const std::string config_path = dir + "/config.json";
  ASSIGN_OR_RETURN(json config_json, ReadJson(config_path));
  ModelWeights w;
  ASSIGN_OR_RETURN(w.config, ConfigFromHfJson(config_json, config_path));
  const ModelConfig& c = w.config;
  ShardSet shards;
  RETURN_IF_ERROR(shards.Open(dir));

  const int64_t hidden = c.hidden, q_dim = int64_t{c.n_heads} * c.head_dim,
                kv_dim = int64_t{c.n_kv_heads} * c.head_dim;
  ASSIGN_OR_RETURN(w.tok_embd, shards.Load("model.embed_tokens.weight", {c.vocab, hidden}));
  ASSIGN_OR_RETURN(w.output_norm, shards.Load("model.norm.weight", {hidden}));
  if (!c.tied_embeddings) {
    ASSIGN_OR_RETURN(w.output, shards.Load("lm_head.weight", {c.vocab, hidden}));
  }
  // Layer by layer, not resize(n_layers) up front: a corrupt
  // num_hidden_layers (up to INT_MAX) must end in "tensor not found", not in
  // allocating INT_MAX empty layers.
  for (int i = 0; i < c.n_layers; ++i) {
    LayerWeights& l = w.layers.emplace_back();
    const std::string p = absl::StrFormat("model.layers.%d.", i);
    ASSIGN_OR_RETURN(l.attn_norm, shards.Load(p + "input_layernorm.weight", {hidden}));
    ASSIGN_OR_RETURN(l.wq, shards.Load(p + "self_attn.q_proj.weight", {q_dim, hidden}));
    ASSIGN_OR_RETURN(l.wk, shards.Load(p + "self_attn.k_proj.weight", {kv_dim, hidden}));
    ASSIGN_OR_RETURN(l.wv, shards.Load(p + "self_attn.v_proj.weight", {kv_dim, hidden}));
    ASSIGN_OR_RETURN(l.wo, shards.Load(p + "self_attn.o_proj.weight", {hidden, q_dim}));
    ASSIGN_OR_RETURN(l.ffn_norm, shards.Load(p + "post_attention_layernorm.weight", {hidden}));
    ASSIGN_OR_RETURN(l.w_gate, shards.Load(p + "mlp.gate_proj.weight", {c.ffn, hidden}));
    ASSIGN_OR_RETURN(l.w_up, shards.Load(p + "mlp.up_proj.weight", {c.ffn, hidden}));
    ASSIGN_OR_RETURN(l.w_down, shards.Load(p + "mlp.down_proj.weight", {hidden, c.ffn}));
  }
  return w;
}

}  // namespace tailorkv::model
