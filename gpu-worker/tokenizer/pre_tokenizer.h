// Pre-tokenization: splitting text into the pieces BPE runs on, one family
// per tokenizer.ggml.pre value. Internal to tkv_tokenizer.
//
// Each family's published regex is reproduced by a hand-written matcher
// (std::regex has neither \p{..} classes nor lookahead). The matchers follow
// the regex semantics exactly: leftmost match, alternatives tried in order,
// greedy quantifiers with backtracking where it matters (`\s+(?!\S)`,
// `\s*[\r\n]+`). Unicode classes come from ICU: \p{L} is general category L*,
// \p{N} is N* (Nd, Nl, No), \s is the White_Space property.
//
//   gpt2:      's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//   smollm:    every \p{N} character alone, then gpt2 on the runs between them
//              (SmolLM2's Digits(individual_digits=true) + ByteLevel)
//   llama-bpe: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
//              ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
//   qwen2:     llama-bpe with \p{N} (one digit) instead of \p{N}{1,3}
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace tailorkv::tokenizer::internal {

enum class PreTokenizer { kGpt2, kSmolLM, kLlama3, kQwen2 };

// Maps a tokenizer.ggml.pre value ("gpt2", "default", "smollm", "llama-bpe",
// "llama3", "qwen2") to its family; InvalidArgument naming
// tokenizer.ggml.pre otherwise.
absl::StatusOr<PreTokenizer> PreTokenizerFromName(std::string_view pre);

// Splits `text`, which must be valid UTF-8, into pieces that concatenate back
// to `text`. The views point into `text`.
std::vector<std::string_view> SplitPreTokens(PreTokenizer kind, std::string_view text);

}  // namespace tailorkv::tokenizer::internal
