#include "model/shapes.h"

#include <string>

#include "absl/strings/str_cat.h"

namespace tailorkv::model {

ModelConfig Llama31_8BShape() {
  ModelConfig c;
  c.arch = "llama";
  c.name = "llama-3.1-8b-shape (random weights)";
  c.n_layers = 32;
  c.hidden = 4096;
  c.n_heads = 32;
  c.n_kv_heads = 8;
  c.head_dim = 128;
  c.ffn = 14336;
  c.vocab = 128256;
  c.max_context = 131072 + 256;
  c.rope_theta = 500000.0f;
  c.rms_eps = 1e-5f;
  c.rope_style = RopeStyle::kHalves;
  c.rope_scaling = {RopeScaling::Type::kLlama3, 8.0f, 1.0f, 4.0f, 8192, {}};
  return c;
}

absl::StatusOr<ModelConfig> NamedShape(std::string_view name) {
  if (name == "llama-3.1-8b") return Llama31_8BShape();
  return absl::NotFoundError(
      absl::StrCat("no model shape named \"", std::string(name), "\" (known: llama-3.1-8b)"));
}

}  // namespace tailorkv::model
