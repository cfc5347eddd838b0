#include "gateway/openai_api.h"

#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace tailorkv::gateway {
namespace {

using nlohmann::json;
namespace v1 = tailorkv::v1;

// "<field>: <what>": the field is the message's prefix (ErrorParam).
absl::Status Bad(const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
}

bool IsNull(const json& body, const char* key) { return !body.contains(key) || body[key].is_null(); }

// A no-op value or absent: fields the worker cannot honour are refused
// when set to anything else.
absl::Status RequireNoOp(const json& body, const char* key, const json& no_op) {
  if (IsNull(body, key) || body[key] == no_op) return absl::OkStatus();
  return Bad(key, absl::StrCat("not supported by this server (only ", no_op.dump(), ")"));
}

absl::StatusOr<double> Number(const json& body, const char* key, double lo, double hi, bool lo_open) {
  const json& v = body[key];
  if (!v.is_number()) return Bad(key, "must be a number");
  const double x = v.get<double>();
  if (!(lo_open ? x > lo : x >= lo) || !(x <= hi)) {
    return Bad(key, absl::StrCat("must be in ", lo_open ? "(" : "[", lo, ", ", hi, "], got ", v.dump()));
  }
  return x;
}

absl::Status ParseSampling(const json& body, const ApiLimits& limits, v1::SamplingParams* s) {
  // max_completion_tokens is the newer name; either may be sent.
  for (const char* key : {"max_tokens", "max_completion_tokens"}) {
    if (IsNull(body, key)) continue;
    const json& v = body[key];
    if (!v.is_number_integer()) return Bad(key, "must be an integer");
    const int64_t n = v.get<int64_t>();
    if (n < 1 || n > limits.max_tokens_cap) {
      return Bad(key, absl::StrCat("must be in [1, ", limits.max_tokens_cap, "] on this server, got ", n));
    }
    s->set_max_tokens(static_cast<int32_t>(n));
  }
  if (!s->has_max_tokens()) s->set_max_tokens(limits.default_max_tokens);
  // OpenAI's default temperature is 1 (sampling); 0 is greedy.
  double temperature = 1.0;
  if (!IsNull(body, "temperature")) {
    absl::StatusOr<double> t = Number(body, "temperature", 0.0, 2.0, false);
    if (!t.ok()) return t.status();
    temperature = *t;
  }
  s->set_temperature(static_cast<float>(temperature));
  if (!IsNull(body, "top_p")) {
    absl::StatusOr<double> p = Number(body, "top_p", 0.0, 1.0, true);
    if (!p.ok()) return p.status();
    s->set_top_p(static_cast<float>(*p));
  }
  if (!IsNull(body, "seed")) {
    if (!body["seed"].is_number_integer()) return Bad("seed", "must be an integer");
    s->set_seed(static_cast<uint64_t>(body["seed"].get<int64_t>()));
  }
  if (!IsNull(body, "stop")) {
    const json& stop = body["stop"];
    std::vector<std::string> stops;
    if (stop.is_string()) {
      stops.push_back(stop.get<std::string>());
    } else if (stop.is_array()) {
      if (stop.size() > 4) return Bad("stop", absl::StrCat("at most 4 sequences, got ", stop.size()));
      for (const json& e : stop) {
        if (!e.is_string()) return Bad("stop", "must be a string or an array of strings");
        stops.push_back(e.get<std::string>());
      }
    } else {
      return Bad("stop", "must be a string or an array of strings");
    }
    for (const std::string& t : stops) {
      if (t.empty() || t.size() > 256) return Bad("stop", "each sequence must be 1 to 256 bytes");
      s->add_stop(t);
    }
  }
  if (!IsNull(body, "n") && body["n"] != json(1)) return Bad("n", "only 1 is supported");
  for (const char* key : {"presence_penalty", "frequency_penalty"}) {
    if (!IsNull(body, key) && !(body[key].is_number() && body[key].get<double>() == 0.0)) {
      return Bad(key, "not supported by this server (only 0)");
    }
  }
  if (absl::Status st = RequireNoOp(body, "logprobs", json(false)); !st.ok()) return st;
  if (absl::Status st = RequireNoOp(body, "logit_bias", json::object()); !st.ok()) return st;
  if (absl::Status st = RequireNoOp(body, "best_of", json(1)); !st.ok()) return st;
  if (absl::Status st = RequireNoOp(body, "echo", json(false)); !st.ok()) return st;
  if (!IsNull(body, "top_logprobs")) return Bad("top_logprobs", "not supported by this server");
  if (!IsNull(body, "suffix")) return Bad("suffix", "not supported by this server");
  for (const char* key : {"tools", "functions"}) {
    if (!IsNull(body, key) && !(body[key].is_array() && body[key].empty())) {
      return Bad(key, "tool calls are not supported by this server");
    }
  }
  if (!IsNull(body, "response_format") &&
      !(body["response_format"].is_object() && body["response_format"].value("type", "") == "text")) {
    return Bad("response_format", "only {\"type\": \"text\"} is supported");
  }
  return absl::OkStatus();
}

absl::Status ParseMessages(const json& body, v1::Chat* chat) {
  if (IsNull(body, "messages")) return Bad("messages", "required");
  const json& msgs = body["messages"];
  if (!msgs.is_array() || msgs.empty()) return Bad("messages", "must be a non-empty array");
  for (size_t i = 0; i < msgs.size(); ++i) {
    const std::string field = absl::StrCat("messages[", i, "]");
    const json& m = msgs[i];
    if (!m.is_object()) return Bad(field, "must be an object");
    if (!m.contains("role") || !m["role"].is_string()) return Bad(field + ".role", "required string");
    const std::string role = m["role"].get<std::string>();
    v1::ChatMessage* out = chat->add_messages();
    if (role == "system" || role == "developer") {
      out->set_role(v1::ROLE_SYSTEM);
    } else if (role == "user") {
      out->set_role(v1::ROLE_USER);
    } else if (role == "assistant") {
      out->set_role(v1::ROLE_ASSISTANT);
    } else {
      return Bad(field + ".role", absl::StrCat("must be system, developer, user or assistant, got \"", role, "\""));
    }
    const json& content = m.contains("content") ? m["content"] : json();
    std::string text;
    if (content.is_string()) {
      text = content.get<std::string>();
    } else if (content.is_array()) {
      for (size_t j = 0; j < content.size(); ++j) {
        const json& part = content[j];
        const std::string pf = absl::StrCat(field, ".content[", j, "]");
        if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
            !part["text"].is_string()) {
          return Bad(pf, "only {\"type\": \"text\", \"text\": ...} parts are supported");
        }
        text += part["text"].get<std::string>();
      }
    } else if (content.is_null() && role == "assistant") {
      text = "";
    } else {
      return Bad(field + ".content", "must be a string or an array of text parts");
    }
    out->set_content(text);
  }
  return absl::OkStatus();
}

