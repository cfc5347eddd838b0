// RequestValidator: turns a tailorkv.v1.GenerateRequest into an engine
// request, checking every field at the API edge before any work is done.
//
// Errors are InvalidArgument naming the field as the client wrote it
// (`sampling.top_p`, `chat.messages[2].content`, `token_ids.ids[7]`) and the
// limit it broke. The prompt is tokenized here (CPU only, no backend memory)
// so that its length can be checked against the context.
//
// Immutable after construction; thread-safe. The Engine must outlive it.
#pragma once

#include <cstddef>
#include <string>

#include "absl/status/statusor.h"
#include "runtime/engine.h"
#include "tailorkv/v1/generation.pb.h"

namespace tailorkv::worker {

struct RequestLimits {
  int max_request_id_bytes = 128;
  int max_stop_strings = 16;
  int max_stop_bytes = 256;
  int max_chat_messages = 1024;
  int default_max_tokens = 128;  // when sampling.max_tokens is unset
};

struct PreparedRequest {
  std::string request_id;
  runtime::GenerationRequest engine_request;
};

class RequestValidator {
 public:
  RequestValidator(const runtime::Engine& engine, const RequestLimits& limits);

  absl::StatusOr<PreparedRequest> Prepare(const v1::GenerateRequest& request) const;

  const RequestLimits& limits() const { return limits_; }

 private:
  absl::StatusOr<std::vector<int32_t>> Tokenize(const v1::GenerateRequest& request) const;
  absl::Status FillSampling(const v1::SamplingParams& sampling, int prompt_tokens,
                            runtime::GenerationRequest& out) const;

  const runtime::Engine& engine_;
  const RequestLimits limits_;
  // Longest token in bytes: a text longer than max_context * this cannot
  // fit whatever its tokenization, so it is refused before tokenizing.
  size_t max_token_bytes_ = 1;
};

// Printable ASCII (0x21..0x7E), at most `max_bytes`; the field is "request_id".
absl::Status ValidateRequestId(const std::string& id, int max_bytes);

}  // namespace tailorkv::worker
