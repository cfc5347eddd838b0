// Renders a conversation into the prompt format the model was trained on.
//
// General Jinja is out of scope: the template source from GGUF metadata is
// recognised as one of the known families (ChatML, used by SmolLM2/Qwen;
// Llama 3; a plain fallback when the model has none), and the family is
// rendered by C++ code that reproduces the reference template's output byte
// for byte (checked against transformers' Jinja rendering in
// chat_template_test.cc).
//
// The rendered text is the whole prompt, including the bos token's text when
// the template emits it (Llama 3's "<|begin_of_text|>"); encode it with
// parse_special=true and add_bos=false.
//
// Thread-safety: immutable after FromSource; Apply is const and thread-safe.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace tailorkv::tokenizer {

// A rendered conversation: the prompt text and the byte ranges
// [begin, end) of `text` that came from message contents. Encode those
// ranges as literal text (Tokenizer::Encode's literal_ranges), so a user who
// types "<|im_end|>" cannot forge the template's control tokens.
struct RenderedChat {
  std::string text;
  std::vector<std::pair<size_t, size_t>> content_ranges;  // sorted, disjoint
};

struct ChatMessage {
  std::string role;     // "system", "user", "assistant"
  std::string content;
};

class ChatTemplate {
 public:
  enum class Family { kChatML, kLlama3, kPlain };

  // Recognises `jinja_source`; an empty source yields kPlain.
  //  - ChatML: the source uses <|im_start|> and <|im_end|>. When it holds a
  //    literal "<|im_start|>system\n...<|im_end|>" (SmolLM2, Qwen2), that text
  //    becomes the default system message, inserted when the first message
  //    is not a system message, as those templates do.
  //  - Llama 3: <|start_header_id|>, <|end_header_id|>, <|eot_id|>; message
  //    contents are trimmed (Jinja's `trim`) and the first is preceded by
  //    <|begin_of_text|>. Llama 3.1+ templates (which add a dated system
  //    header) are Unimplemented rather than rendered wrongly.
  //  - Anything else: Unimplemented, naming the problem; a caller that wants
  //    to go on anyway can use FromSource("").
  static absl::StatusOr<ChatTemplate> FromSource(std::string_view jinja_source);

  Family family() const { return family_; }
  // The ChatML default system text ("" when none).
  const std::string& default_system() const { return default_system_; }

  // InvalidArgument naming the message index for an unknown role. The plain
  // family renders "role: content\n" per message and "assistant:" as the
  // generation prompt (no reference exists for models without a template).
  absl::StatusOr<std::string> Apply(const std::vector<ChatMessage>& messages,
                                    bool add_generation_prompt) const;
  // As Apply, also reporting where message contents lie in the text.
  absl::StatusOr<RenderedChat> Render(const std::vector<ChatMessage>& messages,
                                      bool add_generation_prompt) const;

 private:
  Family family_ = Family::kPlain;
  std::string default_system_;
};

}  // namespace tailorkv::tokenizer
