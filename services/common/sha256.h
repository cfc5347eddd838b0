// SHA-256 digests in the form plans and model identities use: "sha256:" and
// 64 lowercase hex digits.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace tailorkv::common {

// "sha256:<hex>" of `data`.
std::string Sha256Tag(std::string_view data);

// "sha256:<hex>" of a file's bytes, read in 4 MiB blocks. `progress`, when
// set, is called after each block with (bytes done, file size); a non-OK
// return stops the read and is returned (cancellation). NotFound when the
// file cannot be opened, DataLoss on a read error; messages start with the
// path.
absl::StatusOr<std::string> Sha256File(
    const std::string& path,
    const std::function<absl::Status(int64_t done, int64_t total)>& progress = nullptr);

// True for "sha256:" followed by exactly 64 lowercase hex digits.
bool IsSha256Tag(std::string_view tag);

}  // namespace tailorkv::common