absl::Status ParsePrompt(const json& body, v1::GenerateRequest* request) {
  if (IsNull(body, "prompt")) return Bad("prompt", "required");
  const json& p = body["prompt"];
  if (p.is_string()) {
    if (p.get<std::string>().empty()) return Bad("prompt", "must not be empty");
    request->set_text(p.get<std::string>());
    return absl::OkStatus();
  }
  if (p.is_array() && p.size() == 1 && p[0].is_string()) {
    if (p[0].get<std::string>().empty()) return Bad("prompt", "must not be empty");
    request->set_text(p[0].get<std::string>());
    return absl::OkStatus();
  }
  if (p.is_array() && !p.empty() && p[0].is_number_integer()) {
    for (const json& id : p) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX) {
        return Bad("prompt", "a token array must hold non-negative integers");
      }
      request->mutable_token_ids()->add_ids(static_cast<int32_t>(id.get<int64_t>()));
    }
    return absl::OkStatus();
  }
  return Bad("prompt", "must be a string, an array of one string, or an array of token ids (one prompt: n 1)");
}

json UsageJson(const v1::Usage& u) {
  return {{"prompt_tokens", u.prompt_tokens()},
          {"completion_tokens", u.completion_tokens()},
          {"total_tokens", u.prompt_tokens() + u.completion_tokens()}};
}

json Envelope(const ParsedRequest& req, const ResponseIds& ids, bool chunk) {
  const char* object = req.endpoint == Endpoint::kChat ? (chunk ? "chat.completion.chunk" : "chat.completion")
                                                       : "text_completion";
  return {{"id", ids.id}, {"object", object}, {"created", ids.created}, {"model", ids.model}};
}

std::string Event(const json& j) { return absl::StrCat("data: ", j.dump(), "\n\n"); }

}  // namespace

absl::StatusOr<ParsedRequest> ParseRequest(Endpoint endpoint, std::string_view body_text,
                                           const ApiLimits& limits) {
  json body = json::parse(body_text, nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded()) return Bad("body", "not valid JSON");
  if (!body.is_object()) return Bad("body", "must be a JSON object");
  ParsedRequest out;
  out.endpoint = endpoint;
  if (IsNull(body, "model") || !body["model"].is_string()) return Bad("model", "required string");
  out.model = body["model"].get<std::string>();
  if (!IsNull(body, "stream")) {
    if (!body["stream"].is_boolean()) return Bad("stream", "must be a boolean");
    out.stream = body["stream"].get<bool>();
  }
  if (!IsNull(body, "stream_options")) {
    const json& so = body["stream_options"];
    if (!so.is_object()) return Bad("stream_options", "must be an object");
    if (!out.stream) return Bad("stream_options", "only allowed when stream is true");
    if (so.contains("include_usage")) {
      if (!so["include_usage"].is_boolean()) return Bad("stream_options.include_usage", "must be a boolean");
      out.include_usage = so["include_usage"].get<bool>();
    }
  }
  if (endpoint == Endpoint::kChat) {
    if (absl::Status s = ParseMessages(body, out.request.mutable_chat()); !s.ok()) return s;
  } else {
    if (absl::Status s = ParsePrompt(body, &out.request); !s.ok()) return s;
  }
  if (absl::Status s = ParseSampling(body, limits, out.request.mutable_sampling()); !s.ok()) return s;
  return out;
}

