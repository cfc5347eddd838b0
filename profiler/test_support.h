// What the profiler's tests share: where the real model is, and calibration
// text from the repository.
#pragma once

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

namespace tailorkv::profiler::testing {

inline constexpr char kModel[] = "SmolLM2-135M-Instruct.Q4_1.gguf";

// TAILORKV_MODEL_DIR from the environment, else the build's default.
inline std::string ModelDir() {
  const char* env = std::getenv("TAILORKV_MODEL_DIR");
  return env != nullptr ? env : TAILORKV_MODEL_DIR;
}

// The first `bytes` bytes of eval/data/prose.txt (~4.6 bytes a token).
inline std::string Prose(size_t bytes) {
  std::ifstream in(std::string(TAILORKV_SOURCE_DIR) + "/eval/data/prose.txt");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str().substr(0, bytes);
}

}  // namespace tailorkv::profiler::testing
