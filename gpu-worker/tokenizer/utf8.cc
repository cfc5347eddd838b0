#include "tokenizer/utf8.h"

#include <cstdint>

namespace tailorkv::tokenizer::internal {
namespace {
constexpr std::string_view kReplacement = "\xEF\xBF\xBD";
}  // namespace

Utf8Char DecodeUtf8Char(std::string_view bytes) {
  const auto b0 = static_cast<uint8_t>(bytes[0]);
  if (b0 < 0x80) return {Utf8Char::kValid, 1, b0};
  // Table 3-7 of the Unicode standard: the lead byte fixes the number of
  // continuation bytes and the allowed range of the first one (which excludes
  // overlongs, surrogates and values above U+10FFFF).
  int continuation = 0;
  uint8_t lo = 0x80, hi = 0xBF;
  char32_t cp = 0;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    continuation = 1;
    cp = b0 & 0x1F;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    continuation = 2;
    cp = b0 & 0x0F;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    continuation = 3;
    cp = b0 & 0x07;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return {Utf8Char::kInvalid, 1, 0};
  }
  for (int k = 1; k <= continuation; ++k) {
    if (static_cast<size_t>(k) >= bytes.size()) return {Utf8Char::kIncomplete, k, 0};
    const auto b = static_cast<uint8_t>(bytes[k]);
    if (b < lo || b > hi) return {Utf8Char::kInvalid, k, 0};
    lo = 0x80;
    hi = 0xBF;
    cp = (cp << 6) | (b & 0x3F);
  }
  return {Utf8Char::kValid, continuation + 1, cp};
}

void AppendUtf8(char32_t cp, std::string& out) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

bool IsValidUtf8(std::string_view bytes) {
  size_t pos = 0;
  while (pos < bytes.size()) {
    const Utf8Char c = DecodeUtf8Char(bytes.substr(pos));
    if (c.kind != Utf8Char::kValid) return false;
    pos += c.length;
  }
  return true;
}

size_t AppendCompleteUtf8(std::string_view bytes, std::string& out) {
  size_t pos = 0;
  while (pos < bytes.size()) {
    const Utf8Char c = DecodeUtf8Char(bytes.substr(pos));
    if (c.kind == Utf8Char::kIncomplete) break;
    if (c.kind == Utf8Char::kValid) {
      out.append(bytes.substr(pos, c.length));
    } else {
      out.append(kReplacement);
    }
    pos += c.length;
  }
  return pos;
}

std::string SanitizeUtf8(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  if (AppendCompleteUtf8(bytes, out) < bytes.size()) out.append(kReplacement);
  return out;
}

}  // namespace tailorkv::tokenizer::internal
