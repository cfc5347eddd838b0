// Fuzz target: Hugging Face checkpoint directories (model/llama_weights.h,
// LoadWeightsFromSafetensors): config.json and the model.safetensors it
// describes. The loader reads a directory, so each input is written into
// one (a tmpfs one when /dev/shm exists) and loaded from there.
//
// Input: config.json bytes, then optionally "\n--safetensors--\n" and the
// bytes of model.safetensors.
// Invariants: errors are absl::Status (no crash, no allocation a corrupt
// config can blow up); accepted weights match their config's shapes.
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "fuzz_util.h"
#include "model/llama_weights.h"

namespace model = tailorkv::model;

namespace {

std::string g_dir;

void Write(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  FUZZ_CHECK(out.good(), "cannot write %s", path.c_str());
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const std::string base = std::filesystem::is_directory("/dev/shm")
                               ? "/dev/shm"
                               : std::filesystem::temp_directory_path().string();
  std::string tmpl = base + "/tkv_fuzz_hf_XXXXXX";
  FUZZ_CHECK(::mkdtemp(tmpl.data()) != nullptr, "mkdtemp in %s", base.c_str());
  g_dir = tmpl;
  std::atexit([] { std::filesystem::remove_all(g_dir); });
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  tailorkv::fuzz::Reader in(data, size);
  const std::string config = in.Until("\n--safetensors--\n");
  const bool has_weights = !in.empty();
  const std::string weights = in.Rest();
  Write(g_dir + "/config.json", config);
  const std::string st_path = g_dir + "/model.safetensors";
  if (has_weights) {
    Write(st_path, weights);
  } else {
    std::filesystem::remove(st_path);
  }
  auto w = model::LoadWeightsFromSafetensors(g_dir);
  if (!w.ok()) return 0;
  const model::ModelConfig& c = w->config;
  FUZZ_CHECK(c.Validate().ok(), "accepted config fails Validate");
  FUZZ_CHECK(static_cast<int>(w->layers.size()) == c.n_layers, "%zu layers for n_layers %d",
             w->layers.size(), c.n_layers);
  FUZZ_CHECK(w->tok_embd.data.size() == static_cast<size_t>(c.vocab) * c.hidden, "tok_embd size");
  for (const model::LayerWeights& l : w->layers) {
    FUZZ_CHECK(l.w_down.data.size() == static_cast<size_t>(c.hidden) * c.ffn, "w_down size");
  }
  return 0;
}
