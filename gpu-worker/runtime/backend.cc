#include "runtime/backend.h"

#include "absl/strings/str_format.h"

namespace tailorkv::runtime {

absl::Status ValidateForwardInput(const model::ModelConfig& config, const SequenceState& seq,
                                  absl::Span<const int32_t> tokens) {
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n == 0) return absl::InvalidArgumentError("tokens must not be empty");
  if (n > seq.capacity() - seq.length()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("tokens: %d more tokens overflow the sequence (%d of %d used)", n,
                        seq.length(), seq.capacity()));
  }
  for (int64_t i = 0; i < n; ++i) {
    if (tokens[i] < 0 || tokens[i] >= config.vocab) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "tokens[%d] = %d is outside the vocabulary [0, %d)", i, tokens[i], config.vocab));
    }
  }
  return absl::OkStatus();
}

}  // namespace tailorkv::runtime
