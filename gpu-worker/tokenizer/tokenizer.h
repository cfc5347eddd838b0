// Byte-level BPE tokenizer (GPT-2 family: SmolLM2, Llama 3, Qwen2...) built
// from the vocabulary, merges and special tokens stored in GGUF metadata.
//
// Thread-safety: a constructed Tokenizer is immutable; all methods are const
// and thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace tailorkv::model {
class GgufFile;
}

namespace tailorkv::tokenizer {

// GGUF token types (tokenizer.ggml.token_type).
enum class TokenType : int32_t {
  kUndefined = 0, kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4,
  kUnused = 5, kByte = 6,
};

// Everything needed to build a tokenizer, independent of the file format.
struct TokenizerSpec {
  std::string model;                 // tokenizer.ggml.model; only "gpt2" (byte-level BPE) is supported
  std::string pre;                   // tokenizer.ggml.pre: pre-tokenizer family ("smollm", "llama-bpe", "gpt2", ...)
  std::vector<std::string> tokens;   // id -> token text (byte-level alphabet)
  std::vector<std::string> merges;   // "left right", highest priority first
  std::vector<int32_t> token_types;  // id -> TokenType; empty means all normal
  int32_t bos_id = -1;
  int32_t eos_id = -1;
  int32_t eot_id = -1;               // end of turn, when the model has one
  int32_t pad_id = -1;
  bool add_bos = false;              // tokenizer.ggml.add_bos_token
  std::string chat_template;         // tokenizer.chat_template (Jinja source)
};

// Reads the spec from GGUF metadata; errors name the key. Required:
// tokenizer.ggml.model, .tokens, .merges. Optional: .pre (default "default"),
// .token_type, the special ids (default -1), .add_bos_token (default true for
// llama-bpe, false otherwise, as llama.cpp), tokenizer.chat_template. The spec
// is not validated here; Tokenizer::Create does that.
absl::StatusOr<TokenizerSpec> TokenizerSpecFromGguf(const model::GgufFile& gguf);

class Tokenizer {
 public:
  // InvalidArgument (naming the field) for an unsupported model/pre type,
  // a merge that names an unknown token (or whose concatenation is not a
  // token), out-of-range special ids, token_type of the wrong length, ...
  // A vocabulary may lack byte-level tokens for some bytes; see Encode.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Create(TokenizerSpec spec);

  // Encodes UTF-8 text (invalid UTF-8 is an InvalidArgument; add_bos without
  // a bos token is a FailedPrecondition). When `parse_special` is true, the
  // text of control tokens found in `text` (e.g. "<|im_start|>") becomes
  // their id; otherwise it is tokenized as plain text. User-defined tokens are
  // always matched, as llama.cpp and Hugging Face do. Matching is
  // leftmost-longest and happens before pre-tokenization.
  // Bytes the vocabulary has no byte-level token for are dropped, as Hugging
  // Face does without an unk token (SmolLM2 lacks 21 bytes: 0x04 0x06 0x13
  // 0x14 0x16 0x1D 0xC0 0xC1 0xF1 0xF2 0xF5-0xFF), so such text does not
  // round-trip.
  // `literal_ranges` (sorted, disjoint byte ranges [begin, end) of `text`)
  // are user-supplied text inside a rendered template: no control token is
  // matched that overlaps them, whatever `parse_special` says.
  // Cost: linear in the text; no caching, so concurrent calls share nothing.
  absl::StatusOr<std::vector<int32_t>> Encode(
      std::string_view text, bool add_bos, bool parse_special,
      absl::Span<const std::pair<size_t, size_t>> literal_ranges = {}) const;
  // Raw bytes of the concatenated tokens (may end inside a UTF-8 character).
  // Control tokens decode to nothing unless `render_special`; ids outside
  // the vocabulary decode to nothing.
  std::string Decode(absl::Span<const int32_t> ids, bool render_special = false) const;
  // Raw bytes of one token (byte-level alphabet mapped back to bytes).
  std::string TokenBytes(int32_t id, bool render_special = false) const;

  int vocab_size() const;
  int32_t bos_id() const;
  int32_t eos_id() const;
  // True for tokens that end generation: eos, eot, and control tokens whose
  // text closes a turn or a document (<|im_end|>, <|eot_id|>, <|eom_id|>,
  // <|end_of_text|>, <|endoftext|>, <|end|>).
  bool IsEndOfGeneration(int32_t id) const;
  const TokenizerSpec& spec() const;

  ~Tokenizer();

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Turns a stream of token ids into text that never ends inside a UTF-8
// character: bytes of an incomplete character are held back until the
// character completes. Invalid sequences are replaced by U+FFFD, one per
// maximal ill-formed subpart (the Unicode/WHATWG/ICU rule), so the
// concatenated output equals the one-shot sanitized Decode of the same ids.
// Control tokens produce no text (as Decode without render_special).
// Not thread-safe; one per generation stream. The Tokenizer must outlive it.
class StreamingDetokenizer {
 public:
  explicit StreamingDetokenizer(const Tokenizer& tokenizer);
  // Returns the text that became complete with this token (possibly empty).
  std::string Push(int32_t id);
  // Returns what is held back, with an incomplete tail replaced by U+FFFD.
  std::string Flush();

 private:
  const Tokenizer& tokenizer_;
  std::string pending_;
};

}  // namespace tailorkv::tokenizer