std::string ErrorParam(const absl::Status& status) {
  if (status.code() != absl::StatusCode::kInvalidArgument) return "";
  const std::string m(status.message());
  const size_t colon = m.find(": ");
  if (colon == std::string::npos || m.substr(0, colon).find(' ') != std::string::npos) return "";
  return m.substr(0, colon);
}

int HttpStatusFor(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kFailedPrecondition:
      return 400;
    case absl::StatusCode::kUnauthenticated:
      return 401;
    case absl::StatusCode::kPermissionDenied:
      return 403;
    case absl::StatusCode::kNotFound:
      return 404;
    case absl::StatusCode::kResourceExhausted:
      return 429;
    case absl::StatusCode::kCancelled:
      return 499;
    case absl::StatusCode::kUnavailable:
      return 503;
    case absl::StatusCode::kDeadlineExceeded:
      return 504;
    default:
      return 500;
  }
}

std::string ErrorBody(const absl::Status& status, int http_status) {
  const std::string param = ErrorParam(status);
  json error = {{"message", std::string(status.message())},
                {"type", http_status < 500 ? "invalid_request_error" : "server_error"},
                {"param", param.empty() ? json() : json(param)},
                {"code", absl::StatusCodeToString(status.code())}};
  if (http_status == 401) error["type"] = "authentication_error";
  if (http_status == 429) error["type"] = "rate_limit_error";
  return json{{"error", error}}.dump();
}

std::string FinishReasonName(v1::FinishReason reason) {
  return reason == v1::FINISH_REASON_LENGTH ? "length" : "stop";
}

std::string CompletionBody(const ParsedRequest& req, const ResponseIds& ids, const std::string& text,
                           v1::FinishReason finish, const v1::Usage& usage) {
  json j = Envelope(req, ids, false);
  json choice = {{"index", 0}, {"finish_reason", FinishReasonName(finish)}, {"logprobs", nullptr}};
  if (req.endpoint == Endpoint::kChat) {
    choice["message"] = {{"role", "assistant"}, {"content", text}};
  } else {
    choice["text"] = text;
  }
  j["choices"] = json::array({choice});
  j["usage"] = UsageJson(usage);
  // Invalid UTF-8 never reaches here (the worker streams whole characters),
  // but a throwing dump must not take the gateway down.
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string StreamChunkEvent(const ParsedRequest& req, const ResponseIds& ids, const std::string& text,
                             bool first) {
  json j = Envelope(req, ids, true);
  json choice = {{"index", 0}, {"finish_reason", nullptr}, {"logprobs", nullptr}};
  if (req.endpoint == Endpoint::kChat) {
    json delta = {{"content", text}};
    if (first) delta["role"] = "assistant";
    choice["delta"] = delta;
  } else {
    choice["text"] = text;
  }
  j["choices"] = json::array({choice});
  return absl::StrCat("data: ", j.dump(-1, ' ', false, json::error_handler_t::replace), "\n\n");
}

std::string StreamFinishEvent(const ParsedRequest& req, const ResponseIds& ids, v1::FinishReason finish) {
  json j = Envelope(req, ids, true);
  json choice = {{"index", 0}, {"finish_reason", FinishReasonName(finish)}, {"logprobs", nullptr}};
  if (req.endpoint == Endpoint::kChat) {
    choice["delta"] = json::object();
  } else {
    choice["text"] = "";
  }
  j["choices"] = json::array({choice});
  return Event(j);
}

std::string StreamUsageEvent(const ParsedRequest& req, const ResponseIds& ids, const v1::Usage& usage) {
  json j = Envelope(req, ids, true);
  j["choices"] = json::array();
  j["usage"] = UsageJson(usage);
  return Event(j);
}

std::string StreamErrorEvent(const absl::Status& status) {
  return absl::StrCat("data: ", ErrorBody(status, HttpStatusFor(status.code())), "\n\n");
}

std::string ModelsBody(const std::string& id, int64_t created) {
  json model = {{"id", id}, {"object", "model"}, {"created", created}, {"owned_by", "tailorkv"}};
  return json{{"object", "list"}, {"data", json::array({model})}}.dump();
}

}  // namespace tailorkv::gateway
