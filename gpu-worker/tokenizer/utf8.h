// UTF-8 decoding shared by the tokenizer and the streaming detokenizer.
// Internal to tkv_tokenizer; not part of its public API.
//
// Ill-formed input is handled with the Unicode "maximal subpart" practice
// (Unicode 15 §3.9, also WHATWG and ICU): each maximal prefix of a
// well-formed sequence that cannot be completed becomes one U+FFFD. Because
// that rule only looks forward, holding back an incomplete tail and decoding
// it later gives the same result as decoding the whole string at once, which
// is what makes the streaming detokenizer agree with a one-shot decode.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace tailorkv::tokenizer::internal {

struct Utf8Char {
  enum Kind {
    kValid,       // a well-formed character of `length` bytes, code point `cp`
    kInvalid,     // an ill-formed maximal subpart of `length` bytes
    kIncomplete,  // the input ends after `length` bytes of a well-formed prefix
  };
  Kind kind = kInvalid;
  int length = 1;
  char32_t cp = 0;
};

// Decodes the character at the start of `bytes`, which must be non-empty.
Utf8Char DecodeUtf8Char(std::string_view bytes);

// Appends the UTF-8 encoding of `cp` (which must be a scalar value).
void AppendUtf8(char32_t cp, std::string& out);

// True when `bytes` is entirely well-formed UTF-8.
bool IsValidUtf8(std::string_view bytes);

// Replaces each ill-formed maximal subpart, including an incomplete tail, by
// U+FFFD.
std::string SanitizeUtf8(std::string_view bytes);

// Appends to `out` the sanitized form of the longest prefix of `bytes` that
// does not end in an incomplete character, and returns that prefix's length.
size_t AppendCompleteUtf8(std::string_view bytes, std::string& out);

}  // namespace tailorkv::tokenizer::internal
