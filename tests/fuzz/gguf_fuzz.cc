// Fuzz target: GGUF model files (model/gguf_file.h) and what is read from
// them: the model config and weights (model/llama_weights.h), the tokenizer
// spec and tokenizer (tokenizer/tokenizer.h), the chat template.
//
// Input: a GGUF image (GgufFile::FromBytes, the parser Open runs on a mapping).
// Invariants: errors are absl::Status (no crash, no allocation beyond what
// the file can back); every tensor an accepted file lists lies inside it and
// dequantizes; typed getters agree with Find.
#include <cstdint>
#include <string>
#include <vector>

#include "fuzz_util.h"
#include "model/gguf_file.h"
#include "model/llama_weights.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace model = tailorkv::model;
namespace tok = tailorkv::tokenizer;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto file = model::GgufFile::FromBytes("fuzz.gguf", std::vector<uint8_t>(data, data + size));
  if (!file.ok()) {
    const auto code = file.status().code();
    FUZZ_CHECK(code == absl::StatusCode::kInvalidArgument || code == absl::StatusCode::kDataLoss,
               "%s", file.status().ToString().c_str());
    return 0;
  }
  const model::GgufFile& g = **file;
  // Find and FindTensor scan linearly (fine for the few dozen entries of a
  // real model): checking every entry of a crafted file would make this
  // target, not the parser, quadratic. The first 64 of each.
  constexpr size_t kChecked = 64;
  size_t checked = 0;
  for (const auto& [key, value] : g.metadata()) {
    if (++checked > kChecked) break;
    FUZZ_CHECK(g.Find(key) == &value, "Find('%s') is not the first entry", key.c_str());
    (void)g.GetInt(key);
    (void)g.GetFloat(key);
    (void)g.GetString(key);
    (void)g.GetStringArray(key);
    (void)g.GetIntArray(key);
    (void)g.GetFloatArray(key);
  }
  checked = 0;
  for (const model::GgufTensorInfo& t : g.tensors()) {
    if (++checked > kChecked) break;
    FUZZ_CHECK(g.FindTensor(t.name) == &t, "FindTensor('%s')", t.name.c_str());
    const auto bytes = g.TensorBytes(t);
    FUZZ_CHECK(bytes.size() == t.n_bytes, "TensorBytes size %zu != %llu", bytes.size(),
               static_cast<unsigned long long>(t.n_bytes));
    FUZZ_CHECK(t.n_bytes <= size, "tensor larger than the file");
    auto values = g.DequantizeTensor(t.name);
    if (values.ok()) {
      FUZZ_CHECK(values->size() == t.n_elements, "dequantized %zu of %llu", values->size(),
                 static_cast<unsigned long long>(t.n_elements));
    }
  }
  if (auto config = model::ConfigFromGguf(g); config.ok()) {
    FUZZ_CHECK(config->Validate().ok(), "accepted config fails Validate");
    (void)model::LoadWeightsFromGguf(g);
  }
  if (auto spec = tok::TokenizerSpecFromGguf(g); spec.ok()) {
    (void)tok::ChatTemplate::FromSource(spec->chat_template);
    if (auto t = tok::Tokenizer::Create(*spec); t.ok()) {
      const tok::Tokenizer& tk = **t;
      // A short fixed text through the fuzzed vocabulary and merges.
      auto ids = tk.Encode("Hello world, 12 é \xe2\x82\xac<|im_start|>", false, true);
      if (ids.ok()) {
        for (int32_t id : *ids) FUZZ_CHECK(id >= 0 && id < tk.vocab_size(), "id %d", id);
        (void)tk.Decode(*ids, true);
      }
    }
  }
  return 0;
}
