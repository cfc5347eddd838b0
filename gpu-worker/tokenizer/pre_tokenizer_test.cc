#include "tokenizer/pre_tokenizer.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tokenizer/test_support.h"

namespace tailorkv::tokenizer::internal {
namespace {

using testing::Golden;

std::vector<std::string> Split(PreTokenizer kind, std::string_view text) {
  std::vector<std::string> out;
  for (std::string_view p : SplitPreTokens(kind, text)) out.emplace_back(p);
  return out;
}

// The golden pieces come from Python's `regex` module running each family's
// published regex (smollm: from tokenizers' Digits+ByteLevel pre-tokenizer).
TEST(PreTokenizerTest, SplitsMatchReferenceRegexForEveryFamily) {
  const std::pair<const char*, PreTokenizer> families[] = {
      {"gpt2", PreTokenizer::kGpt2},
      {"smollm", PreTokenizer::kSmolLM},
      {"llama-bpe", PreTokenizer::kLlama3},
      {"qwen2", PreTokenizer::kQwen2},
  };
  ASSERT_GE(Golden()["texts"].size(), 40u);
  for (const auto& t : Golden()["texts"]) {
    const std::string text = t["text"];
    for (const auto& [name, kind] : families) {
      const auto want = t["pieces"][name].get<std::vector<std::string>>();
      EXPECT_EQ(Split(kind, text), want) << name << " on " << nlohmann::json(text).dump();
    }
  }
}

TEST(PreTokenizerTest, HandlesEdgeCasesOfTheRegexes) {
  using V = std::vector<std::string>;
  // \s+(?!\S) leaves the last space to the following word.
  EXPECT_EQ(Split(PreTokenizer::kGpt2, "a   b"), (V{"a", "  ", " b"}));
  EXPECT_EQ(Split(PreTokenizer::kGpt2, "a   "), (V{"a", "   "}));
  EXPECT_EQ(Split(PreTokenizer::kGpt2, "\n\na"), (V{"\n", "\n", "a"}));
  // GPT-2 contractions are case-sensitive, Llama 3's are not.
  EXPECT_EQ(Split(PreTokenizer::kGpt2, "IT'S"), (V{"IT", "'", "S"}));
  EXPECT_EQ(Split(PreTokenizer::kLlama3, "IT'S"), (V{"IT", "'S"}));
  // Llama 3: up to three digits, punctuation takes trailing newlines,
  // whitespace runs end at their last newline.
  EXPECT_EQ(Split(PreTokenizer::kLlama3, "1234567"), (V{"123", "456", "7"}));
  EXPECT_EQ(Split(PreTokenizer::kQwen2, "123"), (V{"1", "2", "3"}));
  EXPECT_EQ(Split(PreTokenizer::kLlama3, "x.\n\ny"), (V{"x", ".\n\n", "y"}));
  EXPECT_EQ(Split(PreTokenizer::kLlama3, "a \n \n  b"), (V{"a", " \n \n", " ", " b"}));
  // SmolLM2: digits alone, and the lookahead stops at a digit.
  EXPECT_EQ(Split(PreTokenizer::kSmolLM, "a  12"), (V{"a", "  ", "1", "2"}));
  EXPECT_TRUE(Split(PreTokenizer::kGpt2, "").empty());
}

TEST(PreTokenizerTest, UnknownNameIsInvalidArgumentNamingTheKey) {
  auto r = PreTokenizerFromName("tekken");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), ::testing::HasSubstr("tokenizer.ggml.pre"));
  EXPECT_EQ(*PreTokenizerFromName("smollm"), PreTokenizer::kSmolLM);
  EXPECT_EQ(*PreTokenizerFromName("llama-bpe"), PreTokenizer::kLlama3);
  EXPECT_EQ(*PreTokenizerFromName("default"), PreTokenizer::kGpt2);
}

}  // namespace
}  // namespace tailorkv::tokenizer::internal
