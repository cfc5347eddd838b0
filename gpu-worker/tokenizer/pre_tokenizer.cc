#include "tokenizer/pre_tokenizer.h"

#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "tokenizer/utf8.h"
#include "unicode/uchar.h"

namespace tailorkv::tokenizer::internal {
namespace {

enum class CharClass : uint8_t { kLetter, kNumber, kSpace, kOther, kEnd };

struct Char {
  char32_t cp;
  uint32_t offset;  // byte offset in the text
  CharClass cls;
};

CharClass Classify(char32_t cp) {
  if (cp < 0x80) {
    // ASCII fast path; agrees with ICU on every ASCII character.
    if ((cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z')) return CharClass::kLetter;
    if (cp >= '0' && cp <= '9') return CharClass::kNumber;
    if (cp == ' ' || (cp >= '\t' && cp <= '\r')) return CharClass::kSpace;
    return CharClass::kOther;
  }
  const auto c = static_cast<UChar32>(cp);
  switch (u_charType(c)) {
    case U_UPPERCASE_LETTER:
    case U_LOWERCASE_LETTER:
    case U_TITLECASE_LETTER:
    case U_MODIFIER_LETTER:
    case U_OTHER_LETTER:
      return CharClass::kLetter;
    case U_DECIMAL_DIGIT_NUMBER:
    case U_LETTER_NUMBER:
    case U_OTHER_NUMBER:
      return CharClass::kNumber;
    default:
      break;
  }
  return u_hasBinaryProperty(c, UCHAR_WHITE_SPACE) ? CharClass::kSpace : CharClass::kOther;
}

// Matches one family's regex over chars [begin, end); `end` acts as the end
// of the input, which is what the lookahead sees.
class Matcher {
 public:
  Matcher(const std::vector<Char>& chars, size_t begin, size_t end)
      : chars_(chars), begin_(begin), end_(end) {}

  template <typename MatchFn>
  void SplitAll(MatchFn match, std::vector<size_t>& boundaries) const {
    size_t i = begin_;
    while (i < end_) {
      i = match(*this, i);
      boundaries.push_back(i);
    }
  }

  CharClass cls(size_t k) const { return k < end_ ? chars_[k].cls : CharClass::kEnd; }
  char32_t cp(size_t k) const { return k < end_ ? chars_[k].cp : 0; }
  size_t end() const { return end_; }

  size_t RunOf(size_t k, CharClass c) const {
    while (k < end_ && chars_[k].cls == c) ++k;
    return k;
  }

  // 's|'t|'re|'ve|'m|'ll|'d at i; returns the end or 0.
  size_t Contraction(size_t i, bool ignore_case) const {
    if (cp(i) != '\'') return 0;
    auto lower = [&](size_t k) {
      const char32_t c = cp(k);
      return (ignore_case && c >= 'A' && c <= 'Z') ? c + ('a' - 'A') : c;
    };
    const char32_t a = lower(i + 1);
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
    const char32_t b = lower(i + 2);
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
    return 0;
  }

  // \s+(?!\S)|\s+ at a whitespace character i: the run, less its last
  // character when a non-space follows and the run is longer than one.
  size_t SpaceRun(size_t i) const {
    const size_t r = RunOf(i, CharClass::kSpace);
    if (r == end_ || r - i == 1) return r;
    return r - 1;
  }

 private:
  const std::vector<Char>& chars_;
  size_t begin_, end_;
};

size_t MatchGpt2(const Matcher& m, size_t i) {
  if (size_t e = m.Contraction(i, /*ignore_case=*/false)) return e;
  // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: one optional space, then
  // a run of a single class.
  const size_t j = m.cp(i) == ' ' ? i + 1 : i;
  const CharClass c = m.cls(j);
  if (c == CharClass::kLetter || c == CharClass::kNumber || c == CharClass::kOther) {
    return m.RunOf(j, c);
  }
  return m.SpaceRun(i);
}

bool IsNewline(char32_t c) { return c == '\r' || c == '\n'; }

template <size_t kMaxDigits>
size_t MatchLlama3(const Matcher& m, size_t i) {
  if (size_t e = m.Contraction(i, /*ignore_case=*/true)) return e;
  const CharClass c = m.cls(i);
  // [^\r\n\p{L}\p{N}]?\p{L}+
  if (c == CharClass::kLetter) return m.RunOf(i, CharClass::kLetter);
  if (c != CharClass::kNumber && !IsNewline(m.cp(i)) && m.cls(i + 1) == CharClass::kLetter) {
    return m.RunOf(i + 1, CharClass::kLetter);
  }
  // \p{N}{1,N}
  if (c == CharClass::kNumber) {
    size_t e = i;
    while (e < m.end() && e - i < kMaxDigits && m.cls(e) == CharClass::kNumber) ++e;
    return e;
  }
  // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
  const size_t j = m.cp(i) == ' ' ? i + 1 : i;
  if (m.cls(j) == CharClass::kOther) {
    size_t e = m.RunOf(j, CharClass::kOther);
    while (e < m.end() && IsNewline(m.cp(e))) ++e;
    return e;
  }
  // \s*[\r\n]+: greedy \s* backtracks to the last newline of the run.
  const size_t r = m.RunOf(i, CharClass::kSpace);
  for (size_t k = r; k > i; --k) {
    if (IsNewline(m.cp(k - 1))) return k;
  }
  return m.SpaceRun(i);
}

}  // namespace

absl::StatusOr<PreTokenizer> PreTokenizerFromName(std::string_view pre) {
  if (pre == "gpt2" || pre == "default") return PreTokenizer::kGpt2;
  if (pre == "smollm") return PreTokenizer::kSmolLM;
  if (pre == "llama-bpe" || pre == "llama3" || pre == "llama-v3") return PreTokenizer::kLlama3;
  if (pre == "qwen2") return PreTokenizer::kQwen2;
  return absl::InvalidArgumentError(absl::StrCat(
      "tokenizer.ggml.pre \"", std::string(pre),
      "\" is not supported (known: gpt2, default, smollm, llama-bpe, qwen2)"));
}

std::vector<std::string_view> SplitPreTokens(PreTokenizer kind, std::string_view text) {
  std::vector<Char> chars;
  chars.reserve(text.size());
  for (size_t pos = 0; pos < text.size();) {
    const Utf8Char c = DecodeUtf8Char(text.substr(pos));
    // Callers validate; an ill-formed byte is kept as its own "other" char so
    // that the pieces still cover the text.
    const char32_t cp = c.kind == Utf8Char::kValid ? c.cp : 0xFFFD;
    const int len = c.kind == Utf8Char::kValid ? c.length : 1;
    chars.push_back({cp, static_cast<uint32_t>(pos),
                     c.kind == Utf8Char::kValid ? Classify(cp) : CharClass::kOther});
    pos += len;
  }

  std::vector<size_t> boundaries;  // char index where each piece ends
  boundaries.reserve(chars.size() / 3 + 1);
  switch (kind) {
    case PreTokenizer::kGpt2:
      Matcher(chars, 0, chars.size()).SplitAll(MatchGpt2, boundaries);
      break;
    case PreTokenizer::kLlama3:
      Matcher(chars, 0, chars.size()).SplitAll(MatchLlama3<3>, boundaries);
      break;
    case PreTokenizer::kQwen2:
      Matcher(chars, 0, chars.size()).SplitAll(MatchLlama3<1>, boundaries);
      break;
    case PreTokenizer::kSmolLM: {
      // Digits(individual_digits) first; the byte-level regex then sees each
      // run between digits as a whole input (its lookahead stops there).
      size_t run = 0;
      for (size_t k = 0; k <= chars.size(); ++k) {
        if (k < chars.size() && chars[k].cls != CharClass::kNumber) continue;
        if (k > run) Matcher(chars, run, k).SplitAll(MatchGpt2, boundaries);
        if (k < chars.size()) boundaries.push_back(k + 1);
        run = k + 1;
      }
      break;
    }
  }

  std::vector<std::string_view> pieces;
  pieces.reserve(boundaries.size());
  size_t start_byte = 0;
  for (size_t b : boundaries) {
    const size_t end_byte = b < chars.size() ? chars[b].offset : text.size();
    pieces.push_back(text.substr(start_byte, end_byte - start_byte));
    start_byte = end_byte;
  }
  return pieces;
}

}  // namespace tailorkv::tokenizer::internal
