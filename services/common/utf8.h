// Strict UTF-8 validation (RFC 3629) for text arriving from clients.
//
// Rejects what a lenient decoder would let through: overlong encodings
// (C0 80 for NUL), UTF-16 surrogates (ED A0 80..ED BF BF), code points above
// U+10FFFF, stray continuation bytes and sequences cut short by the end of
// the input. Pure functions; thread-safe.
#pragma once

#include <cstddef>
#include <string_view>

#include "absl/status/status.h"

namespace tailorkv::common {

// Byte offset of the first byte of the first invalid sequence, or
// std::string_view::npos when `text` is valid UTF-8.
size_t FindInvalidUtf8(std::string_view text);

inline bool IsValidUtf8(std::string_view text) {
  return FindInvalidUtf8(text) == std::string_view::npos;
}

// OK, or InvalidArgument "<field>: invalid UTF-8 at byte N".
absl::Status ValidateUtf8(std::string_view text, std::string_view field);

}  // namespace tailorkv::common
