#include "tokenizer/chat_template.h"

#include "common/status_macros.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "tokenizer/utf8.h"
#include "unicode/uchar.h"

namespace tailorkv::tokenizer {
namespace {

bool Contains(std::string_view s, std::string_view part) {
  return s.find(part) != std::string_view::npos;
}

// Python's str.isspace(), which Jinja's `trim` (str.strip) uses: bidi class
// WS, B or S, or general category Zs.
bool IsPythonSpace(char32_t cp) {
  const auto c = static_cast<UChar32>(cp);
  const UCharDirection dir = u_charDirection(c);
  return dir == U_WHITE_SPACE_NEUTRAL || dir == U_BLOCK_SEPARATOR ||
         dir == U_SEGMENT_SEPARATOR || u_charType(c) == U_SPACE_SEPARATOR;
}

std::string_view TrimPython(std::string_view s) {
  // Find the first and last non-space characters by decoding forward; message
  // text is expected to be UTF-8, and an ill-formed byte counts as non-space.
  size_t first = std::string_view::npos, last_end = 0;
  for (size_t pos = 0; pos < s.size();) {
    const internal::Utf8Char c = internal::DecodeUtf8Char(s.substr(pos));
    const bool space = c.kind == internal::Utf8Char::kValid && IsPythonSpace(c.cp);
    if (!space) {
      if (first == std::string_view::npos) first = pos;
      last_end = pos + c.length;
    }
    pos += c.length;
  }
  if (first == std::string_view::npos) return {};
  return s.substr(first, last_end - first);
}

// Decodes the escapes a Jinja string literal may hold; returns false when the
// text contains an unescaped quote or template syntax, i.e. is not the inside
// of a single literal.
bool UnescapeLiteral(std::string_view text, std::string& out) {
  out.clear();
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (c == '\'' || c == '"' || c == '{' || c == '}') return false;
    if (c != '\\') {
      out.push_back(c);
      continue;
    }
    if (++i == text.size()) return false;
    switch (text[i]) {
      case 'n': out.push_back('\n'); break;
      case 't': out.push_back('\t'); break;
      case 'r': out.push_back('\r'); break;
      case '\\': case '\'': case '"': out.push_back(text[i]); break;
      default: return false;
    }
  }
  return true;
}

// The first "<|im_start|>system\n<literal><|im_end|>" whose middle is plain
// literal text, i.e. the default system message rather than the branch that
// renders messages[0]['content'].
std::string FindChatMLDefaultSystem(std::string_view src) {
  constexpr std::string_view kOpen = "<|im_start|>system";
  constexpr std::string_view kClose = "<|im_end|>";
  for (size_t pos = src.find(kOpen); pos != std::string_view::npos;
       pos = src.find(kOpen, pos + 1)) {
    size_t p = pos + kOpen.size();
    // The newline is a real one in SmolLM2's source and an escape in others.
    if (src.substr(p).starts_with("\n")) {
      p += 1;
    } else if (src.substr(p).starts_with("\\n")) {
      p += 2;
    } else {
      continue;
    }
    const size_t end = src.find(kClose, p);
    if (end == std::string_view::npos) break;
    std::string text;
    if (UnescapeLiteral(src.substr(p, end - p), text) && !text.empty()) return text;
  }
  return {};
}

absl::Status CheckRole(const ChatMessage& m, size_t index) {
  if (m.role == "system" || m.role == "user" || m.role == "assistant") return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "chat message ", index, " has role \"", m.role,
      "\"; expected system, user or assistant"));
}

}  // namespace

absl::StatusOr<ChatTemplate> ChatTemplate::FromSource(std::string_view jinja_source) {
  ChatTemplate t;
  if (jinja_source.empty()) return t;
  if (Contains(jinja_source, "<|im_start|>") && Contains(jinja_source, "<|im_end|>")) {
    t.family_ = Family::kChatML;
    t.default_system_ = FindChatMLDefaultSystem(jinja_source);
    return t;
  }
  if (Contains(jinja_source, "<|start_header_id|>") &&
      Contains(jinja_source, "<|end_header_id|>") && Contains(jinja_source, "<|eot_id|>")) {
    if (Contains(jinja_source, "Cutting Knowledge Date")) {
      return absl::UnimplementedError(
          "tokenizer.chat_template is a Llama 3.1+ template (dated system header, tools); "
          "only the Llama 3 template is rendered");
    }
    t.family_ = Family::kLlama3;
    return t;
  }
  return absl::UnimplementedError(
      "tokenizer.chat_template is not a recognised family (ChatML, Llama 3)");
}

absl::StatusOr<std::string> ChatTemplate::Apply(const std::vector<ChatMessage>& messages,
                                                bool add_generation_prompt) const {
  ASSIGN_OR_RETURN(RenderedChat r, Render(messages, add_generation_prompt));
  return std::move(r.text);
}

absl::StatusOr<RenderedChat> ChatTemplate::Render(const std::vector<ChatMessage>& messages,
                                                  bool add_generation_prompt) const {
  for (size_t i = 0; i < messages.size(); ++i) {
    if (absl::Status s = CheckRole(messages[i], i); !s.ok()) return s;
  }
  RenderedChat r;
  std::string& out = r.text;
  auto content = [&r](std::string_view text) {
    r.content_ranges.emplace_back(r.text.size(), r.text.size() + text.size());
    r.text.append(text);
  };
  switch (family_) {
    case Family::kChatML:
      for (size_t i = 0; i < messages.size(); ++i) {
        if (i == 0 && messages[0].role != "system" && !default_system_.empty()) {
          absl::StrAppend(&out, "<|im_start|>system\n", default_system_, "<|im_end|>\n");
        }
        absl::StrAppend(&out, "<|im_start|>", messages[i].role, "\n");
        content(messages[i].content);
        out.append("<|im_end|>\n");
      }
      if (add_generation_prompt) out.append("<|im_start|>assistant\n");
      break;
    case Family::kLlama3:
      for (size_t i = 0; i < messages.size(); ++i) {
        if (i == 0) out.append("<|begin_of_text|>");
        absl::StrAppend(&out, "<|start_header_id|>", messages[i].role, "<|end_header_id|>\n\n");
        content(TrimPython(messages[i].content));
        out.append("<|eot_id|>");
      }
      if (add_generation_prompt) out.append("<|start_header_id|>assistant<|end_header_id|>\n\n");
      break;
    case Family::kPlain:
      for (const ChatMessage& m : messages) {
        absl::StrAppend(&out, m.role, ": ");
        content(m.content);
        out.append("\n");
      }
      if (add_generation_prompt) out.append("assistant:");
      break;
  }
  return r;
}

}  // namespace tailorkv::tokenizer
