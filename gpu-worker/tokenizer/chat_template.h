// Renders a conversation into the prompt format the model was trained on.
//
// General Jinja is out of scope: the template source from GGUF metadata is
// recognised as one of the known families (ChatML, used by SmolLM2/Qwen;
// Llama 3; a plain fallback when the model has none), and the family is
// rendered by C++ code that reproduces the reference template's output.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace tailorkv::tokenizer {

struct ChatMessage {
  std::string role;     // "system", "user", "assistant"
  std::string content;
};

class ChatTemplate {
 public:
  enum class Family { kChatML, kLlama3, kPlain };

  // Recognises `jinja_source`; an empty source yields kPlain. `default_system`
  // is inserted when the family's template does so (SmolLM2's does).
  static absl::StatusOr<ChatTemplate> FromSource(std::string_view jinja_source);

  Family family() const { return family_; }
  // InvalidArgument naming the message index for an unknown role.
  absl::StatusOr<std::string> Apply(const std::vector<ChatMessage>& messages,
                                    bool add_generation_prompt) const;

 private:
  Family family_ = Family::kPlain;
  std::string default_system_;
};

}  // namespace tailorkv::tokenizer
