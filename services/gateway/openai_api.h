// The OpenAI-compatible HTTP API's wire format: request bodies of
// POST /v1/chat/completions and POST /v1/completions parsed into the
// worker's GenerateRequest (every field checked, errors naming it), and the
// responses built from the worker's chunks: whole JSON objects, or
// server-sent events ("data: {...}\n\n", then "data: [DONE]\n\n").
//
// Semantics follow OpenAI's where the worker can give them: temperature
// defaults to 1 (OpenAI's default; 0 is greedy), top_p to 1, max_tokens
// (or max_completion_tokens) to the gateway's default and is capped by it,
// stop is a string or up to 4 strings, n must be 1, seed is passed on.
// presence_penalty / frequency_penalty / logprobs / tools are refused when
// set to anything but their no-op value (the worker has no such sampling),
// rather than silently ignored. Unknown fields are ignored, as OpenAI's
// clients send extra ones.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "tailorkv/v1/generation.pb.h"

namespace tailorkv::gateway {

struct ApiLimits {
  int default_max_tokens = 256;  // when the request sets none
  int max_tokens_cap = 4096;     // larger requests are refused (400)
};

enum class Endpoint { kChat, kCompletions };

struct ParsedRequest {
  Endpoint endpoint = Endpoint::kChat;
  tailorkv::v1::GenerateRequest request;  // request_id left empty
  std::string model;                      // as the client named it
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
};

// InvalidArgument naming the field (its message becomes the error object's
// message; the field goes to `param`, as OpenAI reports it).
absl::StatusOr<ParsedRequest> ParseRequest(Endpoint endpoint, std::string_view body,
                                           const ApiLimits& limits);

// The field an InvalidArgument from ParseRequest names, or "" (for `param`).
std::string ErrorParam(const absl::Status& status);

// HTTP status for a gRPC/absl status code, as OpenAI's API uses them:
// InvalidArgument/OutOfRange 400, Unauthenticated 401, PermissionDenied 403,
// NotFound 404, ResourceExhausted 429, Unavailable 503, DeadlineExceeded
// 504, Cancelled 499, else 500.
int HttpStatusFor(absl::StatusCode code);

// {"error": {"message", "type", "param", "code"}}; type is
// invalid_request_error for 4xx, server_error otherwise.
std::string ErrorBody(const absl::Status& status, int http_status);

// The finish_reason OpenAI names ("stop", "length"; null while running).
std::string FinishReasonName(tailorkv::v1::FinishReason reason);

struct ResponseIds {
  std::string id;     // chatcmpl-... / cmpl-...
  std::string model;
  int64_t created = 0;  // Unix seconds
};

// Whole responses (stream false).
std::string CompletionBody(const ParsedRequest& req, const ResponseIds& ids, const std::string& text,
                           tailorkv::v1::FinishReason finish, const tailorkv::v1::Usage& usage);

// One server-sent event with a chunk of text (first: chat's delta carries
// the assistant role), or the last one with its finish_reason; include_usage
// adds a final event whose choices are empty and whose usage is set.
std::string StreamChunkEvent(const ParsedRequest& req, const ResponseIds& ids, const std::string& text,
                             bool first);
std::string StreamFinishEvent(const ParsedRequest& req, const ResponseIds& ids,
                              tailorkv::v1::FinishReason finish);
std::string StreamUsageEvent(const ParsedRequest& req, const ResponseIds& ids,
                             const tailorkv::v1::Usage& usage);
// An error after the stream began (HTTP status already sent): an event
// carrying the error object, as OpenAI's servers do.
std::string StreamErrorEvent(const absl::Status& status);
inline constexpr std::string_view kStreamDone = "data: [DONE]\n\n";

// GET /v1/models: one model, `id`.
std::string ModelsBody(const std::string& id, int64_t created);

}  // namespace tailorkv::gateway
