// Writing a whole file so that readers (and a crash) see either the old
// contents or the new, never a part.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/status.h"

namespace tailorkv::common {

// Writes `contents` to a temporary file beside `path` (same directory, so the
// rename is atomic), fsyncs it, renames it over `path` and fsyncs the
// directory. The file gets mode 0644. On any error the temporary file is
// removed and `path` is untouched; Internal with the path and strerror
// (InvalidArgument when `path` names no file).
absl::Status WriteFileAtomically(const std::string& path, std::string_view contents);

}  // namespace tailorkv::common
