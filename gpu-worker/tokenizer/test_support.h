// Shared by the tokenizer tests: the golden file from
// scripts/make_tokenizer_golden.py and the real SmolLM2 model.
#pragma once

#include <fstream>
#include <memory>
#include <sstream>
#include <string>

#include "gtest/gtest.h"
#include "model/gguf_file.h"
#include "nlohmann/json.hpp"
#include "tokenizer/tokenizer.h"

namespace tailorkv::tokenizer::testing {

inline const nlohmann::json& Golden() {
  static const nlohmann::json* const golden = [] {
    const std::string path =
        std::string(TAILORKV_SOURCE_DIR) + "/gpu-worker/tokenizer/testdata/smollm2_tokenizer_golden.json";
    std::ifstream in(path);
    if (!in) {
      ADD_FAILURE() << "cannot open " << path << "; run scripts/make_tokenizer_golden.py";
      return new nlohmann::json(nlohmann::json::object());
    }
    std::stringstream ss;
    ss << in.rdbuf();
    return new nlohmann::json(nlohmann::json::parse(ss.str()));
  }();
  return *golden;
}

inline std::string ModelPath() {
  return std::string(TAILORKV_MODEL_DIR) + "/SmolLM2-135M-Instruct.Q4_1.gguf";
}

// The spec read from the real model file. A missing model is a failure, not
// a skip: the agreement tests are the point of this component.
inline const TokenizerSpec* SmolLM2Spec() {
  static const TokenizerSpec* const spec = []() -> const TokenizerSpec* {
    auto gguf = model::GgufFile::Open(ModelPath());
    if (!gguf.ok()) {
      ADD_FAILURE() << "cannot open " << ModelPath() << ": " << gguf.status()
                    << "\nRun scripts/fetch_model.sh (or set TAILORKV_MODEL_DIR).";
      return nullptr;
    }
    auto s = TokenizerSpecFromGguf(**gguf);
    if (!s.ok()) {
      ADD_FAILURE() << s.status();
      return nullptr;
    }
    return new TokenizerSpec(*std::move(s));
  }();
  return spec;
}

inline const Tokenizer* SmolLM2() {
  static const Tokenizer* const tok = []() -> const Tokenizer* {
    const TokenizerSpec* spec = SmolLM2Spec();
    if (spec == nullptr) return nullptr;
    auto t = Tokenizer::Create(*spec);
    if (!t.ok()) {
      ADD_FAILURE() << t.status();
      return nullptr;
    }
    return t->release();
  }();
  return tok;
}

}  // namespace tailorkv::tokenizer::testing
