// Fuzz target: the HTTP gateway's request bodies (gateway/openai_api.h):
// POST /v1/chat/completions and /v1/completions JSON, the error objects
// built from what they are refused with, and the responses built for an
// accepted request.
//
// Input: byte 0 bit 0 picks the endpoint (chat / completions); the rest is
// the body.
// Invariants: errors are InvalidArgument naming a field (ErrorParam) and
// render as a JSON error object; an accepted request names a model, holds
// a prompt or messages, max_tokens in [1, cap], at most 4 stop strings of
// 1..256 bytes, and its response bodies and events are JSON.
#include <cstdint>
#include <string>

#include "fuzz_util.h"
#include "gateway/openai_api.h"
#include "nlohmann/json.hpp"

namespace gw = tailorkv::gateway;
namespace v1 = tailorkv::v1;
using nlohmann::json;

namespace {

void CheckJson(const std::string& text, const char* what) {
  FUZZ_CHECK(json::accept(text), "%s is not JSON: %s", what, text.c_str());
}

void CheckEvent(const std::string& event, const char* what) {
  FUZZ_CHECK(event.rfind("data: ", 0) == 0 && event.size() >= 8 &&
                 event.compare(event.size() - 2, 2, "\n\n") == 0,
             "%s is not an SSE event", what);
  CheckJson(event.substr(6, event.size() - 8), what);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  tailorkv::fuzz::Reader in(data, size);
  const gw::Endpoint endpoint = (in.Byte() & 1) ? gw::Endpoint::kCompletions : gw::Endpoint::kChat;
  const std::string body = in.Rest();
  gw::ApiLimits limits;
  auto req = gw::ParseRequest(endpoint, body, limits);
  if (!req.ok()) {
    FUZZ_CHECK(req.status().code() == absl::StatusCode::kInvalidArgument, "%s",
               req.status().ToString().c_str());
    FUZZ_CHECK(!gw::ErrorParam(req.status()).empty(), "error names no field: %s",
               req.status().ToString().c_str());
    const int http = gw::HttpStatusFor(req.status().code());
    FUZZ_CHECK(http == 400, "HTTP %d", http);
    CheckJson(gw::ErrorBody(req.status(), http), "ErrorBody");
    CheckEvent(gw::StreamErrorEvent(req.status()), "StreamErrorEvent");
    return 0;
  }
  const v1::GenerateRequest& r = req->request;
  FUZZ_CHECK(r.request_id().empty(), "request_id set");
  if (endpoint == gw::Endpoint::kChat) {
    FUZZ_CHECK(r.has_chat() && r.chat().messages_size() > 0, "chat without messages");
  } else {
    FUZZ_CHECK(r.has_text() || r.has_token_ids(), "completion without a prompt");
    if (r.has_text()) FUZZ_CHECK(!r.text().empty(), "empty prompt");
  }
  const v1::SamplingParams& s = r.sampling();
  FUZZ_CHECK(s.has_max_tokens() && s.max_tokens() >= 1 && s.max_tokens() <= limits.max_tokens_cap,
             "max_tokens %d", s.max_tokens());
  FUZZ_CHECK(s.stop_size() <= 4, "%d stop strings", s.stop_size());
  for (const std::string& stop : s.stop()) {
    FUZZ_CHECK(!stop.empty() && stop.size() <= 256, "stop of %zu bytes", stop.size());
  }
  FUZZ_CHECK(!req->include_usage || req->stream, "include_usage without stream");
  FUZZ_CHECK(!(s.temperature() < 0 || s.temperature() > 2), "temperature %f", s.temperature());

  // The responses for it, with text that is not all UTF-8 (the gateway
  // must not throw whatever a worker sends).
  gw::ResponseIds ids{"chatcmpl-1", req->model, 1700000000};
  v1::Usage usage;
  usage.set_prompt_tokens(3);
  usage.set_completion_tokens(2);
  const std::string text = body.substr(0, 16);
  CheckJson(gw::CompletionBody(*req, ids, text, v1::FINISH_REASON_LENGTH, usage), "CompletionBody");
  CheckEvent(gw::StreamChunkEvent(*req, ids, text, true), "StreamChunkEvent");
  CheckEvent(gw::StreamFinishEvent(*req, ids, v1::FINISH_REASON_STOP), "StreamFinishEvent");
  CheckEvent(gw::StreamUsageEvent(*req, ids, usage), "StreamUsageEvent");
  CheckJson(gw::ModelsBody(req->model, 1700000000), "ModelsBody");
  return 0;
}
